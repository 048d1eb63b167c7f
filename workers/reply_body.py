"""The DAQ reply body of a reading, written by hand in protobuf's wire format.

A `ReadingReply` is its `index` field followed by its oneof field; this module writes the
oneof part (`readings` with one `Reading`, or `status`). Workers encode the bodies of their
readings here, so that the front only prepends each client's index (`pacsys.replies`), and
they do it without generated protobuf code or anything of this project's `pacsys` package:
a worker may run in another environment (the pacsys release's) where only this package,
msgspec and the standard library are ours to import. The front uses the same function for
readings of a backend it hosts itself, so there is one encoder.

The bytes are what protobuf itself writes for the same message (fields in number order,
proto3 defaults left out, repeated doubles packed); the tests compare the two.

A reading is read through its attributes only (`value_type`, `value`, `facility_code`,
`error_code`, `message`, `timestamp`), so readings of either pacsys work.
"""

from __future__ import annotations

import struct
from datetime import datetime

from workers.epoch import since_epoch

__all__ = ["reading_body", "status_body", "varint"]

# pacsys.status's, which the worker runtime cannot import (tests/test_errors.py keeps them equal)
DPM = 17
DPM_INTERNAL = -45

_DOUBLE = struct.Struct("<d")
_ZERO = bytes(8)
_SCALAR_TAG = b"\x09"  # Value.scalar: field 1, 64-bit


def varint(n: int) -> bytes:
    """A protobuf varint; int32/int64 negatives as ten-byte two's complement."""
    if n < 0:
        n += 1 << 64  # int32/int64 negatives are ten-byte two's complement varints
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _tag(field: int, wire_type: int) -> bytes:
    return varint(field << 3 | wire_type)


def _message(field: int, payload: bytes) -> bytes:
    return _tag(field, 2) + varint(len(payload)) + payload


def _text(field: int, text: str) -> bytes:
    return _message(field, text.encode("utf-8"))


def _int(field: int, n: int) -> bytes:
    return _tag(field, 0) + varint(n) if n else b""


def _status(facility: int, code: int, message: str | None) -> bytes:
    # common.status.Status: facility_code 1, status_code 2 (int32), message 3
    out = _int(1, _int32(facility)) + _int(2, _int32(code))
    return out + _text(3, message) if message else out


def _int32(n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or not -(2**31) <= n < 2**31:
        raise TypeError(f"{n!r} is not an int32")
    return n


def _uint32(n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < 2**32:
        raise TypeError(f"{n!r} is not a uint32")
    return n


def _double(field: int, x: object) -> bytes:
    return _tag(field, 1) + _DOUBLE.pack(float(x))  # type: ignore[arg-type]


def _doubles(values: object) -> bytes:
    # ScalarArray.value 1, packed; an empty list is left out
    data = b"".join(_DOUBLE.pack(float(v)) for v in values)  # type: ignore[attr-defined]
    return _message(1, data) if data else b""


def _texts(values: object) -> bytes:
    return b"".join(_text(1, str(v)) for v in values)  # type: ignore[attr-defined]


# Alarm blocks: python key -> (field number, kind); analog and digital share fields 3..8.
_ALARM = {
    "alarm_enable": (3, "bool"),
    "alarm_status": (4, "bool"),
    "abort": (5, "bool"),
    "abort_inhibit": (6, "bool"),
    "tries_needed": (7, "uint32"),
    "tries_now": (8, "uint32"),
}
_ANALOG = {"minimum": (1, "double"), "maximum": (2, "double"), **_ALARM}
_DIGITAL = {"nominal": (1, "int32"), "mask": (2, "uint32"), **_ALARM}


def _alarm(value: object, fields: dict[str, tuple[int, str]]) -> bytes:
    if not isinstance(value, dict):
        raise TypeError("alarm block value must be a dict")
    out = b""
    for key, (number, kind) in fields.items():
        if key not in value:
            continue
        v = value[key]
        if kind == "double":
            packed = _DOUBLE.pack(float(v))
            out += _tag(number, 1) + packed if packed != _ZERO else b""  # proto3 leaves out 0.0
        elif kind == "bool":
            if not isinstance(v, bool | int):
                raise TypeError(f"{key} must be a bool, got {v!r}")
            out += _int(number, 1 if v else 0)
        elif kind == "int32":
            out += _int(number, _int32(v))
        else:
            out += _int(number, _uint32(v))
    return out


def _value(value_type: str, value: object) -> bytes:
    """common.device.Value with its oneof set; TypeError/ValueError when `value` does not fit."""
    if value_type == "scalar":
        return _double(1, value)
    if value_type == "scalarArr":
        return _message(2, _doubles(value))
    if value_type == "timedScalarArr":  # sent as its data points (the wire has no timed array)
        return _message(2, _doubles(value.get("data", []) if isinstance(value, dict) else value))
    if value_type == "raw":
        if not isinstance(value, bytes | bytearray | memoryview):
            raise TypeError(f"raw value must be bytes, got {type(value).__name__}")
        return _message(3, bytes(value))
    if value_type == "text":
        return _text(4, str(value))
    if value_type == "textArr":
        return _message(5, _texts(value))
    if value_type == "anaAlarm":
        return _message(6, _alarm(value, _ANALOG))
    if value_type == "digAlarm":
        return _message(7, _alarm(value, _DIGITAL))
    if value_type == "basicStatus":
        entries = b"".join(
            _message(1, _text(1, str(k)) + _text(2, str(v)))
            for k, v in dict(value).items()  # type: ignore[call-overload]
        )
        return _message(8, entries)
    raise TypeError(f"cannot send value of type {value_type}")


def _timestamp(ts: datetime) -> bytes:
    """google.protobuf.Timestamp: seconds 1 (int64), nanos 2; a naive time counts as UTC."""
    seconds, micros = since_epoch(ts)
    nanos = micros * 1000
    return (b"\x08" + varint(seconds) if seconds else b"") + (b"\x10" + varint(nanos) if nanos else b"")


def status_body(facility_code: int, status_code: int, message: str = "") -> bytes:
    """A reply body that is a status only (ReadingReply.status, field 3)."""
    return _message(3, _status(facility_code, status_code, message))


def _type_name(value_type: object) -> str:
    # A ValueType of either pacsys (its value is the wire name), or the name itself.
    return value_type if isinstance(value_type, str) else value_type.value  # type: ignore[attr-defined]


def reading_body(reading: object) -> bytes:
    """The serialized oneof part of the ReadingReply for `reading` (index not included).

    A reading with data (status >= 0 and a value) is sent in `readings`, with its status
    (facility, code, message) when any of them is set and its timestamp only when it has one:
    a client must be able to tell a device's time from none. Otherwise it is a status.
    A value that cannot be encoded is answered with DPM's internal error, naming the DRF.
    """
    r = reading
    error = r.error_code  # type: ignore[attr-defined]
    value = r.value  # type: ignore[attr-defined]
    if error < 0 or value is None:
        return status_body(r.facility_code, error, r.message or "")  # type: ignore[attr-defined]
    try:
        type_name = _type_name(r.value_type)  # type: ignore[attr-defined]
        # The common case, a scalar, skips the generic path: Value{scalar} is 11 fixed bytes.
        data = _SCALAR_TAG + _DOUBLE.pack(value) if type_name == "scalar" else _value(type_name, value)
    except (TypeError, ValueError, AttributeError, OverflowError) as exc:
        return status_body(DPM, DPM_INTERNAL, f"cannot encode value of {r.drf}: {exc}")  # type: ignore[attr-defined]
    ts = r.timestamp  # type: ignore[attr-defined]
    out = _message(1, _timestamp(ts)) if ts is not None else b""
    out += _message(2, data)
    facility, message = r.facility_code, r.message  # type: ignore[attr-defined]
    if facility or error or message:
        out += _message(3, _status(facility, error, message))
    # ReadingReply.readings (2) -> Readings.reading (2) -> Reading; short lengths are one byte.
    n = len(out)
    if n < 126:
        return bytes((0x12, n + 2, 0x12, n)) + out
    return _message(2, _message(2, out))
