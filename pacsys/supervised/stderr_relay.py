"""What native code writes to stderr becomes log records: gRPC core's own lines, above all.

gRPC core (C++, logging through absl) writes its lines straight to file descriptor 2: one
for every failed TLS handshake, bind errors, ... They bypassed the service's logging: not
JSON under ``log_format = "json"``, and at any rate a client chose (872 failed handshakes a
second gave 17,700 lines in 20 s). grpcio 1.85 offers no way to hand them to Python: its
only knob is ``GRPC_VERBOSITY``, which sets absl's minimum level for the whole process
(``NONE`` would hide errors too) and leaves the lines' format alone.

So the serving front moves its stderr once, at start (`relay_native_stderr`):

- fd 2 becomes the write end of a pipe, non-blocking: when the pipe is full a native
  write fails and that line is lost, and no gRPC thread ever waits for the relay;
- Python's ``sys.stderr`` (and with it the log handler) writes to the original stderr (a
  duplicate of the old fd 2), and so does ``faulthandler`` (a crash's tracebacks do not
  depend on the relay);
- a thread reads the pipe line by line. A line in the service's own format (a worker's:
  workers inherit fd 2, see `workers.logformat`) is passed on as it is. A line in absl's
  format (``I1205 22:40:05.587676  21279 ssl_transport_security.cc:2563] Handshake
  failed ...``) becomes the record ``event=grpc_core source=ssl_transport_security.cc:2563
  detail="Handshake failed ..."`` at its level (I INFO, W WARNING, E ERROR, F CRITICAL);
  any other line becomes ``event=stderr detail=...`` at WARNING. One line is expected and
  logged at INFO: gRPC's acceptor closing a listener that a drain shut down on purpose.
  Each source line of gRPC (and the other lines together) gets at most one record per
  `interval` seconds; the next one says how many were left out (``not_logged=N``), and
  `counts.not_logged` counts them all (the metric ``pacsys_stderr_lines_not_logged_total``).

The price: lines still in the pipe when the front dies at once (a native abort) are lost
with it; faulthandler still writes the Python side of such a crash to the original stderr.
"""

from __future__ import annotations

import atexit
import faulthandler
import fcntl
import io
import logging
import os
import re
import sys
import threading
import time
from typing import TextIO

from pacsys.supervised._refusal_log import RefusalLog
from workers.logformat import STDERR_RELAY_ENV, journal_prefix

__all__ = ["LineRelay", "StderrRelay", "counts", "relay_native_stderr"]

logger = logging.getLogger("pacsys.supervised")
grpc_logger = logging.getLogger("grpc")

PIPE_BYTES = 1 << 20  # what the pipe holds while the relay catches up (the kernel may give less)
MAX_LINE_BYTES = 16384  # a longer line is cut here; the rest of it is dropped
GATHER_SECONDS = 0.02  # the relay reads at most 50 times a second: 1 MiB holds 5,000 lines of gRPC

# A line the service's own formatter wrote (JSON or key=value, perhaps after a journal priority).
_OWN_LINE = re.compile(r'^(?:<\d>)?(?:\{"ts": "|ts=\d)')
_OWN_LEVEL = re.compile(r'"level": "([A-Z]+)"|\blevel=([A-Z]+)\b')
# absl's prefix: severity, date (0000 before absl is initialized), time, thread, file:line.
_ABSL_LINE = re.compile(r"^([IWEF])\d{4} [\d:.]+ +\d+ ([^\s:\]]+:\d+)\] ?(.*)$")
_ABSL_LEVELS = {"I": logging.INFO, "W": logging.WARNING, "E": logging.ERROR, "F": logging.CRITICAL}
# gRPC's acceptor on a listening socket that a drain shut down to leave a shared port
# (`_listen.stop_listening`): what was wanted, not an error.
_EXPECTED = {"Closing acceptor. Failed accept4: Invalid argument": logging.INFO}


class _Counts:
    not_logged = 0  # records left out by the interval (a metric of the front)


counts = _Counts()


class LineRelay:
    """Turns the lines written to stderr into records; passes the service's own on to `stream`."""

    def __init__(self, stream: TextIO, interval: float):
        self.stream = stream
        self._limit = RefusalLog(interval)
        self._pending = b""
        self._cut = False  # the rest of a line that was too long is being dropped

    @property
    def interval(self) -> float:
        return self._limit.interval

    @interval.setter
    def interval(self, seconds: float) -> None:
        self._limit.interval = seconds

    def feed(self, data: bytes) -> None:
        """Bytes as they come out of the pipe: each complete line is relayed."""
        lines = (self._pending + data).split(b"\n")
        self._pending = lines.pop()
        for line in lines:
            if self._cut:
                self._cut = False
            else:
                self.relay(line)
        if self._cut:
            self._pending = b""
        elif len(self._pending) > MAX_LINE_BYTES:
            self.relay(self._pending[:MAX_LINE_BYTES])
            self._pending, self._cut = b"", True

    def close(self) -> None:
        """The end of the pipe: a last line without its newline is relayed too."""
        if self._pending and not self._cut:
            self.relay(self._pending)
        self._pending = b""

    def relay(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip("\r")
        if not line:
            return
        if _OWN_LINE.match(line):
            self._pass_on(line)
            return
        absl = _ABSL_LINE.match(line)
        if absl is not None:
            severity, source, detail = absl.groups()
            level = _EXPECTED.get(detail, _ABSL_LEVELS[severity])
            self._record(grpc_logger, level, "grpc_core", source, detail)
        else:
            self._record(logger, logging.WARNING, "stderr", None, line)

    def _pass_on(self, line: str) -> None:
        """A line of the service's own format, from a worker (with its journal priority if due)."""
        if not line.startswith("<"):
            level = _OWN_LEVEL.search(line)
            levelno = logging.getLevelName(level.group(1) or level.group(2)) if level is not None else None
            line = journal_prefix(levelno if isinstance(levelno, int) else logging.INFO, self.stream) + line
        try:
            self.stream.write(line + "\n")
        except OSError:
            pass  # the original stderr is gone: nothing left to tell

    def _record(self, to: logging.Logger, level: int, event: str, source: str | None, detail: str) -> None:
        if not to.isEnabledFor(level):
            return
        not_logged = self._limit.admit((event, source or ""))
        if not_logged is None:
            counts.not_logged += 1
            return
        args: list[object] = [event, detail]
        text = "event=%s detail=%s"
        if source is not None:
            text, args = "event=%s source=%s detail=%s", [event, source, detail]
        if not_logged:
            text, args = text + " not_logged=%d", [*args, not_logged]
        to.log(level, text, *args)


class StderrRelay:
    """fd 2 made the write end of a pipe, and the thread that relays what comes out of it."""

    def __init__(self, interval: float):
        read_end, write_end = os.pipe()
        try:
            fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        except OSError:
            pass  # the kernel's limit (fs.pipe-max-size) is lower: the default size serves
        os.set_blocking(write_end, False)
        sys.stderr.flush()
        self._original = os.dup(2)
        stream = io.TextIOWrapper(
            io.BufferedWriter(io.FileIO(self._original, "w", closefd=False)),
            encoding=sys.stderr.encoding or "utf-8",
            errors="backslashreplace",
            line_buffering=True,
            write_through=True,
        )
        sys.stderr = stream
        faulthandler.enable(stream)
        os.dup2(write_end, 2)
        os.close(write_end)
        os.environ[STDERR_RELAY_ENV] = "1"  # the workers' loggers write through the pipe, blocking
        self.lines = LineRelay(stream, interval)
        self._read_end = read_end
        self._thread = threading.Thread(target=self._run, name="pacsys-stderr-relay", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 1.0) -> None:
        """Gives fd 2 back to the original stderr and lets the thread finish the pipe."""
        os.dup2(self._original, 2)
        self._thread.join(timeout)  # it ends when every writer (workers too) has closed the pipe

    def _run(self) -> None:
        with io.FileIO(self._read_end, "r") as pipe:
            while chunk := pipe.read(PIPE_BYTES):
                self.lines.feed(chunk)
                # Let lines gather while the pipe holds them: one wake-up (and one turn of the
                # GIL, which a busy front holds for up to 5 ms a time) per batch, not per line.
                time.sleep(GATHER_SECONDS)
            self.lines.close()


_relay: StderrRelay | None = None


def relay_native_stderr(interval: float) -> StderrRelay:
    """Starts the relay (once per process; later calls change its interval) and stops it at exit."""
    global _relay
    if _relay is None:
        _relay = StderrRelay(interval)
        atexit.register(_relay.stop)
    else:
        _relay.lines.interval = interval
    return _relay
