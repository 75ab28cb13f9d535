"""A real Prometheus server for tests and labs (Debian's /usr/bin/prometheus).

It listens on 127.0.0.1 at a free port, keeps its config and TSDB in a temporary directory, and
scrapes the targets it is given (any `host:port` serving /metrics: a test's metrics server or a
live shuntd on a veth lab). `close()` (or leaving the `with`) stops the process and deletes the
directory, also when the test failed::

    with PrometheusServer(["127.0.0.1:9450"], scrape_interval="1s") as prom:
        prom.wait_for_target_up()
        value = prom.wait_for_value('shuntd_xdp_shunted_packets_total{table="flows"}', 100.0)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

PROMETHEUS = Path("/usr/bin/prometheus")
PROMTOOL = Path("/usr/bin/promtool")


def have_prometheus() -> bool:
    return PROMETHEUS.is_file() and os.access(PROMETHEUS, os.X_OK)


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now (the kernel picks it; a tiny race before it is bound is accepted)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def promtool_check_metrics(exposition: bytes) -> subprocess.CompletedProcess[str]:
    """`promtool check metrics` on exposition text (its lint output is in stdout/stderr)."""
    return subprocess.run([str(PROMTOOL), "check", "metrics"], input=exposition.decode(),
                          capture_output=True, text=True, timeout=30, check=False)


class PrometheusError(RuntimeError):
    pass


class PrometheusServer:
    """One Prometheus process scraping `targets` every `scrape_interval`."""

    def __init__(self, targets: Sequence[str], scrape_interval: str = "1s",
                 job: str = "shuntd", metrics_path: str = "/metrics",
                 startup_timeout: float = 20.0) -> None:
        if not have_prometheus():
            raise PrometheusError(f"{PROMETHEUS} is not installed")
        self.targets = list(targets)
        self.job = job
        self.dir = Path(tempfile.mkdtemp(prefix=f"m1-prom-{os.getpid()}-"))
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self._log = open(self.dir / "prometheus.log", "wb")  # closed in close()
        self._proc: subprocess.Popen[bytes] | None = None
        config = self.dir / "prometheus.yml"
        config.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": scrape_interval, "scrape_timeout": scrape_interval,
                       "evaluation_interval": scrape_interval},
            "scrape_configs": [{"job_name": job, "metrics_path": metrics_path,
                                "static_configs": [{"targets": self.targets}]}],
        }))
        try:
            self._proc = subprocess.Popen(
                [str(PROMETHEUS), f"--config.file={config}",
                 f"--storage.tsdb.path={self.dir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.dir)
            self._wait_ready(startup_timeout)
        except BaseException:
            self.close()
            raise

    # -- lifetime ------------------------------------------------------------------------------
    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise PrometheusError(f"prometheus exited with {self._proc.returncode}:\n"
                                      f"{self.log_text()}")
            try:
                with urllib.request.urlopen(f"{self.base}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise PrometheusError(f"prometheus not ready after {timeout} s:\n{self.log_text()}")

    def log_text(self) -> str:
        self._log.flush()
        try:
            return (self.dir / "prometheus.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def close(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL) and delete its directory. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if not self._log.closed:
            self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PrometheusServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- HTTP API ------------------------------------------------------------------------------
    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; returns `data` or raises PrometheusError with the API's error."""
        url = f"{self.base}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                body = json.load(r)
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: "
                                  f"{body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[tuple[dict[str, str], float]]:
        """Instant query: [(labels, value)] of the vector result."""
        data = self.api("query", query=expr)
        if data["resultType"] == "scalar":
            return [({}, float(data["result"][1]))]
        return [(item["metric"], float(item["value"][1])) for item in data["result"]]

    def query_value(self, expr: str) -> float | None:
        """The single value of `expr`, None if the result is empty."""
        result = self.query(expr)
        if not result:
            return None
        if len(result) > 1:
            raise PrometheusError(f"{expr} returned {len(result)} series, expected one")
        return result[0][1]

    def wait_for(self, expr: str, predicate: Callable[[float | None], bool],
                 timeout: float = 15.0) -> float | None:
        """Poll `expr` until predicate(value) holds; returns the value, raises on timeout."""
        deadline = time.monotonic() + timeout
        value: float | None = None
        while True:
            value = self.query_value(expr)
            if predicate(value):
                return value
            if time.monotonic() > deadline:
                raise PrometheusError(f"{expr}: last value {value} after {timeout} s")
            time.sleep(0.2)

    def wait_for_value(self, expr: str, expected: float, timeout: float = 15.0) -> float:
        value = self.wait_for(expr, lambda v: v == expected, timeout)
        assert value is not None
        return value

    def wait_for_target_up(self, timeout: float = 15.0) -> None:
        """Wait until every target was scraped successfully at least once."""
        expr = f'min(up{{job="{self.job}"}})'
        self.wait_for(expr, lambda v: v == 1.0, timeout)

    def active_targets(self) -> list[dict[str, Any]]:
        return list(self.api("targets", state="active")["activeTargets"])
