"""What the `pacsys-supervisor` command says and how it ends: its exit statuses, its error
line, its version, and the log format it sets up (which its workers inherit).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import sys
import threading
import warnings
from typing import TextIO

from pacsys.settings import Settings, env_name
from pacsys.supervised.stderr_relay import relay_native_stderr
from workers.logformat import configure_logging, journal_prefix

logger = logging.getLogger("pacsys.supervised")

PROG = "pacsys-supervisor"
DISTRIBUTION = "pacsys-supervisor"

EXIT_USAGE = 2  # bad options, a bad config file or environment variable: fix it, do not retry
EXIT_START_FAILED = 3  # a good configuration that could not start here: port, files, backend, workers
EXIT_UNREADY = 4  # unready_exit: the pool was not ready for unready_limit seconds; restart the service

_json_logging = False


def version() -> str:
    """The installed distribution's version (from its metadata)."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def report_error(exc: BaseException | str, code: int = EXIT_USAGE) -> int:
    """Print `PROG: error: ...` (with JSON logs, log `event=command_failed`) and return `code`, the exit status."""
    if isinstance(exc, str):
        text = exc
    elif isinstance(exc, ValueError | OSError | TimeoutError | RuntimeError) and str(exc):
        text = str(exc)
    else:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if _json_logging:
        # With --log-format json every line is JSON: the command's last words too.
        logger.error("event=command_failed exit_status=%d error=%s", code, text)
    else:
        print(f"{journal_prefix(logging.ERROR)}{PROG}: error: {text}", file=sys.stderr, flush=True)
    return code


def counted(n: int, one: str, many: str | None = None) -> str:
    """`n` things in words: "1 policy", "2 policies", "0 workers"."""
    return f"{n} {one if n == 1 else (many or one + 's')}"


def json_logging() -> bool:
    """Whether the service logs JSON lines (then its own messages are log records too)."""
    return _json_logging


def configure_service_logging(settings: Settings) -> None:
    """The front's log format, exported for the workers (they inherit the environment)."""
    global _json_logging
    # gRPC core writes its own lines to fd 2: they become records of this format too. First,
    # so that the handler below writes to the original stderr.
    relay_native_stderr(settings.grpc_log_interval)
    configure_logging(settings.log_level, settings.log_format, max_value_chars=settings.log_value_chars)
    _json_logging = settings.log_format == "json"
    # Whatever else Python would print on stderr becomes a log record too: warnings, and the
    # traceback of an exception nothing caught (in the main thread or another one).
    warnings.showwarning = _log_warning
    sys.excepthook = lambda kind, exc, tb: logger.critical("event=uncaught_exception", exc_info=(kind, exc, tb))
    threading.excepthook = lambda a: logger.error(
        "event=uncaught_exception thread=%s",
        a.thread.name if a.thread else "?",
        exc_info=(a.exc_type, a.exc_value or a.exc_type(), a.exc_traceback),
    )
    for name in ("log_format", "log_value_chars"):
        os.environ[env_name(name)] = str(getattr(settings, name))


def _log_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """warnings.showwarning: a Python warning as an event (what logging.captureWarnings would log as prose)."""
    logger.warning(
        "event=python_warning category=%s file=%s line=%d detail=%s", category.__name__, filename, lineno, message
    )
