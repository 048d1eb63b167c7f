"""The front <-> worker protocol: every message that crosses a worker's socketpair.

Framing: each message is msgpack (msgspec), preceded by its length as a 4-byte
big-endian unsigned integer. Many frames travel in one socket write. A frame longer
than MAX_FRAME, or one that does not decode to a message below, is a protocol error:
the receiving side closes the connection (a worker then exits and is replaced).

Ids: the front numbers its requests (`id`) and its shared subscriptions (`sid`); a
reply carries the id of its request. Values travel as msgpack natives (float, int,
str, bytes, lists, maps) with their `value_type` name; timestamps as integer
nanoseconds since the Unix epoch (UTC).

This module imports nothing of this project's `pacsys` (a worker may run in another
environment, with the pacsys release): it reads a backend's readings through their
attributes. The front turns a wire reading back into its `Reading` (`pacsys.pool.wire`).
"""

from __future__ import annotations

import struct
from typing import Any

import msgspec

from workers import epoch
from workers.reply_body import reading_body

MAX_FRAME = 64 * 1024 * 1024
HEADER = struct.Struct(">I")

# Raised whenever a message changes shape. A worker says its version in Ready, and the pool
# refuses a worker of another version: a replacement starts from whatever code is on disk
# then, which an upgrade may have changed under a running front. (Ready itself only ever
# gains fields with defaults, so that any worker's Ready still decodes.)
PROTOCOL_VERSION = 1


class WireReading(msgspec.Struct, array_like=True, omit_defaults=True):
    """A Reading without its DRF (the request or subscription says which DRF it answers)."""

    facility: int = 0
    error: int = 0
    value_type: str | None = None
    value: object = None
    message: str | None = None
    timestamp_ns: int | None = None
    cycle: int | None = None
    # The reading's DAQ reply body (`pacsys.replies.reading_body`): encoded here, in the
    # worker, so that the front only prepends each client's index.
    body: bytes | None = None


class WireResult(msgspec.Struct, array_like=True, omit_defaults=True):
    """A WriteResult without its DRF."""

    facility: int = 0
    error: int = 0
    message: str | None = None


# -- front -> worker -----------------------------------------------------------------


class Read(msgspec.Struct, tag=True):
    """Read each DRF once; answered by ReadDone (one reading per DRF, in order) or Failed."""

    id: int
    drfs: list[str]
    timeout: float | None = None
    authorization: str | None = None


class Write(msgspec.Struct, tag=True):
    """Apply settings; answered by WriteDone (one result per setting, in order) or Failed.

    The worker applies the settings of one device one after another, in arrival order.
    """

    id: int
    drfs: list[str]
    values: list[object]
    timeout: float | None = None
    authorization: str | None = None


class Subscribe(msgspec.Struct, tag=True):
    """Open the backend subscription `sid` for one DRF; its readings come in Data."""

    sid: int
    drf: str
    authorization: str | None = None


class Unsubscribe(msgspec.Struct, tag=True):
    sid: int


class Ping(msgspec.Struct, tag=True):
    """Answered by Pong from the worker's event loop: proof that the loop turns."""

    seq: int


class Shutdown(msgspec.Struct, tag=True):
    """Stop subscriptions, close the backend and exit."""


# -- worker -> front -----------------------------------------------------------------


class Ready(msgspec.Struct, tag=True):
    """The backend is built; the worker serves from now on (if the front accepts its protocol)."""

    pid: int
    capabilities: int
    backend: str
    protocol: int = 0  # the worker's PROTOCOL_VERSION (0: a worker from before versions)


class StartupFailed(msgspec.Struct, tag=True):
    """The backend could not be built; the worker exits after sending this."""

    pid: int
    message: str


class ReadDone(msgspec.Struct, tag=True):
    id: int
    readings: list[WireReading]


class WriteDone(msgspec.Struct, tag=True):
    id: int
    results: list[WireResult]


class Failed(msgspec.Struct, tag=True):
    """A request raised. `kind` names the exception class so the front can map it to a status."""

    id: int
    kind: str
    message: str


class Data(msgspec.Struct, tag=True):
    """Subscription readings gathered in one flush: (sid, reading) pairs in arrival order."""

    items: list[tuple[int, WireReading]]


class SubscriptionEnded(msgspec.Struct, tag=True):
    """The backend ended subscription `sid` with an error (`kind`, `message`)."""

    sid: int
    kind: str
    message: str


class Pong(msgspec.Struct, tag=True):
    seq: int
    in_flight: int
    subscriptions: int


ToWorker = Read | Write | Subscribe | Unsubscribe | Ping | Shutdown
ToFront = Ready | StartupFailed | ReadDone | WriteDone | Failed | Data | SubscriptionEnded | Pong


class ProtocolError(Exception):
    """A malformed, truncated or oversized frame."""


_encoder = msgspec.msgpack.Encoder()


def encode(message: msgspec.Struct) -> bytes:
    payload = _encoder.encode(message)
    return HEADER.pack(len(payload)) + payload


class FrameReader:
    """Splits a byte stream into decoded messages of one direction's union type."""

    def __init__(self, message_type: object):
        self._decoder = msgspec.msgpack.Decoder(message_type)
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list:
        buffer = self._buffer
        buffer += data
        messages = []
        offset = 0
        size = len(buffer)
        with memoryview(buffer) as view:  # released before the buffer is resized below
            while size - offset >= 4:
                (length,) = HEADER.unpack_from(view, offset)
                if length > MAX_FRAME:
                    raise ProtocolError(f"frame of {length} bytes exceeds the limit of {MAX_FRAME}")
                end = offset + 4 + length
                if end > size:
                    break
                try:
                    messages.append(self._decoder.decode(view[offset + 4 : end]))
                except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                    raise ProtocolError(f"undecodable frame: {exc}") from None
                offset = end
        if offset:
            del buffer[:offset]
        return messages

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame still waiting for the rest."""
        return len(self._buffer)


# -- conversions to and from the library's types --------------------------------------

# BackendCapability flags by name, as the front's `pacsys.types.BackendCapability` numbers
# them (a test keeps the two equal); a worker's backend may come from another pacsys.
CAPABILITY_BITS = {"READ": 1, "WRITE": 2, "STREAM": 4, "AUTH_KERBEROS": 8, "AUTH_JWT": 16, "BATCH": 32}


def capability_bits(capabilities: object) -> int:
    """The front's capability number of any pacsys's BackendCapability flags (unknown names ignored)."""
    return sum(bit for name, bit in CAPABILITY_BITS.items() if _has_flag(capabilities, name))


def _has_flag(capabilities: object, name: str) -> bool:
    member = getattr(type(capabilities), name, None)
    return member is not None and (capabilities & member) == member  # type: ignore[operator]


def plain_value(value: object) -> object:
    """`value` as msgpack natives: numpy arrays and scalars (a release's readings keep them) become lists and numbers."""
    if isinstance(value, dict):
        return {k: plain_value(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [plain_value(v) for v in value]
    if isinstance(value, str | bytes | int | float | list) or value is None:
        return value
    tolist = getattr(value, "tolist", None)  # numpy, without importing it
    return tolist() if callable(tolist) else value


def reading_to_wire(reading: object) -> WireReading:
    """A reading of any pacsys, through its attributes, with its reply body encoded."""
    r: Any = reading
    ts = r.timestamp
    vt = r.value_type
    return WireReading(
        facility=r.facility_code,
        error=r.error_code,
        value_type=None if vt is None else vt.value,
        value=plain_value(r.value),
        message=r.message,
        timestamp_ns=None if ts is None else epoch.to_ns(ts),
        cycle=r.cycle,
        body=reading_body(r),
    )
