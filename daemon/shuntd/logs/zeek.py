"""Zeek log writers: ASCII/TSV exactly like Zeek's default writer, and JSON (`use_json=T`).

Every formatting rule of our logs lives here (spec zeek-conn.md §8): header lines, escaping,
`-` / `(empty)`, `%.6f` times and intervals, RapidJSON number text, flattened field names.

Values are passed as one tuple in schema order: None = unset, sets as set/list/tuple
(an empty one prints `(empty)`), floats for time/interval/double, bools, ints, str. Address
fields take text, or packed bytes (4 or 16) which are formatted like Zeek does.

A record is formatted completely before anything is written, and the file only ever
receives whole lines (one `os.write` of complete lines), so a crash never leaves half a line.

Disk full (ENOSPC, EDQUOT, EFBIG) never loses a record silently. The policy: log one error,
truncate a partly written line away, hold the unwritten lines in memory (at most `hold_max`
bytes per log), retry at most once a second (on the next write or `tick()`), log when they are
written again. Past the bound the writer raises `LogSpaceError`, which the daemon turns into a
loud non-zero exit; `close()` makes a last attempt and logs how many records it could not write.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from operator import itemgetter
from pathlib import Path
from typing import Any

SEPARATOR = "\t"
SET_SEPARATOR = ","
EMPTY_FIELD = "(empty)"
UNSET_FIELD = "-"
OPEN_CLOSE_FORMAT = "%Y-%m-%d-%H-%M-%S"

DISK_FULL_ERRNOS = frozenset((errno.ENOSPC, errno.EDQUOT, errno.EFBIG))
RETRY_EVERY = 1.0                 # seconds between write attempts while the disk is full
DEFAULT_HOLD_BYTES = 64 << 20     # per log: unwritten lines held in memory while it is full

log = logging.getLogger("shuntd.logs")


class LogSpaceError(BaseException):
    """The disk stayed full and the held records passed the bound: the daemon must stop.

    A BaseException so that no handler isolation (`except Exception` around policies and
    removal hooks, which write shunt.log) can swallow it: stopping loudly is the policy."""

_SET_TYPE_PREFIXES = ("set[", "vector[")
_TIME_TYPES = frozenset(("time", "interval"))
_COUNT_TYPES = frozenset(("count", "int", "port"))


@dataclass(frozen=True)
class LogSchema:
    """One log stream: its `#path` and its `(name, zeek_type)` columns, in `#fields` order."""

    path: str
    fields: list[tuple[str, str]]
    names: tuple[str, ...] = field(init=False)
    types: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        if not self.path or "/" in self.path or self.path.startswith("."):
            raise ValueError(f"bad log path {self.path!r}")
        names = tuple(n for n, _t in self.fields)
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate field names in log {self.path!r}")
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "types", tuple(t for _n, t in self.fields))


# ---- value rendering shared by both formats ------------------------------------------------

def addr_text(packed: bytes) -> str:
    """Packed IPv4/IPv6 address as Zeek prints it (IPv4-mapped IPv6 prints as IPv4)."""
    if len(packed) == 4:
        return socket.inet_ntoa(bytes(packed))
    if len(packed) != 16:
        raise ValueError(f"address must be 4 or 16 bytes, not {len(packed)}")
    if packed[:12] == b"\x00" * 10 + b"\xff\xff":
        return socket.inet_ntoa(bytes(packed[12:]))
    return _ntop6(packed)


def _ntop6(src: bytes) -> str:
    """Zeek's `zeek_inet_ntop6` (BSD inet_ntop with IPv4-translated forms), rule for rule."""
    words = [(src[i] << 8) | src[i + 1] for i in range(0, 16, 2)]
    best_base, best_len = -1, 0
    cur_base, cur_len = -1, 0
    for i, w in enumerate(words):
        if w == 0:
            if cur_base == -1:
                cur_base, cur_len = i, 1
            else:
                cur_len += 1
        elif cur_base != -1:
            if best_base == -1 or cur_len > best_len:
                best_base, best_len = cur_base, cur_len
            cur_base = -1
    if cur_base != -1 and (best_base == -1 or cur_len > best_len):
        best_base, best_len = cur_base, cur_len
    if best_base != -1 and best_len < 2:
        best_base = -1
    out: list[str] = []
    for i in range(8):
        if best_base != -1 and best_base <= i < best_base + best_len:
            if i == best_base:
                out.append(":")
            continue
        if i != 0:
            out.append(":")
        if i == 6 and best_base == 0 and (
            best_len == 6
            or (best_len == 7 and words[7] != 1)
            or (best_len == 5 and words[5] == 0xFFFF)
            or (best_len == 4 and words[4] == 0xFFFF and words[5] == 0)
        ):
            out.append(socket.inet_ntoa(bytes(src[12:])))
            break
        out.append(f"{words[i]:x}")
    if best_base != -1 and best_base + best_len == 8:
        out.append(":")
    return "".join(out)


def _escape_bytes_run(s: str) -> str:
    """Slow path of `escape_text`: per character, Zeek's `get_escaped_string` + UTF-8 rule."""
    out: list[str] = []
    for ch in s:
        o = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif 0x20 <= o < 0x7F:
            out.append(ch)
        elif o < 0x80:
            out.append(f"\\x{o:02x}")
        elif 0xDC80 <= o <= 0xDCFF:   # undecodable byte carried by surrogateescape
            out.append(f"\\x{o - 0xDC00:02x}")
        elif 0xD800 <= o <= 0xDFFF:   # lone surrogate: not valid UTF-8, escape its bytes
            out.extend(f"\\x{b:02x}" for b in ch.encode("utf-8", "surrogatepass"))
        else:
            out.append(ch)            # valid multi-byte UTF-8 is written raw
    return "".join(out)


def escape_text(value: str | bytes, in_set: bool = False) -> str:
    """A string/enum value as Zeek's ASCII writer prints it (not for header lines)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        value = bytes(value).decode("utf-8", "surrogateescape")
    if not value:
        return EMPTY_FIELD
    if value.isascii() and value.isprintable() and "\\" not in value:
        s = value
    else:
        s = _escape_bytes_run(value)
    if in_set and SET_SEPARATOR in s:
        s = s.replace(SET_SEPARATOR, "\\x2c")
    if s == UNSET_FIELD:
        return "\\x2d"
    if s == EMPTY_FIELD:
        return "\\x28empty)"
    return s


def double_text(x: float) -> str:
    """Zeek's `double` in ASCII logs: fixed, at most 6 decimals, trailing zeros dropped."""
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    s = format(x, ".6f").rstrip("0")
    return s + "0" if s.endswith(".") else s


def json_number(x: float) -> str:
    """RapidJSON `Writer::Double` text: shortest digits, fixed unless very large/small."""
    if math.isnan(x) or math.isinf(x):
        return "null"
    if x == 0:
        return "-0.0" if math.copysign(1.0, x) < 0 else "0.0"
    sign = "-" if x < 0 else ""
    r = repr(abs(x))
    mant, _, exp_s = r.partition("e")
    exp = int(exp_s) if exp_s else 0
    int_part, _, frac_part = mant.partition(".")
    if frac_part == "0":
        frac_part = ""
    digits = (int_part + frac_part).lstrip("0")
    # value = int(int_part + frac_part) * 10**(exp - len(frac_part))
    k = exp - len(frac_part)
    stripped = digits.rstrip("0")
    k += len(digits) - len(stripped)
    digits = stripped
    length = len(digits)
    kk = length + k  # value = 0.d1d2... * 10**kk
    if 0 <= k and kk <= 21:
        body = digits + "0" * k + ".0"
    elif 0 < kk <= 21:
        body = digits[:kk] + "." + digits[kk:]
    elif -6 < kk <= 0:
        body = "0." + "0" * (-kk) + digits
    elif length == 1:
        body = f"{digits}e{kk - 1}"
    else:
        body = f"{digits[0]}.{digits[1:]}e{kk - 1}"
    return sign + body


def _json_string(value: str | bytes) -> str:
    """JSON string with Zeek's HEX escape policy (bad bytes become the text `\\xNN`)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        value = bytes(value).decode("utf-8", "surrogateescape")
    if value.isascii() and value.isprintable() and "\\" not in value:
        return json.dumps(value)
    parts: list[str] = []
    for ch in value:
        o = ord(ch)
        if ch in "\b\f\n\r\t" or o >= 0x20 and o != 0x7F and not 0xD800 <= o <= 0xDFFF:
            parts.append(ch)
        elif 0xDC80 <= o <= 0xDCFF:
            parts.append(f"\\x{o - 0xDC00:02x}")
        elif 0xD800 <= o <= 0xDFFF:
            parts.extend(f"\\x{b:02x}" for b in ch.encode("utf-8", "surrogatepass"))
        else:
            parts.append(f"\\x{o:02x}")
    return json.dumps("".join(parts), ensure_ascii=False)


def _header_escape(value: str) -> str:
    """Header values: only whitespace/non-printable bytes are escaped."""
    return "".join(ch if ch.isprintable() and not ch.isspace() else f"\\x{ord(ch):02x}"
                   for ch in value)


# ---- writers ---------------------------------------------------------------------------------

class LogWriter:
    """One open log file. Created on the first `write` (Zeek writes no file for no records)."""

    def __init__(self, directory: str | Path, schema: LogSchema, fmt: str = "tsv",
                 buffered: bool = False, json_include_unset: bool = False,
                 hold_max: int = DEFAULT_HOLD_BYTES) -> None:
        if fmt not in ("tsv", "json"):
            raise ValueError(f"log format must be 'tsv' or 'json', not {fmt!r}")
        self.schema = schema
        self.fmt = fmt
        self.path = Path(directory) / f"{schema.path}.log"
        self.buffered = buffered
        self.json_include_unset = json_include_unset
        self.records = 0
        self.hold_max = hold_max
        self.full = False          # the last write attempt hit a full disk
        self.write_errors = 0      # disk-full write attempts (metric)
        self.unwritten = 0         # records given up at close (disk still full)
        self._held = bytearray()   # encoded lines not yet in the file (disk full)
        self._size = 0             # bytes of whole lines in the file
        self._last_try = 0.0
        self._full_since = 0.0
        self._fd: int | None = None
        self._pending: list[str] = []
        self._pending_bytes = 0
        self._closed = False
        self._reopened = False     # opened again after `reopen`: append, never truncate
        self._render = self._tsv_line if fmt == "tsv" else self._json_line
        self._kinds = tuple(_kind(t) for t in schema.types)
        self._tsv_fns = tuple(_tsv_renderer(k) for k in self._kinds)
        # TSV lines of the usual value types come from one %-format template per tuple of
        # value types (see _tsv_template), made on first use.
        self._templates: dict[tuple[type, ...], tuple[str, Any] | None] = {}
        self._json_keys = tuple(json.dumps(n) + ":" for n in schema.names)

    # -- public -----------------------------------------------------------------------------
    def write(self, values: Sequence[Any]) -> None:
        """Format one record (values in schema order) and append it as one whole line."""
        if self._closed:
            raise ValueError(f"{self.path}: write after close")
        if len(values) != len(self._kinds):
            raise ValueError(
                f"{self.schema.path}: {len(values)} values for {len(self._kinds)} fields"
            )
        try:
            line = self._render(values)
        except (TypeError, ValueError, OverflowError) as exc:
            raise ValueError(self._bad_value(values, exc)) from None
        if self._fd is not None and not self.buffered and not self.full and not self._pending:
            self.records += 1   # the usual case: straight to the file
            self._write_out(line.encode("utf-8", "surrogateescape"))
            return
        if self._fd is None and not self.full:
            self._try_open()
        self._pending.append(line)
        self._pending_bytes += len(line)
        self.records += 1
        if self.full:
            self._write_while_full()
        elif not self.buffered or self._pending_bytes >= 1 << 16:
            self.flush()

    def flush(self) -> bool:
        """Write what is pending; False if the disk is full (the lines stay held)."""
        if self._fd is None:
            if not self._pending or not self._try_open():
                return not self._pending
        if self._pending:
            data: bytes | bytearray = "".join(self._pending).encode("utf-8", "surrogateescape")
            self._pending.clear()
            self._pending_bytes = 0
            if self._held:
                self._held += data
                data = self._held
        elif self._held:
            data = self._held
        else:
            return True
        return self._write_out(data)

    def _write_out(self, data: bytes | bytearray) -> bool:
        """Write `data` (whole lines, after any held ones); False if the disk is full."""
        done = 0
        try:
            while done < len(data):
                done += os.write(self._fd, data[done:] if done else data)
        except OSError as exc:
            if exc.errno not in DISK_FULL_ERRNOS:
                raise
            self._disk_full(data, done, exc)
            return False
        self._size += done
        if self.full:
            log.warning("%s: written again after the disk was full for %.0f s (%d held "
                        "records written)", self.path, time.monotonic() - self._full_since,
                        _record_lines(data))
            self.full = False
            self._held = bytearray()
        return True

    def tick(self) -> None:
        """Call from a loop: retry held lines if the last attempt is a second old; write a
        buffered writer's pending lines (a live loop can then batch a pass's records into
        one write instead of one per record)."""
        if self.full:
            if time.monotonic() - self._last_try >= RETRY_EVERY:
                self.flush()
        elif self._pending:
            self.flush()

    @property
    def held_records(self) -> int:
        """Records formatted but not yet in the file (disk full)."""
        if not self.full:
            return 0
        return _record_lines(self._held) + sum(not x.startswith("#") for x in self._pending)

    def close(self, retry_seconds: float = 0.0) -> None:
        """Flush and write `#close` (TSV); idempotent. If the disk is full, retry every second
        for `retry_seconds`, then log how many records could not be written (`unwritten`)."""
        if self._closed:
            return
        self._closed = True
        if self._fd is None and not self._pending:
            return
        if self.fmt == "tsv":
            self._pending.append(f"#close{SEPARATOR}{time.strftime(OPEN_CLOSE_FORMAT)}\n")
        deadline = time.monotonic() + retry_seconds
        while not self.flush() and time.monotonic() < deadline:
            time.sleep(RETRY_EVERY)
        if self.full:
            self.unwritten = self.held_records
            log.error("%s: disk full: %d records could not be written", self.path,
                      self.unwritten)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def reopen(self) -> bool:
        """Close the file (with `#close`) so the next record opens `path` again: after
        logrotate moved it away (SIGHUP), a new file; otherwise the same file, appended to
        with a new header. Not while records are held (disk full): False then."""
        if self._fd is None or self._closed:
            return True
        if self.full:
            return False
        close_line = f"#close{SEPARATOR}{time.strftime(OPEN_CLOSE_FORMAT)}\n"
        if self.fmt == "tsv":
            self._pending.append(close_line)
        if not self.flush():
            # The disk filled up just now: take the `#close` back (records follow it here).
            encoded = close_line.encode()
            if self._held.endswith(encoded):
                del self._held[-len(encoded):]
            return False
        os.close(self._fd)
        self._fd = None
        self._reopened = True
        return True

    def _disk_full(self, data: bytes | bytearray, done: int, exc: OSError) -> None:
        """Keep whole lines only in the file; hold the rest."""
        keep = data.rfind(b"\n", 0, done) + 1
        if keep < done:
            os.ftruncate(self._fd, self._size + keep)  # type: ignore[arg-type]
        self._size += keep
        self._held = bytearray(data[keep:])
        self._last_try = time.monotonic()
        self.write_errors += 1
        if not self.full:
            self.full = True
            self._full_since = self._last_try
            log.error("%s: %s: holding records in memory (up to %d bytes), retrying every "
                      "second", self.path, exc.strerror, self.hold_max)

    def _write_while_full(self) -> None:
        if len(self._held) + self._pending_bytes > self.hold_max:
            if not self.flush():
                raise LogSpaceError(
                    f"{self.path}: disk full for {time.monotonic() - self._full_since:.0f} s "
                    f"and {self.held_records} held records passed the bound of "
                    f"{self.hold_max} bytes; stopping")
        elif time.monotonic() - self._last_try >= RETRY_EVERY:
            self.flush()

    def __enter__(self) -> LogWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------------
    def _bad_value(self, values: Sequence[Any], exc: Exception) -> str:
        """Name the field whose value cannot be rendered (for a clear error message)."""
        for name, ztype, kind, v in zip(self.schema.names, self.schema.types, self._kinds,
                                        values, strict=True):
            try:
                if v is not None:
                    _tsv_value(kind, v)
                    _json_value(kind, v)
            except (TypeError, ValueError, OverflowError):
                return f"{self.schema.path}: field {name!r} ({ztype}): cannot log {v!r}"
        return f"{self.schema.path}: cannot log record: {exc}"

    def _open(self) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (0 if self._reopened else os.O_TRUNC)
        self._fd = os.open(self.path, flags, 0o644)
        self._size = os.fstat(self._fd).st_size
        if self.fmt == "tsv":
            self._pending.insert(0, self.header())  # before records held while it could not open

    def _try_open(self) -> bool:
        """Open the file; on a full disk (no room for the file itself: blocks, inodes, quota)
        hold the records as a failed write does, and retry later."""
        try:
            self._open()
        except OSError as exc:
            if exc.errno not in DISK_FULL_ERRNOS:
                raise
            self._last_try = time.monotonic()
            self.write_errors += 1
            if not self.full:
                self.full = True
                self._full_since = self._last_try
                log.error("%s: cannot create: %s: holding records in memory (up to %d bytes), "
                          "retrying every second", self.path, exc.strerror, self.hold_max)
            return False
        return True

    def header(self, open_time: float | None = None) -> str:
        """The header lines exactly as Zeek writes them."""
        sep = SEPARATOR
        stamp = time.strftime(OPEN_CLOSE_FORMAT, time.localtime(open_time))
        sep_escaped = "".join(f"\\x{b:02x}" for b in sep.encode())
        lines = [
            f"#separator {sep_escaped}",
            f"#set_separator{sep}{_header_escape(SET_SEPARATOR)}",
            f"#empty_field{sep}{_header_escape(EMPTY_FIELD)}",
            f"#unset_field{sep}{_header_escape(UNSET_FIELD)}",
            f"#path{sep}{_header_escape(self.schema.path)}",
            f"#open{sep}{stamp}",
            "#fields" + sep + sep.join(self.schema.names),
            "#types" + sep + sep.join(self.schema.types),
        ]
        return "\n".join(lines) + "\n"

    def _tsv_line(self, values: Sequence[Any]) -> str:
        # A record per connection: this is per-connection cost. Rows of the usual value
        # types are one %-format of a template chosen by the values' types (no call per
        # field); the template passes text through as is, which is right when all of it
        # together is what escape_text would leave unchanged (printable ASCII, no backslash)
        # and no text value is one of the strings it rewrites. Any other row is rendered
        # field by field by the general renderers.
        types = tuple(map(type, values))
        entry = self._templates.get(types, _NO_TEMPLATE)
        if entry is _NO_TEMPLATE:
            entry = self._tsv_template(types)
        if entry is not None:
            template, text_of = entry
            if text_of is None:
                line = template % tuple(values)
            else:
                text = text_of(values)
                joined = "".join(text)
                if (joined.isascii() and joined.isprintable() and "\\" not in joined
                        and _REWRITTEN_TEXT.isdisjoint(text)):
                    line = template % tuple(values)
                else:
                    line = self._tsv_general(values)
        else:
            line = self._tsv_general(values)
        if line[0] == "#":
            line = "\\x23" + line[1:]
        return line

    def _tsv_general(self, values: Sequence[Any]) -> str:
        return SEPARATOR.join([UNSET_FIELD if v is None else fn(v)
                               for fn, v in zip(self._tsv_fns, values, strict=True)]) + "\n"

    def _tsv_template(self, types: tuple[type, ...]) -> tuple[str, Any] | None:
        """(template, getter of the text values or None) for rows of these value types, or
        None when a value needs the general renderers; kept for the next row."""
        specs = []
        text = []
        for i, (kind, t) in enumerate(zip(self._kinds, types, strict=True)):
            spec = _TEMPLATE_SPECS.get((kind, t))
            if spec is None:
                if t is not type(None):
                    specs = None
                    break
                spec = UNSET_FIELD + "%.0s"   # prints "-" and nothing of the None itself
            elif spec == "%s":
                text.append(i)
            specs.append(spec)
        entry = None
        if specs is not None:
            getter = itemgetter(*text, *text[:1]) if text else None  # (always a tuple)
            entry = (SEPARATOR.join(specs) + "\n", getter)
        if len(self._templates) < _TEMPLATES_MAX:
            self._templates[types] = entry
        return entry

    def _json_line(self, values: Sequence[Any]) -> str:
        parts: list[str] = []
        for key, kind, v in zip(self._json_keys, self._kinds, values, strict=True):
            if v is None:
                if self.json_include_unset:
                    parts.append(key + "null")
                continue
            parts.append(key + _json_value(kind, v))
        return "{" + ",".join(parts) + "}\n"


def _kind(zeek_type: str) -> str:
    """Collapse a Zeek type name into the rendering rule it follows."""
    if zeek_type.startswith(_SET_TYPE_PREFIXES):
        return "set:" + _kind(zeek_type[zeek_type.index("[") + 1:-1])
    if zeek_type in _TIME_TYPES:
        return "time"
    if zeek_type in _COUNT_TYPES:
        return "count"
    if zeek_type in ("bool", "double", "addr", "subnet"):
        return zeek_type
    return "string"   # string, enum, and anything else printed as text


def _tsv_count(v: Any) -> str:
    return str(v) if type(v) is int else str(int(v))


def _tsv_time(v: Any) -> str:
    return format(float(v), ".6f")


def _tsv_bool(v: Any) -> str:
    return "T" if v else "F"


def _tsv_addr(v: Any) -> str:
    return addr_text(v) if isinstance(v, (bytes, bytearray)) else escape_text(v)


# %-format specs of the usual value types, rendering exactly as the renderers below do:
# int/bool counts, int/float times, bools as T/F ("%.1s" of True/False), and text (checked by
# _tsv_line: it must need no escaping). Other (kind, type) pairs use the general renderers.
_TEMPLATE_SPECS: dict[tuple[str, type], str] = {
    ("count", int): "%d", ("count", bool): "%d",
    ("time", float): "%.6f", ("time", int): "%.6f",
    ("bool", bool): "%.1s",
    ("string", str): "%s", ("addr", str): "%s",
}
_TEMPLATES_MAX = 1024   # distinct tuples of value types per log (a handful in practice)
_NO_TEMPLATE: Any = object()
# Text values escape_text replaces although they are printable.
_REWRITTEN_TEXT = frozenset(("", UNSET_FIELD, EMPTY_FIELD))


def _tsv_renderer(kind: str) -> Callable[[Any], str]:
    """`_tsv_value` for a fixed kind, for values known not to be None (the common kinds
    skip the kind dispatch)."""
    if kind == "string":
        return escape_text
    if kind == "count":
        return _tsv_count
    if kind == "time":
        return _tsv_time
    if kind == "bool":
        return _tsv_bool
    if kind == "addr":
        return _tsv_addr
    return partial(_tsv_value, kind)


def _tsv_value(kind: str, v: Any) -> str:
    if v is None:
        return UNSET_FIELD
    if kind == "string":
        return escape_text(v)
    if kind == "count":
        return str(int(v))
    if kind == "time":
        return format(float(v), ".6f")
    if kind == "bool":
        return "T" if v else "F"
    if kind == "addr":
        return addr_text(v) if isinstance(v, (bytes, bytearray)) else escape_text(v)
    if kind == "double":
        return double_text(float(v))
    if kind.startswith("set:"):
        elems = _set_elements(v)
        if not elems:
            return EMPTY_FIELD
        inner = kind[4:]
        return SET_SEPARATOR.join(_tsv_set_element(inner, e) for e in elems)
    return escape_text(str(v))


def _tsv_set_element(kind: str, e: Any) -> str:
    if kind == "string":
        return escape_text(e, in_set=True)
    if kind == "addr" and isinstance(e, (bytes, bytearray)):
        return addr_text(e)
    if kind in ("addr", "subnet"):
        return escape_text(str(e), in_set=True)
    return _tsv_value(kind, e)


def _json_value(kind: str, v: Any) -> str:
    if kind == "string":
        return _json_string(v)
    if kind == "count":
        return str(int(v))
    if kind == "time" or kind == "double":
        return json_number(float(v))
    if kind == "bool":
        return "true" if v else "false"
    if kind == "addr":
        return _json_string(addr_text(v) if isinstance(v, (bytes, bytearray)) else v)
    if kind.startswith("set:"):
        inner = kind[4:]
        return "[" + ",".join(_json_value(inner, e) for e in _set_elements(v)) + "]"
    return _json_string(str(v))


def _set_elements(v: Any) -> list[Any]:
    if isinstance(v, (set, frozenset)):
        return sorted(v, key=str)
    if isinstance(v, (str, bytes)):
        return [v]
    if isinstance(v, Iterable):
        return list(v)
    return [v]


def _record_lines(data: bytes | bytearray) -> int:
    """Record lines in encoded log text (header and `#close` lines start with `#`)."""
    return sum(1 for line in bytes(data).split(b"\n") if line and not line.startswith(b"#"))


def set_aside(directory: str | Path, names: Sequence[str]) -> list[Path]:
    """Rename each non-empty `<name>.log` left by an earlier run to `<name>.<its last write,
    %Y-%m-%d-%H-%M-%S>.log` (Zeek's rotated-log naming), so a restart, after a crash too,
    never overwrites records. Returns the new paths."""
    kept = []
    for name in names:
        path = Path(directory) / f"{name}.log"
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        if st.st_size == 0:
            continue
        stamp = time.strftime("%Y-%m-%d-%H-%M-%S", time.localtime(st.st_mtime))
        target = path.with_name(f"{name}.{stamp}.log")
        n = 1
        while target.exists():
            n += 1
            target = path.with_name(f"{name}.{stamp}-{n}.log")
        path.rename(target)
        kept.append(target)
    return kept


def open_log(directory: str | Path, schema: LogSchema, fmt: str = "tsv",
             buffered: bool = False, json_include_unset: bool = False,
             hold_max: int = DEFAULT_HOLD_BYTES) -> LogWriter:
    """Writer for `<directory>/<schema.path>.log`; the file appears with the first record.

    `buffered=False` (default) writes each record as it comes; `buffered=True` batches whole
    lines up to 64 KiB, and `tick()` writes what is pending (offline runs; the live daemon,
    which ticks its logs once a pass of its main loop).
    """
    return LogWriter(directory, schema, fmt, buffered, json_include_unset, hold_max)
