"""Audit log of the gateway: who asked for what, what the policies decided, and what came back.

Two append-only files:

* A JSON-lines log (``path``), one object per line, ``seq`` counting from 1 per ``AuditLog``:

  - ``"dir": "in"``, one per request: ``ts`` (ISO-8601 with timezone), ``seq``, ``peer``,
    ``method``, ``drfs``, ``allowed``, ``reason``; ``values`` (``[[drf, value], ...]``) for a
    Set; ``final_drfs`` only when a policy changed the DRF list. A Read's list is cut at
    ``limits.drf_chars`` characters: ``drfs_left_out`` (``final_drfs_left_out``) then says
    how many DRFs were left out, their characters and their SHA-256.
  - ``"dir": "summary"``: requests of one client that were not written one by one, because
    the client was over its byte budget or the disk is low (`_audit_limits`): how many, their
    ``first_seq`` and ``last_seq``, methods, reasons, the bytes left out and their SHA-256.
    Every seq is either in an ``in`` line or counted in a summary of its client.
  - ``"dir": "out"``, only with ``log_responses``: the request's ``seq``, ``peer`` and a summary of one
    reply: for a Read reply its ``index`` and ``readings`` (how many) or ``status``
    (``[facility_code, status_code]``); for a Set reply ``statuses``, one pair per setting.
  - ``"dir": "event"``: a notable outcome tied to a request, e.g.
    ``{"dir": "event", "seq": 7, "event": "write_outcome_unknown", "drfs": [...]}``.

* Optionally a binary capture (``proto_path``) of the raw messages, one frame each: a tag byte
  (0 Read request, 1 Read reply, 2 Set request, 3 Set reply), the payload length as a protobuf
  varint, then the serialized message. Replies are captured only with ``log_responses``.

Recording never raises: a failure (disk full, directory gone, a file deleted while open, a
value that will not serialize) is logged on ``pacsys.supervised.audit`` and the call returns normally; ``healthy`` tells whether
the last entry reached the JSON log. The one exception is an entry that must be recorded
(``log_request(..., must_record=True)``, a write's): it is flushed at once, and
``AuditUnavailable`` says it did not reach the file, so that the write is not made. Entries
hold bounded excerpts of what the client sent. A failed write cuts the file back to the last flushed
record, so a file holds whole records only, except the tail of a process that died mid-write,
which the readers report as an error. Only the constructor raises (bad arguments, files that
cannot be opened) so that a misconfigured log stops the server at startup.

Files are created with mode 0640 whatever the umask (they name peers and written values);
an existing file keeps its mode. ``close()`` releases the files, a later entry reopens them in
append mode; ``reopen()`` does both at once, which is how a rotated log is picked up (SIGUSR1
to the command). With ``limits.max_bytes`` the log also rotates itself: a file that would
grow past it is renamed ``path.1`` (``path.1`` to ``path.2``, ..., ``limits.keep`` of them), the
capture with it. ``read_audit``/``read_audit_proto`` read the files back, ``audit_files`` lists
a log's rotated files in order, and the ``pacsys-audit`` command
(`pacsys.supervised.audit_command`) prints them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, BinaryIO

from workers.reply_body import varint

from ._audit_limits import LOW_SPACE, OVER_BUDGET, AuditLimits, AuditStats, ClientBudgets, DiskWatch
from ._audit_reader import (
    TAG_READ_REPLY,
    TAG_READ_REQUEST,
    TAG_SETTING_REPLY,
    TAG_SETTING_REQUEST,
    PathLike,
    audit_files,
    read_audit,
    read_audit_proto,
)
from ._peers import peer_host
from ._policies import PolicyDecision, RequestContext
from ._refusal_log import excerpt

__all__ = [
    "TAG_READ_REPLY",
    "TAG_READ_REQUEST",
    "TAG_SETTING_REPLY",
    "TAG_SETTING_REQUEST",
    "AuditLimits",
    "AuditLog",
    "AuditUnavailable",
    "audit_files",
    "read_audit",
    "read_audit_proto",
]

logger = logging.getLogger("pacsys.supervised.audit")

_REQUEST_TAGS = {"Read": TAG_READ_REQUEST, "Set": TAG_SETTING_REQUEST}
_REPLY_TAGS = {"Read": TAG_READ_REPLY, "Set": TAG_SETTING_REPLY}

FILE_MODE = 0o640

MAX_LISTED = 1000  # DRFs and values listed per entry: a request's whole list, up to the largest allowed


class AuditUnavailable(Exception):
    """An entry that had to be recorded (a write's) did not reach the audit file."""


def _encode_varint(write: Any, value: int) -> None:
    """``write(varint)``: the frame length's encoding, under the pacsys release's name for it."""
    write(varint(value))


def _jsonable(value: object) -> object:
    """``value`` as plain JSON data; anything unknown becomes its repr rather than an error."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # strict JSON has no NaN/Infinity; "nan", "inf" survive every reader
    if value is None or isinstance(value, (str, int, float)):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    tolist = getattr(value, "tolist", None)  # numpy arrays and scalars
    if callable(tolist):
        return _jsonable(tolist())
    return repr(value)


def _bounded(value: object) -> object:
    """A setting's value for the JSON line: long text and long arrays cut to an excerpt."""
    if isinstance(value, str):
        return excerpt(value, 1000)
    data = _jsonable(value)
    if isinstance(data, list) and len(data) > MAX_LISTED:
        return [*data[:MAX_LISTED], f"... and {len(data) - MAX_LISTED} more"]
    if isinstance(data, str):
        return excerpt(data, 1000)
    return data


def _listed(drfs: Sequence[str], chars: int | None) -> tuple[list[str], dict[str, object] | None]:
    """The DRFs an entry lists and, when that is not all of them, what was left out.

    Listed: the first ones (at most MAX_LISTED) whose characters add up to at most `chars`
    (None: no such bound), each an excerpt of 1000 characters. Left out: how many, their
    characters, and the SHA-256 of them as a compact JSON array, so that a reader can check a
    list it suspects: ``hashlib.sha256(json.dumps(rest, separators=(",", ":")).encode())``.
    """
    listed: list[str] = []
    used = 0
    for drf in drfs[:MAX_LISTED]:
        if chars is not None and used + len(drf) > chars:
            break
        listed.append(excerpt(drf, 1000))
        used += len(drf)
    rest = list(drfs[len(listed) :])
    if not rest:
        return listed, None
    digest = hashlib.sha256(json.dumps(rest, separators=(",", ":")).encode()).hexdigest()
    return listed, {"count": len(rest), "chars": sum(len(d) for d in rest), "sha256": digest}


def summarize_reply(method: str, reply: Any) -> dict[str, object]:
    """The few fields of a reply worth a JSON line; the full message goes to the binary file."""
    if method == "Set":
        return {"statuses": [[s.facility_code, s.status_code] for s in reply.status]}
    summary: dict[str, object] = {"index": reply.index}
    kind = reply.WhichOneof("value")
    if kind == "readings":
        summary["readings"] = len(reply.readings.reading)
    elif kind == "status":
        summary["status"] = [reply.status.facility_code, reply.status.status_code]
    return summary


class _File:
    """An append-only file that is cut back to its last flushed record when a write fails."""

    def __init__(self, path: PathLike):
        self.path = os.fspath(path)
        self._file: BinaryIO | None = None
        self._flushed = 0  # file size at the last successful flush: a record boundary
        self._pending = 0  # bytes written since then
        self.failing = False  # set by AuditLog from a failure until the next good flush

    def open(self) -> None:
        flags = os.O_WRONLY | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, FILE_MODE)
            os.fchmod(fd, FILE_MODE)  # the umask narrowed or widened the mode given to open
        except FileExistsError:
            # An existing file keeps its mode. O_CREAT still: a symlink whose target is gone
            # (O_EXCL refuses any symlink) gets its target created, as a plain append would.
            fd = os.open(self.path, flags | os.O_CREAT, FILE_MODE)
        self._file = open(fd, "ab")
        self._flushed = self._file.tell()
        self._pending = 0

    def write(self, data: bytes) -> None:
        if self._file is None:
            self.open()
        assert self._file is not None
        try:
            self._file.write(data)
        except Exception:
            self._roll_back()
            raise
        self._pending += len(data)

    def flush(self) -> None:
        if self._file is None:
            return
        try:
            self._file.flush()
        except Exception:
            self._roll_back()
            raise
        self._flushed += self._pending
        self._pending = 0
        if os.fstat(self._file.fileno()).st_nlink == 0:
            # Deleted while open (the file or its directory removed): what it holds is lost to
            # every reader. Let the handle go (nothing to cut back: no name reaches it) and say
            # so; the next write opens the file by its name again, if it can.
            f, self._file = self._file, None
            with contextlib.suppress(Exception):
                f.close()
            raise FileNotFoundError(errno.ENOENT, "deleted while open (its directory removed?)", self.path)

    @property
    def is_open(self) -> bool:
        return self._file is not None

    @property
    def size(self) -> int:
        """Bytes in the file, with those written since the last flush."""
        if self._file is not None:
            return self._flushed + self._pending
        try:
            return os.path.getsize(self.path)
        except OSError:
            return 0

    def close(self) -> None:
        f = self._file
        if f is not None:
            self.flush()
            self._file = None
            f.close()

    def _roll_back(self) -> None:
        # Part of a record may have reached the disk; cut it off so later appends stay parseable.
        # The next write reopens the file.
        f, self._file = self._file, None
        if f is not None:
            with contextlib.suppress(Exception):  # the handle is abandoned either way
                f.close()
        with contextlib.suppress(OSError):  # not a regular file (a device, a pipe): nothing to cut
            os.truncate(self.path, self._flushed)


class AuditLog:
    """JSON-lines audit log with optional binary capture of the raw protobuf messages.

    Args:
        path: The JSON-lines file.
        proto_path: The binary capture file, or None for none.
        log_responses: Also record replies ("out" lines and reply frames).
        flush_interval: Entries between flushes; 1 flushes every entry.
        limits: What bounds its growth (`AuditLimits`: per-client budgets, the DRFs listed per
            Read, rotation, free-space watermarks); the defaults are the settings'.
        clock: Monotonic seconds, for the budgets and the free-space polls.

    Thread-safe: one lock serializes all entries, so ``seq`` order is file order.
    """

    def __init__(
        self,
        path: PathLike,
        proto_path: PathLike | None = None,
        log_responses: bool = False,
        flush_interval: int = 1,
        *,
        limits: AuditLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        if flush_interval < 1:
            raise ValueError(f"flush_interval must be >= 1, got {flush_interval}")
        self.limits = limits = limits or AuditLimits()
        if limits.max_bytes and limits.keep < 1:
            raise ValueError(f"keep must be >= 1 with max_bytes, got {limits.keep}")
        self._json = _File(path)
        self._proto = _File(proto_path) if proto_path is not None else None
        self._log_responses = log_responses
        self._flush_interval = flush_interval
        self._lock = threading.Lock()
        self._seq = 0
        self._unflushed = 0
        self.stats = AuditStats()
        self._budgets = ClientBudgets(
            limits.client_bytes_per_second, limits.client_burst_bytes, limits.summary_interval, clock
        )
        self._disk = DiskWatch(
            [os.path.dirname(os.path.abspath(f.path)) for f in self._files()],
            limits.min_free_bytes,
            limits.reserve_bytes,
            clock,
        )
        self._json.open()
        if self._proto is not None:
            self._proto.open()
        self._disk.poll()

    @property
    def log_responses(self) -> bool:
        """Whether replies are recorded; lets a caller skip building replies just for the log."""
        return self._log_responses

    @property
    def _writes_since_flush(self) -> int:
        # Entries written since the last flush, under the pacsys release's name (its tests read it).
        return self._unflushed

    @property
    def healthy(self) -> bool:
        """False from a failed write of the JSON log until its next good flush.

        A server can use it to refuse writes it could not record.
        """
        return not self._json.failing

    @property
    def disk_free_bytes(self) -> int | None:
        """Free bytes on the audit files' filesystem (the lower of two), at the last look."""
        return self._disk.free_bytes

    @property
    def low_space(self) -> int:
        """0: enough free space; 1: below min_free_bytes (warned); 2: below reserve_bytes (only
        Sets are recorded in full)."""
        return self._disk.level

    def log_request(
        self,
        ctx: RequestContext,
        decision: PolicyDecision,
        *,
        must_record: bool = False,
        summarisable: bool | None = None,
        refusal: bool = False,
    ) -> int:
        """Record a request and the policy decision; returns its ``seq`` for the reply and events.

        ``final_drfs`` is recorded when the decision carries a context whose DRFs differ.
        Strings a client sent are kept as bounded excerpts (the binary capture, when there is
        one, holds the whole request), a Read's DRF list up to ``limits.drf_chars``. With
        ``must_record`` the entry is written in full and flushed at once, and AuditUnavailable
        is raised when it did not reach the file: a write must not be made.

        ``summarisable``: whether the entry may be left to its client's summary when the client
        is over its byte budget or the disk is low (default: every entry but a Set's).
        ``refusal``: a request refused before the policies, whose DRFs the caller cut to an
        excerpt already; it may be summarised.
        """
        allowed, reason = decision.allowed, decision.reason
        final_drfs = decision.ctx.drfs if decision.ctx is not None else None
        if summarisable is None:
            summarisable = refusal or ctx.rpc_method != "Set"
        summarisable = summarisable and not must_record
        # A Read's list is cut at drf_chars; a refusal's is an excerpt already, a Set's is whole.
        chars = self.limits.drf_chars if ctx.rpc_method != "Set" and not refusal else None
        with self._lock:
            self._seq += 1
            seq = self._seq
            try:
                drfs, left_out = _listed(ctx.drfs, chars)
                entry: dict[str, object] = {
                    "ts": _now(),
                    "seq": seq,
                    "dir": "in",
                    "peer": ctx.peer,
                    "method": ctx.rpc_method,
                    "drfs": drfs,
                    "allowed": allowed,
                    "reason": None if reason is None else excerpt(reason, 1000),
                }
                if left_out is not None:
                    entry["drfs_left_out"] = left_out
                if ctx.identity and ctx.identity != ctx.peer:
                    entry["identity"] = excerpt(ctx.identity)
                if ctx.values:
                    entry["values"] = [[excerpt(drf), _bounded(value)] for drf, value in ctx.values[:MAX_LISTED]]
                if final_drfs is not None and list(final_drfs) != list(ctx.drfs):
                    entry["final_drfs"], final_left_out = _listed(final_drfs, chars)
                    if final_left_out is not None:
                        entry["final_drfs_left_out"] = final_left_out
                        left_out = left_out or final_left_out
                line = _encode(entry)
                if line is None:
                    raise ValueError("the entry does not encode as JSON")
            except Exception:
                self._json.failing = True
                logger.exception("event=audit_entry_failed seq=%d", seq)
                if must_record:
                    raise AuditUnavailable(f"cannot build the entry of request seq {seq}") from None
                return seq
            frame = None
            if self._proto is not None and hasattr(ctx.raw_request, "SerializeToString"):
                frame = self._frame(seq, _REQUEST_TAGS.get(ctx.rpc_method), ctx.raw_request)
            who = excerpt(ctx.identity or peer_host(ctx.peer))
            cost = len(line) + (len(frame) if frame is not None else 0)
            self._disk.poll()
            left_to_summary = None
            if summarisable:
                if self._disk.level >= 2:
                    left_to_summary = LOW_SPACE
                elif not self._budgets.admit(who, cost):
                    left_to_summary = OVER_BUDGET
            else:
                self._budgets.charge(who, cost)
            if left_to_summary is not None:
                summary = self._budgets.summary(who, str(entry["ts"]))
                summary.add(seq, ctx.peer, ctx.rpc_method, allowed, line, _len(frame))
                summary.reasons[left_to_summary] += 1
                self.stats.summarised[left_to_summary] += 1
                self.stats.summarised_bytes += cost
            else:
                if left_out is not None:
                    self.stats.drf_lists_cut += 1
                self._write(seq, line, frame, flush=must_record)
            self._write_summaries()
            if must_record and self._json.failing:
                raise AuditUnavailable(f"{self._json.path}: cannot record request seq {seq}")
        return seq

    def log_response(self, seq: int, peer: str, method: str, response: Any) -> None:
        """Record one reply (a ReadingReply of a Read stream or a SettingReply) to ``peer`` when ``log_responses``."""
        if not self._log_responses:
            return
        with self._lock:
            entry: dict[str, object] = {"ts": _now(), "seq": seq, "dir": "out", "peer": peer, "method": method}
            try:
                entry.update(summarize_reply(method, response))
            except Exception:
                logger.exception("event=audit_reply_summary_failed rpc=%s seq=%d", method, seq)
            frame = self._frame(seq, _REPLY_TAGS.get(method), response) if self._proto is not None else None
            self._write(seq, _encode(entry), frame)

    def log_event(self, seq: int, event: str, /, **fields: object) -> None:
        """Record a notable outcome of request ``seq``; ``fields`` cannot replace ts/seq/dir/event."""
        with self._lock:
            entry: dict[str, object] = {"ts": _now(), "seq": seq, "dir": "event", "event": event}
            for key, value in fields.items():
                try:
                    entry.setdefault(key, _jsonable(value))
                except Exception:  # e.g. a self-referencing list
                    logger.exception("event=audit_field_failed field=%s audit_event=%s", key, event)
            self._write(seq, _encode(entry), None)

    def flush(self) -> None:
        """Push buffered entries to the OS, notice a file deleted while open (then not `healthy`),
        write the client summaries that are due and look at the free space.

        The server calls it a few times a second, so that a deleted audit directory refuses
        writes and shows in the ``audit`` health, and summaries are written, even when no
        request comes.
        """
        with self._lock:
            self._write_summaries()
            self._disk.poll()
            self._flush()

    def close(self) -> None:
        """Write every pending summary, flush and release the files; a later entry reopens them
        in append mode."""
        with self._lock:
            self._write_summaries(everything=True)
            for f in self._files():
                try:
                    f.close()
                except Exception:
                    self._failed(f, "close")
            self._unflushed = 0

    def reopen(self) -> bool:
        """Close the files and open them again by name (a rotated file is left to its mover).

        The pending summaries go to the old files first: they tell what those left out.
        False when one could not be opened (logged; the next entry tries again).
        """
        reopened = True
        with self._lock:
            self._write_summaries(everything=True)
            for f in self._files():
                try:
                    f.close()
                    f.open()
                except Exception:
                    reopened = False
                    self._failed(f, "reopen")
            self._unflushed = 0
        return reopened

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _files(self) -> list[_File]:
        return [self._json] if self._proto is None else [self._json, self._proto]

    def _frame(self, seq: int, tag: int | None, message: Any) -> bytes | None:
        """One frame of the binary capture, or None (logged) when the message will not serialize."""
        assert self._proto is not None
        try:
            if tag is None:
                raise ValueError(f"no frame tag for {type(message).__name__}")
            payload = message.SerializeToString()
        except Exception:
            self._failed(self._proto, "serialize_frame", seq)
            return None
        return bytes((tag,)) + varint(len(payload)) + payload

    def _write(self, seq: int, line: bytes | None, frame: bytes | None, flush: bool = False) -> None:
        """Write one entry's line (None: it would not encode) and its optional frame. Holds the
        lock; never raises."""
        if line is None:
            self._failed(self._json, "encode_entry", seq)
        if self.limits.max_bytes and self._over_max_bytes(len(line or b""), len(frame or b"")):
            self._rotate()
        if line is not None:
            try:
                self._json.write(line)
                self.stats.written_bytes += len(line)
            except Exception:
                self._failed(self._json, "write_entry", seq)
        if frame is not None and self._proto is not None:
            try:
                self._proto.write(frame)
                self.stats.written_bytes += len(frame)
            except Exception:
                self._failed(self._proto, "write_frame", seq)
        self._unflushed += 1
        if flush or self._unflushed >= self._flush_interval:
            self._flush()

    def _write_summaries(self, everything: bool = False) -> None:
        """Write the client summaries that are due (all of them with `everything`); each is
        charged to its client, whatever its budget holds."""
        for summary in self._budgets.due(everything):
            line = _encode(summary.entry(_now()))
            if line is not None:
                self._budgets.charge(summary.identity, len(line))
            self._write(summary.last_seq, line, None)

    def _over_max_bytes(self, line: int, frame: int) -> bool:
        """Whether writing `line` and `frame` bytes would take a file past max_bytes (an empty
        file takes any entry: one larger than max_bytes is written whole, alone)."""
        limit = self.limits.max_bytes
        sizes = [(self._json.size, line)]
        if self._proto is not None:
            sizes.append((self._proto.size, frame))
        return any(size > 0 and size + n > limit for size, n in sizes)

    def _rotate(self) -> None:
        """path -> path.1 -> ... -> path.keep (the oldest dropped), the capture with it, so that
        path.N and proto_path.N hold the same requests. The files are opened again by the next
        write; a rename that fails is logged and the file goes on growing."""
        for f in self._files():
            try:
                f.close()
            except Exception:
                self._failed(f, "close_for_rotation")
        keep = self.limits.keep
        for f in self._files():
            try:
                for n in range(keep - 1, 0, -1):
                    with contextlib.suppress(FileNotFoundError):
                        os.replace(f"{f.path}.{n}", f"{f.path}.{n + 1}")
                os.replace(f.path, f"{f.path}.1")
            except OSError as exc:
                logger.error("event=audit_rotation_failed path=%s error=%s", f.path, exc)
            else:
                logger.info("event=audit_rotated path=%s max_bytes=%d keep=%d", f.path, self.limits.max_bytes, keep)
        self.stats.rotations += 1
        self._unflushed = 0

    def _flush(self) -> None:
        self._unflushed = 0
        for f in self._files():
            try:
                f.flush()
            except Exception:
                self._failed(f, "flush")
            else:
                if f.failing and f.is_open:  # a dropped handle flushed nothing
                    f.failing = False
                    logger.warning("event=audit_file_recovered path=%s", f.path)

    @staticmethod
    def _failed(f: _File, action: str, seq: int | None = None) -> None:
        # The traceback once per run of failures: a full disk must not add one to every request.
        text = "event=audit_file_failed path=%s action=%s"
        args: list[object] = [f.path, action]
        if seq is not None:
            text, args = text + " seq=%d", [*args, seq]
        if f.failing:
            logger.debug(text, *args, exc_info=True)
        else:
            f.failing = True
            logger.exception(text, *args)


def _encode(entry: dict[str, object]) -> bytes | None:
    """One JSON line, or None when the entry will not encode."""
    try:
        return json.dumps(entry, separators=(",", ":"), default=repr).encode() + b"\n"
    except Exception:
        return None


def _len(data: bytes | None) -> int | None:
    return None if data is None else len(data)


def _now() -> str:
    return datetime.now(UTC).isoformat()
