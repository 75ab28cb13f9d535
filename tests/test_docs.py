"""The documentation names what the code has: every metric family, every log field, every
command-line option with its real default, and the README's policy loads.

Each test reads a doc file and the code's own tables (field lists, the argument parser, the
metrics collector), so a metric, field or option added without a doc line fails here.
"""

from __future__ import annotations

import re

from docs_check import ROOT, documented_metrics, exposed_metrics, undocumented

DOCS = ROOT / "docs"


def _full_exposition() -> str:
    """A Metrics object with every source the daemon can pass (workers > 1, bpf stats on)."""
    from shuntd.datapath.stats import STAT_NAMES
    from shuntd.metrics import Metrics, MetricSources, ProgRunStats

    stats = {name: 1 for name in STAT_NAMES} | {"brand_new": 1}  # an unnamed stat
    m = Metrics(MetricSources(
        bpf_stats=lambda: stats,
        table_occupancy=lambda: {"flows": (1, 8), "ip_pairs": (0, 8)},
        capture_stats=lambda: {"0": (5, 0, 0), "1": (4, 0, 0)},
        connections_active=lambda: 3,
        workers=lambda: {"0": (2, 0), "1": (1, 0)},
        connections_evicted=lambda: 0,
        capture_lag=lambda: 0.0,
        log_state=lambda: {"conn": (0, 0), "shunt": (0, 0)},
        prog_run_stats=lambda: ProgRunStats(run_time_ns=1000, run_cnt=10),
    ), interface="eth0", xdp_mode="native")
    m.shunt_insert("ssl", "ok")
    m.connection_logged()
    return m.exposition().decode()


def test_metrics_md_lists_exactly_the_exposed_families():
    text = _full_exposition()
    assert undocumented(text) == []
    assert set(documented_metrics()) == set(exposed_metrics(text))


def _sections(path) -> dict[str, str]:
    out: dict[str, str] = {}
    current = ""
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            current = line[3:].strip()
        out[current] = out.get(current, "") + line + "\n"
    return out


def test_logs_md_names_every_field_in_its_log_section():
    from shuntd.conn.record import CONN_FIELDS, SHUNT_CONN_FIELDS
    from shuntd.conn.tunnels import TUNNEL_FIELDS
    from shuntd.shunting import SHUNT_LOG_FIELDS

    sections = _sections(DOCS / "logs.md")
    for section, fields in (("conn.log", CONN_FIELDS + SHUNT_CONN_FIELDS),
                            ("tunnel.log", TUNNEL_FIELDS), ("shunt.log", SHUNT_LOG_FIELDS)):
        text = sections[section]
        missing = [name for name, _type in fields if f"`{name}`" not in text
                   and not (name.startswith("id.") and "`id.*`" in text)]
        assert missing == [], f"docs/logs.md, section {section}: no {missing}"
        for name, ftype in fields:  # the type given where the field is in a table row
            for row in re.findall(rf"^\|[^|\n]*`{re.escape(name)}`[^|\n]*\| ([^|\n]+) \|", text,
                                  re.M):
                assert ftype in row.split(", "), f"{section} {name}: docs {row!r}, code {ftype}"


def _real_default(action) -> object:
    from shuntd.conn.settings import EngineSettings
    from shuntd.datapath.program import DEFAULT_FLOWS_MAX

    if action.default is None:
        if action.dest == "flows_max":
            return DEFAULT_FLOWS_MAX
        return getattr(EngineSettings(), action.dest, None)
    return action.default


def _options():
    from shuntd.cli import build_parser

    return [a for a in build_parser()._actions if a.option_strings and a.dest != "help"]


def test_every_option_has_help_and_its_stated_default_is_the_real_one():
    for action in _options():
        name = action.option_strings[-1]
        assert action.help, f"{name} has no help text (shuntd --help, the config example)"
        m = re.search(r"\((\d+(?:\.\d+)?)\)$", action.help)
        if m:
            assert float(m.group(1)) == float(_real_default(action)), \
                f"{name}: help says {m.group(1)}, default is {_real_default(action)}"


def test_operations_tuning_table_defaults_are_the_parsers():
    options = {o: a for a in _options() for o in a.option_strings}
    table = _sections(DOCS / "operations.md")["Tuning"]
    rows = re.findall(r"^\| `(--[a-z-]+)[^`]*` \| ([^|]+) \|", table, re.M)
    assert len(rows) >= 8, table
    for option, default in rows:
        assert option in options, f"docs/operations.md tuning table: no option {option}"
        real = _real_default(options[option])
        number = re.match(r"[\d,]+(?:\.\d+)?", default.strip())
        literal = re.fullmatch(r"`([^`]+)`", default.strip())
        if literal:  # written as the option's own syntax: parse it as the option would
            assert options[option].type(literal.group(1)) == real, (option, default, real)
        elif number:
            assert float(number.group().replace(",", "")) == float(real), \
                f"{option}: docs say {default.strip()}, parser default {real}"
        else:
            assert default.strip() == "off" and real in (None, False), (option, default, real)


def test_readme_policy_is_ten_lines_and_loads(tmp_path, capsys):
    from shuntd import cli
    from shuntd.events import EVENTS, HOOKS
    from shuntd.policyfile import load

    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert blocks, "README.md has no policy example"
    source = blocks[0]
    assert len(source.strip().splitlines()) <= 10
    path = tmp_path / "readme_policy.py"
    path.write_text(source)
    path.chmod(0o644)
    policy = load(str(path), EVENTS + HOOKS)
    assert policy.handlers, "the README policy defines no event handler"
    for fn in policy.handlers.values():
        assert fn.__code__.co_varnames[0] == "conn"
    # what the README tells the operator to run, and that it catches a broken file
    assert cli.main(["--check-config", "--policy", str(path)]) == 0
    path.write_text(source.replace("def bytes_threshold_crossed", "def bytes_threshold_crossed("))
    assert cli.main(["--check-config", "--policy", str(path)]) == 2
    assert "readme_policy.py: line" in capsys.readouterr().err


def test_policies_md_example_loads(tmp_path):
    from shuntd.events import EVENTS, HOOKS
    from shuntd.policyfile import load

    blocks = re.findall(r"```python\n(.*?)```", (DOCS / "policies.md").read_text(), re.S)
    assert blocks
    for i, source in enumerate(blocks):
        path = tmp_path / f"example{i}.py"
        path.write_text(source)
        path.chmod(0o644)
        assert load(str(path), EVENTS + HOOKS).handlers
