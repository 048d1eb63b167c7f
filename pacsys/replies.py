"""Conversions between pacsys values and the DAQ wire messages.

Replies are built as bytes: a `ReadingReply` is its `index` field followed by its
oneof field, so the oneof part of a reading is serialized once (`reading_body`) and
each client slot only prepends its index (`reply_bytes`). The bytes are exactly what
protobuf itself would write for the same message.

Bodies are written by `workers.reply_body` (re-exported here as `reading_body` and
`status_body`), the one encoder of the front and of the workers: a worker encodes the bodies
of its readings, and the front then only prepends indices (the pool hands the bodies over
as they came: `AsyncBackend.read_bodies`, `AsyncBackend.subscribe_bodies`).
"""

from __future__ import annotations

from datetime import UTC
from typing import Any

from pacsys._proto.controls.common.v1 import device_pb2, status_pb2
from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2
from pacsys.types import Reading, ValueType, WriteResult, infer_value_type
from workers.reply_body import reading_body, status_body, varint

__all__ = [
    "reading_body",
    "reading_from_reply",
    "reply_bytes",
    "setting_reply",
    "status_body",
    "value_from_proto",
    "value_to_proto",
]

_ALARM_FIELDS = {
    # python key -> wire field, shared by analog and digital alarm blocks
    "alarm_enable": "alarmEnable",
    "alarm_status": "alarmStatus",
    "abort": "abort",
    "abort_inhibit": "abortInhibit",
    "tries_needed": "triesNeeded",
    "tries_now": "triesNow",
}
_ANALOG_FIELDS = {"minimum": "minimum", "maximum": "maximum", **_ALARM_FIELDS}
_DIGITAL_FIELDS = {"nominal": "nominal", "mask": "mask", **_ALARM_FIELDS}


def value_to_proto(value: Any, value_type: ValueType | None, out: device_pb2.Value) -> None:
    """Fill `out` with `value`; TypeError when it cannot be sent as `value_type`."""
    vt = value_type or infer_value_type(value)
    if vt is ValueType.SCALAR:
        out.scalar = float(value)
    elif vt is ValueType.SCALAR_ARRAY:
        out.scalarArr.value.extend(float(v) for v in value)
    elif vt is ValueType.TIMED_SCALAR_ARRAY:
        data = value.get("data", []) if isinstance(value, dict) else value
        out.scalarArr.value.extend(float(v) for v in data)
    elif vt is ValueType.RAW:
        out.raw = bytes(value)
    elif vt is ValueType.TEXT:
        out.text = str(value)
    elif vt is ValueType.TEXT_ARRAY:
        out.textArr.value.extend(str(v) for v in value)
    elif vt is ValueType.ANALOG_ALARM:
        _fill(out.anaAlarm, value, _ANALOG_FIELDS)
    elif vt is ValueType.DIGITAL_ALARM:
        _fill(out.digAlarm, value, _DIGITAL_FIELDS)
    elif vt is ValueType.BASIC_STATUS:
        for k, v in dict(value).items():
            out.basicStatus.value[str(k)] = str(v)
    else:
        raise TypeError(f"cannot send value of type {vt}")


def _fill(msg, value: object, fields: dict[str, str]) -> None:
    if not isinstance(value, dict):
        raise TypeError("alarm block value must be a dict")
    for key, wire in fields.items():
        if key in value:
            setattr(msg, wire, value[key])
    msg.SetInParent()


def value_from_proto(msg: device_pb2.Value) -> object:
    """The Python value of a wire Value; ValueError when it is unset."""
    kind = msg.WhichOneof("value")
    if kind is None:
        raise ValueError("value is not set")
    if kind == "scalar":
        return msg.scalar
    if kind == "scalarArr":
        return list(msg.scalarArr.value)
    if kind == "raw":
        return bytes(msg.raw)
    if kind == "text":
        return msg.text
    if kind == "textArr":
        return list(msg.textArr.value)
    if kind == "anaAlarm":
        return {k: getattr(msg.anaAlarm, w) for k, w in _ANALOG_FIELDS.items()}
    if kind == "digAlarm":
        return {k: getattr(msg.digAlarm, w) for k, w in _DIGITAL_FIELDS.items()}
    # basicStatus: "True"/"False" strings become bools, anything else stays text
    return {k: {"True": True, "False": False}.get(v, v) for k, v in msg.basicStatus.value.items()}


def reading_from_reply(drf: str, reply: DAQ_pb2.ReadingReply) -> Reading:
    """The Reading a DAQ server's reply describes (used by the grpc:// client backend)."""
    if reply.WhichOneof("value") == "readings" and reply.readings.reading:
        r = reply.readings.reading[0]
        kind = r.data.WhichOneof("value")
        return Reading(
            drf=drf,
            value_type=ValueType(kind) if kind else None,
            value=value_from_proto(r.data) if kind else None,
            facility_code=r.status.facility_code,
            error_code=r.status.status_code,
            message=r.status.message or None,
            timestamp=r.timestamp.ToDatetime(tzinfo=UTC) if r.HasField("timestamp") else None,
        )
    s = reply.status
    return Reading(drf=drf, facility_code=s.facility_code, error_code=s.status_code, message=s.message or None)


_INDEX_PREFIX = [b""] + [b"\x08" + varint(i) for i in range(1, 1024)]


def reply_bytes(index: int, body: bytes) -> bytes:
    """A serialized ReadingReply: the index field (omitted for 0, as protobuf does) and the body."""
    if index < len(_INDEX_PREFIX):
        return _INDEX_PREFIX[index] + body
    return b"\x08" + varint(index) + body


def setting_reply(results: list[WriteResult]) -> DAQ_pb2.SettingReply:
    reply = DAQ_pb2.SettingReply()
    for r in results:
        reply.status.append(
            status_pb2.Status(facility_code=r.facility_code, status_code=r.error_code, message=r.message or "")
        )
    return reply
