"""Load policy files: plain Python modules whose functions are named after engine events.

The core never imports a policy by name; it loads files the operator points at (`--policy PATH`,
repeatable) and hands their event functions to the dispatcher. A file that cannot be loaded is a
one-line `PolicyLoadError`, never a traceback.

A policy may declare `EARLY_SHUNT = "TRIGGER"` (module level): it shunts every connection at
`ssl_established` with that trigger, unconditionally. The daemon then lets XDP follow TLS
handshakes and shunt at the same packet itself (early shunts, `--early-port`) and adopts those
entries as the policy's own shunts. Files writable by anyone but their owner, or owned
by someone other than root when running as root, are refused: whoever can write a policy decides
what the sensor stops seeing.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import stat
import sys
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The shipped policies: `policies/` at the top of the repository, symlinked into the package.
SHIPPED_DIR = Path(__file__).resolve().parent / "policies"
DEFAULT_POLICIES = ("tls", "bulk")


class PolicyLoadError(Exception):
    """A policy file is missing, unsafe, or does not compile/import."""


@dataclass
class Policy:
    """One loaded policy file and the event functions it defines."""

    name: str
    path: Path
    module: types.ModuleType
    handlers: dict[str, Callable[..., Any]] = field(default_factory=dict)
    early_shunt: str | None = None  # the EARLY_SHUNT declaration: its trigger


EARLY_SHUNT_EVENT = "ssl_established"


def _early_shunt(path: Path, module: types.ModuleType,
                 handlers: dict[str, Callable[..., Any]]) -> str | None:
    """The file's EARLY_SHUNT declaration, checked (None: none)."""
    value = getattr(module, "EARLY_SHUNT", None)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or value != value.strip():
        raise PolicyLoadError(f"policy {path}: EARLY_SHUNT must be a trigger name (a non-empty "
                              f"string without surrounding spaces), not {value!r}")
    if EARLY_SHUNT_EVENT not in handlers:
        raise PolicyLoadError(f"policy {path}: EARLY_SHUNT = {value!r} declares a shunt at "
                              f"{EARLY_SHUNT_EVENT}, but the file has no {EARLY_SHUNT_EVENT}()")
    return value


def early_trigger(policies: Iterable[Policy]) -> str | None:
    """The one trigger the loaded policies declare with EARLY_SHUNT (None: none does);
    two different ones are an error (XDP shunts early with one trigger)."""
    declared = {p.early_shunt: p for p in policies if p.early_shunt is not None}
    if len(declared) > 1:
        names = ", ".join(f"{p.path} ({t!r})" for t, p in sorted(declared.items()))
        raise PolicyLoadError(f"policies declare different EARLY_SHUNT triggers: {names}; "
                              "only one is possible")
    return next(iter(declared), None)


def resolve(spec: str) -> Path:
    """`tls` names a shipped policy; anything with a slash or `.py` is a path."""
    if os.sep not in spec and not spec.endswith(".py"):
        return SHIPPED_DIR / f"{spec}.py"
    return Path(spec).expanduser()


def check_permissions(path: Path) -> None:
    """Refuse policy files that someone other than root (or their owner) could change."""
    st = path.stat()
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PolicyLoadError(
            f"policy {path}: writable by group or others (mode {stat.S_IMODE(st.st_mode):o}); "
            f"fix with: chmod go-w {path}"
        )
    if os.geteuid() == 0 and st.st_uid != 0:
        raise PolicyLoadError(
            f"policy {path}: owned by uid {st.st_uid}, not root; a policy decides what the sensor "
            f"stops seeing, so it must be root's: chown root {path}"
        )


def load(spec: str, events: Iterable[str], options: dict[str, Any] | None = None) -> Policy:
    """Load one policy file and collect its functions named after `events`.

    If the file defines `configure(options)`, it is called with `options` (the policy's table
    from the config file, `{}` when there is none) before any event reaches it.
    """
    path = resolve(spec)
    if not path.is_file():
        raise PolicyLoadError(f"policy {spec}: no such file {path}")
    check_permissions(path)
    name = path.stem
    # A unique module name per path so two files called tls.py do not collide on reload.
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
    modname = f"shuntd_policy_{name}_{digest}"
    try:
        source = path.read_text()
        code = compile(source, str(path), "exec")
    except SyntaxError as exc:
        raise PolicyLoadError(f"policy {path}: line {exc.lineno}: {exc.msg}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyLoadError(f"policy {path}: cannot read: {exc}") from None
    spec_obj = importlib.util.spec_from_file_location(modname, path)
    assert spec_obj is not None
    module = importlib.util.module_from_spec(spec_obj)
    try:
        exec(code, module.__dict__)
    except Exception as exc:  # noqa: BLE001 - any error in the file is the operator's to fix
        raise PolicyLoadError(
            f"policy {path}: failed to load: {type(exc).__name__}: {exc}"
        ) from None
    sys.modules.pop(modname, None)
    configure = getattr(module, "configure", None)
    if callable(configure):
        try:
            configure(dict(options or {}))
        except Exception as exc:  # noqa: BLE001 - bad policy options are the operator's to fix
            raise PolicyLoadError(
                f"policy {path}: configure() rejected its options: {type(exc).__name__}: {exc}"
            ) from None
    wanted = set(events)
    handlers = {
        ev: fn for ev in wanted if callable(fn := getattr(module, ev, None))
    }
    return Policy(name=name, path=path, module=module, handlers=handlers,
                  early_shunt=_early_shunt(path, module, handlers))


def load_all(
    specs: Iterable[str],
    events: Iterable[str],
    options: dict[str, dict[str, Any]] | None = None,
) -> list[Policy]:
    """Load several policies (the shipped defaults when `specs` is empty); `options` maps a
    policy's name (file stem) to its configuration table."""
    event_names = list(events)
    specs = list(specs) or list(DEFAULT_POLICIES)
    options = options or {}
    policies = [load(s, event_names, options.get(resolve(s).stem)) for s in specs]
    early_trigger(policies)  # two different EARLY_SHUNT triggers: refused here
    return policies
