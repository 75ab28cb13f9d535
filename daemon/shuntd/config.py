"""The TOML config file (/etc/shuntd/shuntd.toml): every command-line option, nothing else.

Valid keys are derived from the argparse parser itself (each action's dest or long option,
with `-` and `_` interchangeable), and values go through the action's own `type` and
`choices`, so an option added to the parser later is configurable without touching this
module. The file only changes parser defaults; the command line still overrides it
(default < file < command line). `[policy.NAME]` tables are handed to
`policyfile.load_all(..., options=...)` untouched.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:  # Python 3.11+; Ubuntu 22.04's 3.10 gets the same parser from `tomli`
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - depends on the interpreter
    import tomli as tomllib  # type: ignore[no-redef]

DEFAULT_CONFIG_PATH = Path("/etc/shuntd/shuntd.toml")

# dests of the options that steer config handling itself: never keys of the file.
CONFIG_DESTS = frozenset({"config", "check_config", "print_default_config"})
POLICY_TABLE = "policy"

SOURCE_DEFAULT = "default"
SOURCE_COMMAND_LINE = "command line"


class ConfigError(Exception):
    """One line for the operator: which file, which key, what was expected."""


@dataclass(frozen=True)
class LoadedConfig:
    """What a config file said, already validated and converted."""

    path: Path | None  # None: no file (the default path is absent)
    options: dict[str, Any] = field(default_factory=dict)  # dest -> converted value
    policy_options: dict[str, dict[str, Any]] = field(default_factory=dict)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The three options about the config file itself."""
    g = parser.add_argument_group("configuration file")
    g.add_argument("--config", metavar="PATH", default=None,
                   help=f"TOML config file ({DEFAULT_CONFIG_PATH}; a missing default file is "
                        "fine); the command line overrides it")
    g.add_argument("--check-config", action="store_true",
                   help="validate the config and print the effective settings with their "
                        "source, then exit (0 ok, 2 error)")
    g.add_argument("--print-default-config", action="store_true",
                   help="print an example config documenting every option, then exit")


# ---------------------------------------------------------------------------------------------
# Keys


def _configurable(action: argparse.Action) -> bool:
    if action.dest in CONFIG_DESTS or action.dest == argparse.SUPPRESS:
        return False
    return not isinstance(action, argparse._HelpAction | argparse._VersionAction)


def option_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """Every action a config file may set, in the parser's order."""
    return [a for a in parser._actions if _configurable(a)]


def key_name(action: argparse.Action) -> str:
    """Canonical TOML key: the first long option without dashes, else the dest with `-`."""
    for opt in action.option_strings:
        if opt.startswith("--"):
            return opt[2:]
    return action.dest.replace("_", "-")


def _normal(key: str) -> str:
    return key.replace("_", "-")


def key_index(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Accepted key spellings (dest and long options, `-`/`_` alike) -> action."""
    index: dict[str, argparse.Action] = {}
    for action in option_actions(parser):
        index[_normal(action.dest)] = action
        for opt in action.option_strings:
            if opt.startswith("--"):
                index[_normal(opt[2:])] = action
    return index


# ---------------------------------------------------------------------------------------------
# Values


def _is_flag(action: argparse.Action) -> bool:
    return isinstance(action, argparse._StoreConstAction) and action.nargs == 0


def expected_type(action: argparse.Action) -> str:
    """What the file must hold for this key, in words (for errors and the example)."""
    if _is_flag(action):
        return "true or false"
    if isinstance(action, argparse._CountAction):
        return "an integer"
    if action.choices is not None:
        return "one of " + ", ".join(json.dumps(str(c)) for c in action.choices)
    words = {int: "an integer", float: "a number", None: "a string", str: "a string"}
    base = words.get(action.type)  # type: ignore[arg-type]
    if base is None:
        metavar = action.metavar if isinstance(action.metavar, str) else "VALUE"
        base = f"a string {metavar} (an array is joined with commas)"
    if action.nargs not in (None, "?") or isinstance(action, argparse._AppendAction):
        return f"an array of {base.removeprefix('an ').removeprefix('a ')}"
    if action.nargs == "?":
        return f"true (the option alone), false, or {base}"
    return base


def _scalar_text(value: Any) -> str:
    if isinstance(value, bool):
        raise TypeError("bool")
    if isinstance(value, str | int | float):
        return str(value)
    if isinstance(value, list) and all(
            isinstance(v, str | int | float) and not isinstance(v, bool) for v in value):
        return ",".join(str(v) for v in value)  # e.g. likely-tcp-ports = [22, 80]
    raise TypeError(type(value).__name__)


def _convert_one(action: argparse.Action, text: str) -> Any:
    converter = action.type
    value: Any = converter(text) if callable(converter) else text
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"{text!r} is not one of the choices")
    return value


def convert_value(action: argparse.Action, value: Any) -> Any:
    """Run a TOML value through the action as argparse would run the command-line text.
    Raises ValueError / TypeError / argparse.ArgumentTypeError."""
    if _is_flag(action):
        if not isinstance(value, bool):
            raise TypeError(type(value).__name__)
        return action.const if value else action.default
    if isinstance(action, argparse._CountAction):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise TypeError(type(value).__name__)
        return value
    if action.nargs == "?" and isinstance(value, bool):   # e.g. bare = true: `--bare` alone
        return action.const if value else action.default
    many = action.nargs not in (None, "?") or isinstance(action, argparse._AppendAction)
    if many:
        if not isinstance(value, list):
            raise TypeError(type(value).__name__)
        return [_convert_one(action, _scalar_text(v)) for v in value]
    return _convert_one(action, _scalar_text(value))


# ---------------------------------------------------------------------------------------------
# The file


def check_permissions(path: Path, st: os.stat_result | None = None) -> None:
    """Refuse a file others could have written: it decides what the sensor stops seeing."""
    st = st or os.stat(path)
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(
            f"{path}: refusing a config file writable by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}): run `chmod go-w {path}`")
    if os.geteuid() == 0 and st.st_uid != 0:
        raise ConfigError(
            f"{path}: refusing a config file not owned by root (owner uid {st.st_uid}) while "
            f"running as root: run `chown root: {path}`")


def _read(path: Path, explicit: bool) -> dict[str, Any] | None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"{path}: config file not found") from None
        return None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot open config file: {exc.strerror}") from None
    try:
        st = os.fstat(fd)  # checked on the very file we read (no swap in between)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path}: not a regular file")
        check_permissions(path, st)
        with os.fdopen(fd, "rb", closefd=False) as f:
            raw = f.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    finally:
        os.close(fd)
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def _policy_tables(path: Path, value: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise ConfigError(f"{path}: [{POLICY_TABLE}] must only hold tables "
                          f"[{POLICY_TABLE}.NAME] (one per policy)")
    return {name: dict(table) for name, table in value.items()}


def load_config(parser: argparse.ArgumentParser, path: Path | str | None) -> LoadedConfig:
    """Read and validate a config file against `parser`. `path` None means the default path,
    which may be absent; an explicit path must exist. Raises ConfigError."""
    explicit = path is not None
    file = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    data = _read(file, explicit)
    if data is None:
        return LoadedConfig(None)
    index = key_index(parser)
    options: dict[str, Any] = {}
    policies: dict[str, dict[str, Any]] = {}
    seen: dict[str, str] = {}
    for key, value in data.items():
        if key == POLICY_TABLE:
            policies = _policy_tables(file, value)
            continue
        action = index.get(_normal(key))
        if action is None:
            what = "table" if isinstance(value, dict) else "key"
            raise ConfigError(f"{file}: unknown {what} {key!r} (see `shuntd "
                              f"--print-default-config` for every valid key)")
        if action.dest in seen:
            raise ConfigError(f"{file}: {key!r} sets the same option as {seen[action.dest]!r}")
        seen[action.dest] = key
        try:
            options[action.dest] = convert_value(action, value)
        except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
            detail = f" ({exc})" if not isinstance(exc, TypeError) else ""
            raise ConfigError(f"{file}: bad value {_toml(value)} for {key!r}: expected "
                              f"{expected_type(action)}{detail}") from None
    return LoadedConfig(file, options, policies)


# ---------------------------------------------------------------------------------------------
# Parsing with the file


def _pre_parse(argv: Sequence[str]) -> argparse.Namespace:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    pre.add_argument("--print-default-config", action="store_true")
    return pre.parse_known_args(list(argv))[0]


def command_line_dests(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """dests given on the command line (parsed again with every default suppressed)."""
    actions = parser._actions
    saved = [(a, a.default, a.required) for a in actions]
    saved_defaults = dict(parser._defaults)
    try:
        for a in actions:
            a.default = argparse.SUPPRESS
            a.required = False
        parser._defaults.clear()
        ns, _ = parser.parse_known_args(list(argv))
    finally:
        for a, default, required in saved:
            a.default, a.required = default, required
        parser._defaults.update(saved_defaults)
    return set(vars(ns))


@dataclass(frozen=True)
class Effective:
    """The parsed arguments, the file they came with and where each setting came from."""

    args: argparse.Namespace
    config: LoadedConfig
    sources: dict[str, str]  # dest -> "default" / "config PATH" / "command line"


def parse_with_config(parser: argparse.ArgumentParser,
                      argv: Sequence[str] | None) -> Effective:
    """Parse argv over the config file's values. Raises ConfigError; argparse itself exits 2
    on command-line errors as usual."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    pre = _pre_parse(argv)
    if pre.print_default_config:  # needs no file and no required option
        return Effective(argparse.Namespace(print_default_config=True), LoadedConfig(None), {})
    loaded = load_config(parser, pre.config)
    parser.set_defaults(**loaded.options)
    for action in parser._actions:
        if action.dest in loaded.options:
            action.required = False  # the file provides it
    args = parser.parse_args(argv)
    given = command_line_dests(parser, argv)
    sources: dict[str, str] = {}
    for action in option_actions(parser):
        if action.dest in given:
            sources[action.dest] = SOURCE_COMMAND_LINE
        elif action.dest in loaded.options:
            sources[action.dest] = f"config {loaded.path}"
        else:
            sources[action.dest] = SOURCE_DEFAULT
    return Effective(args, loaded, sources)


# ---------------------------------------------------------------------------------------------
# Output


def _toml(value: Any) -> str:
    """A value as TOML text (close enough for display of converted values)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, dict):
        items = ", ".join(f"{json.dumps(str(k))} = {_toml(v)}" for k, v in sorted(value.items()))
        return "{ " + items + " }" if items else "{}"
    if isinstance(value, frozenset | set):
        return "[" + ", ".join(_toml(v) for v in sorted(value)) + "]"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if value is None:
        return "(unset)"
    return json.dumps(str(value))


def render_effective(parser: argparse.ArgumentParser, eff: Effective) -> str:
    """`--check-config` output: every setting, sorted, with its source."""
    lines = [f"# config file: {eff.config.path or f'{DEFAULT_CONFIG_PATH} (absent)'}"]
    rows = sorted((key_name(a), a.dest) for a in option_actions(parser))
    for key, dest in rows:
        value = getattr(eff.args, dest, None)
        prefix = "# " if value is None else ""
        lines.append(f"{prefix}{key} = {_toml(value)}  # {eff.sources.get(dest, 'default')}")
    for name, table in sorted(eff.config.policy_options.items()):
        lines.append(f"\n[{POLICY_TABLE}.{name}]  # config {eff.config.path}")
        lines.extend(f"{json.dumps(k) if not k.isidentifier() else k} = {_toml(v)}"
                     for k, v in sorted(table.items()))
    return "\n".join(lines)


def _wrap(text: str, width: int = 96) -> Iterable[str]:
    line = "#"
    for word in text.split():
        if len(line) + 1 + len(word) > width:
            yield line
            line = "#"
        line += " " + word
    if line != "#":
        yield line


def example_config(parser: argparse.ArgumentParser) -> str:
    """An example file documenting every option, each line commented out (so it changes
    nothing as is). Shipped as systemd/shuntd.toml.example; a test keeps them equal."""
    out = [
        f"# shuntd configuration ({DEFAULT_CONFIG_PATH}). Generated by "
        "`shuntd --print-default-config`:",
        "# do not edit the example by hand. Every key is a command-line option (long name; `-`",
        "# and `_` are alike); the command line overrides this file. Uncomment to change.",
        "# The file must not be writable by group/others and, for root, must be owned by root.",
    ]
    groups = [(g.title or "options", g._group_actions) for g in parser._action_groups]
    for title, actions in groups:
        chosen = [a for a in actions if _configurable(a)]
        if not chosen:
            continue
        out.append("")
        out.append(f"## {title}")
        for action in chosen:
            out.append("")
            flag = ", ".join(action.option_strings) or action.dest
            help_text = (action.help or "").replace("%(default)s", str(action.default))
            if help_text and help_text != argparse.SUPPRESS:
                out.extend(_wrap(help_text))
            out.append(f"# ({flag}; {expected_type(action)})")
            key = key_name(action)
            if action.default is None or action.default == argparse.SUPPRESS:
                metavar = action.metavar if isinstance(action.metavar, str) else "VALUE"
                out.append(f"#{key} = ...  ({metavar}; unset by default)")
            else:
                out.append(f"#{key} = {_toml(action.default)}")
    out.append("")
    out.append("## policy options: one table per policy (file stem), passed to its configure()")
    out.append("#[policy.NAME]")
    out.append("#some_option = 1")
    return "\n".join(out) + "\n"
