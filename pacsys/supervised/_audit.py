"""Audit log of the gateway: who asked for what, what the policies decided, and what came back.

Two append-only files:

* A JSON-lines log (``path``), one object per line, ``seq`` counting from 1 per ``AuditLog``:

  - ``"dir": "in"``, one per request: ``ts`` (ISO-8601 with timezone), ``seq``, ``peer``,
    ``method``, ``drfs``, ``allowed``, ``reason``; ``values`` (``[[drf, value], ...]``) for a
    Set; ``final_drfs`` only when a policy changed the DRF list.
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
to the command). ``read_audit``/``read_audit_proto`` read the files back, and
the ``pacsys-audit`` command (`pacsys.supervised.audit_command`) prints them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any, BinaryIO, Literal, overload

from workers.reply_body import varint

from ._policies import PolicyDecision, RequestContext
from ._refusal_log import excerpt

if TYPE_CHECKING:
    from google.protobuf.message import Message

__all__ = [
    "TAG_READ_REPLY",
    "TAG_READ_REQUEST",
    "TAG_SETTING_REPLY",
    "TAG_SETTING_REQUEST",
    "AuditLog",
    "AuditUnavailable",
    "read_audit",
    "read_audit_proto",
]

logger = logging.getLogger("pacsys.supervised.audit")

TAG_READ_REQUEST = 0
TAG_READ_REPLY = 1
TAG_SETTING_REQUEST = 2
TAG_SETTING_REPLY = 3

_REQUEST_TAGS = {"Read": TAG_READ_REQUEST, "Set": TAG_SETTING_REQUEST}
_REPLY_TAGS = {"Read": TAG_READ_REPLY, "Set": TAG_SETTING_REPLY}
# tag -> (method, DAQ_pb2 message name)
TAG_TYPES = {
    TAG_READ_REQUEST: ("Read", "ReadingList"),
    TAG_READ_REPLY: ("Read", "ReadingReply"),
    TAG_SETTING_REQUEST: ("Set", "SettingList"),
    TAG_SETTING_REPLY: ("Set", "SettingReply"),
}

PathLike = str | os.PathLike[str]
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

    Thread-safe: one lock serializes all entries, so ``seq`` order is file order.
    """

    def __init__(
        self, path: PathLike, proto_path: PathLike | None = None, log_responses: bool = False, flush_interval: int = 1
    ):
        if flush_interval < 1:
            raise ValueError(f"flush_interval must be >= 1, got {flush_interval}")
        self._json = _File(path)
        self._proto = _File(proto_path) if proto_path is not None else None
        self._log_responses = log_responses
        self._flush_interval = flush_interval
        self._lock = threading.Lock()
        self._seq = 0
        self._unflushed = 0
        self._json.open()
        if self._proto is not None:
            self._proto.open()

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

    def log_request(self, ctx: RequestContext, decision: PolicyDecision, *, must_record: bool = False) -> int:
        """Record a request and the policy decision; returns its ``seq`` for the reply and events.

        ``final_drfs`` is recorded when the decision carries a context whose DRFs differ.
        Strings a client sent are kept as bounded excerpts (the binary capture, when there is
        one, holds the whole request). With ``must_record`` the entry is flushed at once, and
        AuditUnavailable is raised when it did not reach the file: a write must not be made.
        """
        allowed, reason = decision.allowed, decision.reason
        final_drfs = decision.ctx.drfs if decision.ctx is not None else None
        with self._lock:
            self._seq += 1
            seq = self._seq
            try:
                entry: dict[str, object] = {
                    "ts": _now(),
                    "seq": seq,
                    "dir": "in",
                    "peer": ctx.peer,
                    "method": ctx.rpc_method,
                    "drfs": [excerpt(d, 1000) for d in ctx.drfs[:MAX_LISTED]],
                    "allowed": allowed,
                    "reason": None if reason is None else excerpt(reason, 1000),
                }
                if ctx.identity and ctx.identity != ctx.peer:
                    entry["identity"] = excerpt(ctx.identity)
                if ctx.values:
                    entry["values"] = [[excerpt(drf), _bounded(value)] for drf, value in ctx.values[:MAX_LISTED]]
                if final_drfs is not None and list(final_drfs) != list(ctx.drfs):
                    entry["final_drfs"] = [excerpt(d, 1000) for d in final_drfs[:MAX_LISTED]]
            except Exception:
                self._json.failing = True
                logger.exception("audit: cannot build entry for request seq %d", seq)
                if must_record:
                    raise AuditUnavailable(f"cannot build the entry of request seq {seq}") from None
                return seq
            frame = None
            if hasattr(ctx.raw_request, "SerializeToString"):
                frame = (_REQUEST_TAGS.get(ctx.rpc_method), ctx.raw_request)
            self._record(entry, frame, flush=must_record)
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
                logger.exception("audit: cannot summarize %s reply for seq %d", method, seq)
            self._record(entry, (_REPLY_TAGS.get(method), response))

    def log_event(self, seq: int, event: str, /, **fields: object) -> None:
        """Record a notable outcome of request ``seq``; ``fields`` cannot replace ts/seq/dir/event."""
        with self._lock:
            entry: dict[str, object] = {"ts": _now(), "seq": seq, "dir": "event", "event": event}
            for key, value in fields.items():
                try:
                    entry.setdefault(key, _jsonable(value))
                except Exception:  # e.g. a self-referencing list
                    logger.exception("audit: cannot record field %r of event %r", key, event)
            self._record(entry, None)

    def flush(self) -> None:
        """Push buffered entries to the OS, and notice a file deleted while open (then not `healthy`).

        The server calls it a few times a second, so that a deleted audit directory refuses
        writes and shows in the ``audit`` health even when no request comes.
        """
        with self._lock:
            self._flush()

    def close(self) -> None:
        """Flush and release the files; a later entry reopens them in append mode."""
        with self._lock:
            for f in (self._json, self._proto):
                if f is not None:
                    try:
                        f.close()
                    except Exception:
                        self._failed(f, "cannot close")
            self._unflushed = 0

    def reopen(self) -> bool:
        """Close the files and open them again by name (a rotated file is left to its mover).

        False when one could not be opened (logged; the next entry tries again).
        """
        reopened = True
        with self._lock:
            for f in (self._json, self._proto):
                if f is None:
                    continue
                try:
                    f.close()
                    f.open()
                except Exception:
                    reopened = False
                    self._failed(f, "cannot reopen")
            self._unflushed = 0
        return reopened

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _record(self, entry: dict[str, object], frame: tuple[int | None, Any] | None, flush: bool = False) -> None:
        """Write one entry and its optional (tag, message) frame. Holds the lock; never raises."""
        seq = entry.get("seq")
        try:
            self._json.write(json.dumps(entry, separators=(",", ":"), default=repr).encode() + b"\n")
        except Exception:
            self._failed(self._json, "cannot write entry seq %s", seq)
        if frame is not None and self._proto is not None:
            tag, message = frame
            try:
                if tag is None:
                    raise ValueError(f"no frame tag for method {entry.get('method')!r}")
                payload = message.SerializeToString()
                self._proto.write(bytes((tag,)) + varint(len(payload)) + payload)
            except Exception:
                self._failed(self._proto, "cannot write frame of seq %s", seq)
        self._unflushed += 1
        if flush or self._unflushed >= self._flush_interval:
            self._flush()

    def _flush(self) -> None:
        self._unflushed = 0
        for f in (self._json, self._proto):
            if f is None:
                continue
            try:
                f.flush()
            except Exception:
                self._failed(f, "cannot flush")
            else:
                if f.failing and f.is_open:  # a dropped handle flushed nothing
                    f.failing = False
                    logger.warning("audit: %s: recording again", f.path)

    @staticmethod
    def _failed(f: _File, what: str, *args: object) -> None:
        # The traceback once per run of failures: a full disk must not add one to every request.
        if f.failing:
            logger.debug("audit: %s: " + what, f.path, *args, exc_info=True)
        else:
            f.failing = True
            logger.exception("audit: %s: " + what, f.path, *args)


def _now() -> str:
    return datetime.now(UTC).isoformat()


def read_audit(path: PathLike) -> Iterator[dict[str, Any]]:
    """Yield the entries of a JSON-lines audit log; raises ValueError at a malformed line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                raise ValueError(f"{os.fspath(path)}:{lineno}: not a JSON audit entry (truncated write?)") from None
            if not isinstance(entry, dict):
                raise ValueError(f"{os.fspath(path)}:{lineno}: not a JSON object")
            yield entry


@overload
def read_audit_proto(path: PathLike, decode: Literal[False] = False) -> Iterator[tuple[int, bytes]]: ...
@overload
def read_audit_proto(path: PathLike, decode: Literal[True]) -> Iterator[tuple[int, Message]]: ...
def read_audit_proto(path: PathLike, decode: bool = False) -> Iterator[tuple[int, Any]]:
    """Yield ``(tag, payload)`` per frame of a binary capture; with ``decode`` the payload is parsed
    into its DAQ_pb2 message. Raises ValueError at a truncated or malformed frame."""
    classes: dict[int, Any] = {}
    if decode:  # the generated code is needed only to decode
        from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2

        classes = {tag: getattr(DAQ_pb2, name) for tag, (_, name) in TAG_TYPES.items()}
    name = os.fspath(path)
    with open(path, "rb") as f:
        offset = 0
        while tag_byte := f.read(1):
            tag = tag_byte[0]
            if tag not in TAG_TYPES:
                raise ValueError(f"{name}: unknown frame tag {tag} at offset {offset}")
            length, width = _read_varint(f, name, offset)
            payload = f.read(length)
            if len(payload) < length:
                raise ValueError(
                    f"{name}: truncated frame at offset {offset}: {len(payload)} of {length} payload bytes"
                )
            if decode:
                try:
                    yield tag, classes[tag].FromString(payload)
                except Exception as e:  # protobuf's DecodeError
                    raise ValueError(f"{name}: undecodable frame at offset {offset}: {e}") from None
            else:
                yield tag, payload
            offset += 1 + width + length


def _read_varint(f: IO[bytes], name: str, offset: int) -> tuple[int, int]:
    """(value, bytes used) of the length varint of the frame at ``offset``."""
    value = 0
    for i in range(10):  # a 64-bit varint has at most 10 bytes
        byte = f.read(1)
        if not byte:
            raise ValueError(f"{name}: truncated frame at offset {offset}: length cut short")
        value |= (byte[0] & 0x7F) << (7 * i)
        if not byte[0] & 0x80:
            return value, i + 1
    raise ValueError(f"{name}: malformed frame length at offset {offset}")
