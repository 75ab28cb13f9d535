"""Parsers for what the docs claim, shared by tests/test_docs.py and the live metrics test.

docs/metrics.md has one table row per metric family: `| `name` | type | `label`, ... | meaning |`.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METRICS_MD = ROOT / "docs" / "metrics.md"

_ROW = re.compile(r"^\| `(shuntd_[a-z0-9_]+)` \| ([a-z]+) \|([^|]*)\|")
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? ")


def documented_metrics() -> dict[str, tuple[str, frozenset[str]]]:
    """{family name: (type, label names)} from docs/metrics.md's table."""
    out = {}
    for line in METRICS_MD.read_text().splitlines():
        m = _ROW.match(line)
        if m:
            assert m.group(1) not in out, f"{m.group(1)} listed twice in docs/metrics.md"
            out[m.group(1)] = (m.group(2), frozenset(re.findall(r"`([a-z_]+)`", m.group(3))))
    return out


def exposed_metrics(text: str) -> dict[str, tuple[str, frozenset[str] | None]]:
    """{family: (type, label names or None when the family has no sample)} of a Prometheus
    text exposition, without prometheus-client's `_created` companions of counters."""
    types: dict[str, str] = {}
    labels: dict[str, set[str]] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            types[name] = kind
        elif line and not line.startswith("#"):
            m = _SAMPLE.match(line)
            assert m, line
            names = set(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="', m.group(2) or ""))
            labels.setdefault(m.group(1), set()).update(names)
    out: dict[str, tuple[str, frozenset[str] | None]] = {}
    for name, kind in types.items():
        if name.endswith("_created") and types.get(name[:-len("_created")] + "_total"):
            continue
        seen = labels.get(name)
        out[name] = (kind, None if seen is None else frozenset(seen))
    return out


def undocumented(text: str) -> list[str]:
    """Families of an exposition missing from docs/metrics.md or listed there with another type
    or other labels (one line each; empty when the docs are right)."""
    docs = documented_metrics()
    problems = []
    for name, (kind, labels) in sorted(exposed_metrics(text).items()):
        if name not in docs:
            problems.append(f"{name} ({kind}) is exposed but not in docs/metrics.md")
            continue
        dkind, dlabels = docs[name]
        if dkind != kind:
            problems.append(f"{name}: docs say {dkind}, exposed as {kind}")
        if labels is not None and labels != dlabels:
            problems.append(f"{name}: docs list labels {sorted(dlabels)}, exposed {sorted(labels)}")
    return problems
