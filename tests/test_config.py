"""The TOML config file: precedence, every error path, permissions, the shipped example."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import tomllib
from shuntd import cli, config

EXAMPLE = Path(__file__).resolve().parents[1] / "systemd" / "shuntd.toml.example"


@pytest.fixture(autouse=True)
def no_default_file(tmp_path, monkeypatch):
    """Never read the machine's /etc/shuntd/shuntd.toml in tests."""
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", tmp_path / "absent" / "shuntd.toml")


def write(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "shuntd.toml"
    path.write_text(text)
    os.chmod(path, mode)
    return path


def parse(argv: list[str]) -> config.Effective:
    return config.parse_with_config(cli.build_parser(), argv)


def error_of(tmp_path: Path, text: str, mode: int = 0o600) -> str:
    path = write(tmp_path, text, mode)
    with pytest.raises(config.ConfigError) as info:
        parse(["--config", str(path), "-r", "t.pcap"])
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_precedence_default_file_command_line(tmp_path):
    path = write(tmp_path, 'tcp-inactivity-timeout = 120\nudp_inactivity_timeout = 30.5\n'
                           'log-format = "json"\nread = "from-file.pcap"\n'
                           'ignore-checksums = true\n')
    eff = parse(["--config", str(path), "--udp-inactivity-timeout", "7"])
    args = eff.args
    assert args.tcp_inactivity_timeout == 120.0  # file
    assert args.udp_inactivity_timeout == 7.0  # command line beats file
    assert args.log_format == "json" and args.read == "from-file.pcap"  # required, from file
    assert args.ignore_checksums is True
    assert args.log_dir == "."  # default
    assert eff.sources["tcp_inactivity_timeout"] == f"config {path}"
    assert eff.sources["udp_inactivity_timeout"] == "command line"
    assert eff.sources["log_dir"] == "default"


def test_missing_default_file_is_fine_explicit_is_an_error(tmp_path):
    eff = parse(["-r", "t.pcap"])
    assert eff.config.path is None and eff.args.read == "t.pcap"
    with pytest.raises(config.ConfigError, match="config file not found"):
        parse(["--config", str(tmp_path / "nope.toml"), "-r", "t.pcap"])


def test_mixed_spellings_arrays_and_policy_tables(tmp_path):
    path = write(tmp_path, 'tcp_SYN_timeout = 9\nlikely-tcp-ports = [22, 80]\n'
                           '[policy.elephant]\nbytes = 1000000\n[policy.tls]\nmode = "x"\n')
    eff = parse(["--config", str(path), "-r", "t.pcap"])
    assert eff.args.tcp_SYN_timeout == 9.0
    assert eff.args.likely_tcp_ports == frozenset({22, 80})
    assert eff.config.policy_options == {"elephant": {"bytes": 1000000}, "tls": {"mode": "x"}}


@pytest.mark.parametrize("text, words", [
    ("bogus = 1\n", ["unknown key 'bogus'"]),
    ("[engine]\nx = 1\n", ["unknown table 'engine'"]),
    ('tcp-inactivity-timeout = "soon"\n', ["'tcp-inactivity-timeout'", "SECS"]),
    ("tcp-inactivity-timeout = -1\n", ["'tcp-inactivity-timeout'", ">= 0"]),
    ("tcp-inactivity-timeout = true\n", ["'tcp-inactivity-timeout'", "expected"]),
    ('log-format = "xml"\n', ["'log-format'", 'one of "tsv", "json"']),
    ('ignore-checksums = "yes"\n', ["'ignore-checksums'", "true or false"]),
    ("likely-udp-ports = [70000]\n", ["'likely-udp-ports'", "out of range"]),
    ("log-dir = { a = 1 }\n", ["'log-dir'", "a string"]),
    ("tcp-syn-timeout = 1\ntcp_SYN_timeout = 2\n", ["same option"]),
    ("policy = 3\n", ["[policy.NAME]"]),
    ("config = '/x'\n", ["unknown key 'config'"]),
    ("read = [\n", ["invalid TOML"]),
])
def test_bad_files_name_the_key_the_file_and_the_expected_type(tmp_path, text, words):
    message = error_of(tmp_path, text)
    for word in words:
        assert word in message


def test_permissions(tmp_path):
    assert "writable by group or others" in error_of(tmp_path, "", mode=0o664)
    assert "writable by group or others" in error_of(tmp_path, "", mode=0o602)
    if os.geteuid() == 0:
        path = write(tmp_path, "")
        os.chown(path, 65534, 65534)
        with pytest.raises(config.ConfigError, match="not owned by root"):
            parse(["--config", str(path), "-r", "t.pcap"])


def test_check_config_prints_sorted_settings_with_sources(tmp_path, capsys):
    path = write(tmp_path, "tcp-inactivity-timeout = 120\n[policy.p]\nn = 1\n")
    rc = cli.main(["--config", str(path), "--check-config", "-r", "t.pcap",
                   "--tcp-syn-timeout", "3"])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"tcp-inactivity-timeout = 120.0  # config {path}" in out
    assert "tcp-syn-timeout = 3.0  # command line" in out
    assert 'log-format = "tsv"  # default' in out
    assert "[policy.p]" in out and "n = 1" in out
    keys = [m.group(1) for m in re.finditer(r"^(?:# )?([a-z][\w-]*) = ", out, re.M)]
    assert keys[: len(keys) - 1] == sorted(keys[: len(keys) - 1])  # last one: policy's n


def test_check_config_error_is_one_line_and_exit_2(tmp_path, capsys):
    path = write(tmp_path, "nope = 1\n")
    assert cli.main(["--config", str(path), "--check-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown key 'nope'" in err


def test_shipped_example_is_generated_parses_and_covers_every_option(capsys, monkeypatch):
    monkeypatch.undo()  # the example names the real default path
    assert cli.main(["--print-default-config"]) == 0
    generated = capsys.readouterr().out
    shipped = EXAMPLE.read_text()
    assert shipped == generated, "regenerate: shuntd --print-default-config > " + str(EXAMPLE)
    tomllib.loads(shipped)
    parser = cli.build_parser()
    keys = set(re.findall(r"^#([a-z][a-z0-9-]*) = ", shipped, re.M))
    assert keys == {config.key_name(a) for a in config.option_actions(parser)}
    # Uncommenting every line that shows a default gives a valid file meaning the defaults.
    active = "\n".join(line[1:] for line in shipped.splitlines()
                       if re.match(r"^#[a-z][a-z0-9-]* = [^.]", line))
    data = tomllib.loads(active)
    assert data
    for key, value in data.items():
        action = config.key_index(parser)[key]
        assert config.convert_value(action, value) == action.default
