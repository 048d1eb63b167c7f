"""Log output of `pacsys-supervisor` and its workers: key=value lines or JSON lines, on stderr.

kv::

    ts=2025-01-02T03:04:05.678Z level=INFO logger=pacsys.supervised msg="rpc=Set peer=ipv4:10.0.0.1:5 decision=denied"

json: one object per line with ``ts``, ``level``, ``logger``, ``msg``, each ``key=value`` pair
of the message as a field of its own (``"rpc": "Set"``), the fixed fields of the process
(a worker's ``worker`` and ``pid``) and, after an exception, ``exc`` (the traceback).

Log injection. The values a message is built from (its %-arguments) can come from clients: a
DRF, a peer address, an error text quoting either. The formatter escapes every argument that is
not a number before it is put into the message, so no caller has to: a value with a space,
a quote, ``=``, a backslash or any character that is not printable (line breaks, ESC, U+2028,
...) is written in double quotes with those characters escaped (``\\"``, ``\\\\``, ``\\n``,
``\\x1b``, ``\\u2028``), and a value longer than ``max_value_chars`` is cut (its length is
kept: ``"abc... (+5000 chars)"``). A value can therefore never end the message, start a new
line, or forge a ``key=value`` pair of its own. In kv lines the message is itself one quoted
value, so its quotes and backslashes are escaped once more.

Under systemd, when stderr is the journal (``JOURNAL_STREAM`` names it), each line starts
with its syslog priority (``<4>`` for WARNING), which journald takes off and records, so that
``journalctl -p warning`` works in both formats.

The same module configures the worker processes (they import no gRPC): the front exports its
format in ``PACSYS_SUPERVISOR_LOG_FORMAT``, which workers inherit with the rest of its
environment (and its stderr). A serving front relays what is written to its stderr
(``pacsys.supervised.stderr_relay``): a worker's stderr is then the relay's pipe, which the
front made non-blocking for gRPC's threads, so a worker writes its lines through a blocking
description of the same pipe of its own (``STDERR_RELAY_ENV`` says so), and the front passes
them on unchanged.
"""

from __future__ import annotations

import json
import logging
import numbers
import os
import re
import stat
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

__all__ = [
    "FORMATS",
    "STDERR_RELAY_ENV",
    "JSONFormatter",
    "KVFormatter",
    "configure_logging",
    "escape_value",
    "journal_prefix",
    "parse_pairs",
    "stderr_is_journal",
]

FORMATS = ("kv", "json")
MAX_VALUE_CHARS = 256
STDERR_RELAY_ENV = "PACSYS_SUPERVISOR_STDERR_RELAY"  # set while the front relays its (and the workers') stderr


class _Counts:
    values_cut = 0  # values longer than their limit, cut in a log line (a metric of the front)


counts = _Counts()

# A value is written bare only when it is printable (str.isprintable: no line or paragraph
# separators, no control or format characters, no space but ' ') and has none of these.
_QUOTE_IF = frozenset(' "=\\')
_SPECIAL = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape_value(text: str, max_chars: int = MAX_VALUE_CHARS) -> str:
    """`text` as one key=value value: bare when it is safe, else quoted with escapes."""
    if len(text) > max_chars:
        counts.values_cut += 1
        text = f"{text[:max_chars]}... (+{len(text) - max_chars} chars)"
    if text and text.isprintable() and _QUOTE_IF.isdisjoint(text):
        return text
    out = []
    for ch in text:
        special = _SPECIAL.get(ch)
        if special is not None:
            out.append(special)
        elif ch.isprintable():
            out.append(ch)
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return '"' + "".join(out) + '"'


class _Escaped:
    """A %-argument that prints escaped, whether the message uses %s or %r."""

    __slots__ = ("max_chars", "value")

    def __init__(self, value: object, max_chars: int):
        self.value = value
        self.max_chars = max_chars

    def __str__(self) -> str:
        return escape_value(str(self.value), self.max_chars)

    def __repr__(self) -> str:
        return escape_value(repr(self.value), self.max_chars)


def _safe(value: object, max_chars: int) -> object:
    if isinstance(value, numbers.Number):
        return value  # %d, %g and friends need the number; a number cannot forge anything
    return _Escaped(value, max_chars)


# The tokens of a message, left to right: a pair (key=bare or key="quoted \\" value"), or
# something else to skip whole: a quoted string (an escaped argument), a word, spaces. A quoted
# string is one token, so nothing inside it is ever read as a pair.
_TOKEN = re.compile(r'([A-Za-z_][A-Za-z0-9_.]*)=("(?:[^"\\]|\\.)*"?|[^\s"]*)|"(?:[^"\\]|\\.)*"?|[^\s"]+|\s+')
_UNESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|.)")
_UNSPECIAL = {"n": "\n", "r": "\r", "t": "\t"}


def _unescape(match: re.Match[str]) -> str:
    code = match.group(1)
    if len(code) > 1:
        return chr(int(code[1:], 16))
    return _UNSPECIAL.get(code, code)


def parse_pairs(text: str) -> dict[str, str]:
    """The key=value pairs of a line or message, values unquoted and unescaped (last one wins)."""
    pairs = {}
    for match in _TOKEN.finditer(text):
        key, value = match.groups()
        if key is None:
            continue
        if value.startswith('"'):
            value = _UNESCAPE.sub(_unescape, value[1:-1] if len(value) > 1 and value.endswith('"') else value[1:])
        pairs[key] = value
    return pairs


_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def _priority(levelno: int) -> int:
    """The syslog priority of a log level (7, debug, below INFO)."""
    return next((p for level, p in _PRIORITIES if levelno >= level), 7)


def stderr_is_journal(stream: TextIO | None = None) -> bool:
    """Whether `stream` (stderr) is the journal stream systemd gave this service."""
    journal = os.environ.get("JOURNAL_STREAM")
    if not journal:
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (AttributeError, OSError, ValueError):  # a stream without a file descriptor
        return False
    return journal == f"{st.st_dev}:{st.st_ino}"


def journal_prefix(levelno: int, stream: TextIO | None = None) -> str:
    """``<N>`` for a line written at `levelno` to the journal, else nothing."""
    return f"<{_priority(levelno)}>" if stderr_is_journal(stream) else ""


def _timestamp(created: float) -> str:
    """UTC, ISO 8601, milliseconds: 2025-01-02T03:04:05.678Z."""
    seconds = int(created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int((created - seconds) * 1000):03d}Z"


class _Formatter(logging.Formatter):
    def __init__(
        self,
        fields: Mapping[str, object] | None = None,
        max_value_chars: int = MAX_VALUE_CHARS,
        priority_prefix: bool = False,
    ):
        super().__init__()
        self.fields = dict(fields or {})
        self.max_value_chars = max_value_chars
        self.priority_prefix = priority_prefix

    def format(self, record: logging.LogRecord) -> str:
        line = self.line(record)
        return f"<{_priority(record.levelno)}>{line}" if self.priority_prefix else line

    def line(self, record: logging.LogRecord) -> str:
        raise NotImplementedError

    def message(self, record: logging.LogRecord) -> str:
        """The record's message with every argument escaped."""
        limit = self.max_value_chars
        if not isinstance(record.msg, str):  # logger.warning(exc): the object is a value, not our text
            return escape_value(str(record.msg), limit)
        msg = record.msg
        args = record.args
        if not args:
            return msg
        try:
            if isinstance(args, Mapping):
                return msg % {k: _safe(v, limit) for k, v in args.items()}
            return msg % tuple(_safe(a, limit) for a in args)
        except (TypeError, ValueError, KeyError):
            # A message that does not fit its arguments: say so rather than lose the record.
            return f"{escape_value(msg, limit)} args={escape_value(repr(args), limit)}"

    def traceback(self, record: logging.LogRecord) -> str | None:
        if record.exc_info:
            return self.formatException(record.exc_info)
        return record.exc_text or None


class KVFormatter(_Formatter):
    def line(self, record: logging.LogRecord) -> str:
        head = f"ts={_timestamp(record.created)} level={record.levelname} logger={record.name}"
        fixed = "".join(f" {k}={escape_value(str(v))}" for k, v in self.fields.items())
        # The message is one quoted value: its own quotes and escapes are escaped once more.
        line = f"{head}{fixed} msg={escape_value(self.message(record), sys.maxsize)}"
        tb = self.traceback(record)
        if tb is not None:
            line += f" exc={escape_value(tb, sys.maxsize)}"
        return line


class JSONFormatter(_Formatter):
    def line(self, record: logging.LogRecord) -> str:
        msg = self.message(record)
        entry: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            **self.fields,
            "msg": msg,
        }
        for key, value in parse_pairs(msg).items():
            entry.setdefault(key, value)  # a pair named like a standard field does not replace it
        tb = self.traceback(record)
        if tb is not None:
            entry["exc"] = tb
        # ensure_ascii: U+2028/2029 and other separators arrive escaped, so every reader sees one line.
        return json.dumps(entry, ensure_ascii=True, default=str)


def _relayed_stderr() -> TextIO | None:
    """In a worker of a front that relays stderr: a blocking stream onto fd 2 (the relay's pipe)."""
    if not os.environ.get(STDERR_RELAY_ENV):
        return None
    try:
        if sys.stderr.fileno() != 2 or not stat.S_ISFIFO(os.fstat(2).st_mode):
            return None  # the front itself (its sys.stderr is the original), or not a pipe
        # Opening the pipe anew gives a description of our own, blocking (O_NONBLOCK is per description).
        fd = os.open("/proc/self/fd/2", os.O_WRONLY | os.O_CLOEXEC)
    except (OSError, ValueError, AttributeError):
        return None
    return open(fd, "w", buffering=1, encoding="utf-8", errors="backslashreplace")


class _Handler(logging.StreamHandler):
    """The handler configure_logging installs; found again (and replaced) by its type."""


def configure_logging(
    level: str | int = "INFO",
    fmt: str = "kv",
    stream: TextIO | None = None,
    *,
    fields: Mapping[str, object] | None = None,
    max_value_chars: int = MAX_VALUE_CHARS,
) -> logging.Handler:
    """Send every log record at `level` or above to `stream` (stderr) in format `fmt` (kv|json).

    `fields` are added to every line (a worker's slot and pid). Idempotent: a second call
    replaces the handler of the first one and leaves other handlers of the root logger alone.
    Returns the installed handler.
    """
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if isinstance(level, str):
        numeric = logging.getLevelName(level.upper())
        if not isinstance(numeric, int):
            raise ValueError(f"unknown log level {level!r}")
        level = numeric
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
        old.close()
    if stream is None:
        relayed = _relayed_stderr()
        if relayed is not None:
            sys.stderr = relayed  # tracebacks and warnings too
        stream = sys.stderr
    handler = _Handler(stream)
    kind = KVFormatter if fmt == "kv" else JSONFormatter
    handler.setFormatter(kind(fields, max_value_chars, priority_prefix=stderr_is_journal(stream)))
    root.addHandler(handler)
    root.setLevel(level)
    return handler
