"""Log output of `pacsys-supervisor`: key=value lines or JSON lines, on stderr.

kv::

    ts=2025-01-02T03:04:05.678Z level=INFO logger=pacsys.supervised msg="config reloaded: 3 policies"

The message is kept as it is (the gateway's log lines are already key=value pairs), except
that line breaks are escaped so that every record is one line; a traceback follows as
``exc="..."``, escaped the same way.

json: one object per line with ``ts``, ``level``, ``logger``, ``msg`` and, when there is
one, ``exc`` (the formatted traceback).
"""

from __future__ import annotations

import json
import logging
import sys
import time

__all__ = ["FORMATS", "JSONFormatter", "KVFormatter", "configure_logging"]

FORMATS = ("kv", "json")


def _timestamp(created: float) -> str:
    """UTC, ISO 8601, milliseconds: 2025-01-02T03:04:05.678Z."""
    seconds = int(created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int((created - seconds) * 1000):03d}Z"


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


class KVFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = (
            f"ts={_timestamp(record.created)} level={record.levelname} logger={record.name} "
            f'msg="{_one_line(record.getMessage())}"'
        )
        if record.exc_info:
            line += f' exc="{_one_line(self.formatException(record.exc_info))}"'
        elif record.exc_text:
            line += f' exc="{_one_line(record.exc_text)}"'
        return line


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": _timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False, default=str)


class _Handler(logging.StreamHandler):
    """The handler configure_logging installs; found again (and replaced) by its type."""


def configure_logging(level: str | int = "INFO", fmt: str = "kv", stream=None) -> logging.Handler:
    """Send every log record at `level` or above to `stream` (stderr) in format `fmt` (kv|json).

    Idempotent: a second call replaces the handler of the first one and leaves other handlers
    of the root logger alone. Returns the installed handler.
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
    handler = _Handler(stream if stream is not None else sys.stderr)
    handler.setFormatter(KVFormatter() if fmt == "kv" else JSONFormatter())
    root.addHandler(handler)
    root.setLevel(level)
    return handler
