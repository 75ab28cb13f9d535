# The two commands in README.md: `sudo make demo` and `sudo make test`.
# Both run the one install step first (scripts/install-deps is idempotent).
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: deps test lint demo bench clean

deps:
	scripts/install-deps

lint: deps
	$(VENV)/bin/ruff check .

test: deps lint
	$(PY) -m pytest -q -p no:cacheprovider tests

demo: deps
	scripts/veth-lab demo

bench: deps
	$(PY) bench/xdp_cost.py
	$(PY) bench/engine.py
	$(PY) bench/shunt_gain.py

clean:
	rm -rf $(VENV) build *.egg-info daemon/*.egg-info
