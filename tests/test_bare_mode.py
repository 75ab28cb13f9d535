"""Bare mode (`shuntd --bare`, config `bare = true`), like `zeek -b`: no protocol analysers,
so no service and no copy of TCP payload for them; the connection fields stay Zeek's."""

from __future__ import annotations

from pathlib import Path

import pytest
from shuntd import cli
from shuntd.conn.tracker import ConnTracker
from shuntd.eventopts import dispatcher_from_args

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "zeek"
# One HTTP CONNECT carrying TLS: Zeek's baseline service is "http,ssl".
TRACE = CORPUS / "core" / "http.http-connect-with-header" / "trace.pcap"

pytestmark = pytest.mark.skipif(not TRACE.is_file(), reason="../shared/corpus is absent")


def _conn_rows(log_dir: Path) -> list[dict[str, str]]:
    fields: list[str] = []
    rows = []
    for line in (log_dir / "conn.log").read_text().splitlines():
        if line.startswith("#fields\t"):
            fields = line.split("\t")[1:]
        elif line and not line.startswith("#"):
            rows.append(dict(zip(fields, line.split("\t"), strict=True)))
    return rows


def _run(tmp_path: Path, name: str, *extra: str) -> list[dict[str, str]]:
    out = tmp_path / name
    assert cli.main(["-r", str(TRACE), "-C", "--log-dir", str(out), "--no-conn-long",
                     *extra]) == 0
    return _conn_rows(out)


def _without_service(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if k not in ("uid", "service")} for r in rows]


def test_bare_switches_service_detection_off(tmp_path: Path) -> None:
    full = _run(tmp_path, "full")
    bare = _run(tmp_path, "bare", "--bare")
    only_http = _run(tmp_path, "http", "--bare", "http")
    assert [r["service"] for r in full] == ["http,ssl"]
    assert [r["service"] for r in bare] == ["-"]
    assert [r["service"] for r in only_http] == ["http"]
    # Everything but the service is the same connection.
    assert _without_service(bare) == _without_service(full) == _without_service(only_http)


def test_bare_from_the_config_file(tmp_path: Path) -> None:
    conf = tmp_path / "shuntd.toml"
    conf.write_text("bare = true\n")
    rows = _run(tmp_path, "conf", "--config", str(conf))
    assert [r["service"] for r in rows] == ["-"]
    conf.write_text('bare = "http"\n')
    rows = _run(tmp_path, "conf2", "--config", str(conf))
    assert [r["service"] for r in rows] == ["http"]


@pytest.mark.parametrize("argv,wants_stream", [
    ([], True),
    (["--bare"], False),                          # nobody reads TCP payload: not copied
    (["--bare", "http"], True),
    (["--bare", "--extract-contents"], True),     # contents extraction still needs it
])
def test_bare_mode_skips_the_tcp_stream(tmp_path: Path, argv: list[str],
                                        wants_stream: bool) -> None:
    args = cli.build_parser().parse_args(["-r", "x", "--no-conn-long", *argv])
    events = dispatcher_from_args(args, str(tmp_path), "tsv")
    try:
        tracker = ConnTracker(cli.settings_from_args(args), hooks=events.dispatcher)
        assert tracker.want_stream is wants_stream
        if argv == ["--bare"]:
            assert tracker.settings.likely_tcp_ports == frozenset()   # `zeek -b`: none
    finally:
        events.close()
