"""Replies built as bytes are exactly what protobuf writes for the same message."""

from datetime import datetime, timedelta, timezone

from hypothesis import given
from hypothesis import strategies as st

from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2
from pacsys.replies import reading_body, reply_bytes
from pacsys.status import DPM, DPM_INTERNAL
from pacsys.types import Reading, ValueType

offsets = st.one_of(st.none(), st.integers(-23 * 60, 23 * 60).map(lambda m: timezone(timedelta(minutes=m))))
times = st.builds(
    lambda dt, tz: dt if tz is None else dt.replace(tzinfo=tz),
    st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)),
    offsets,
)


def _expected(index: int, value: float, when: datetime) -> bytes:
    reply = DAQ_pb2.ReadingReply(index=index)
    reading = reply.readings.reading.add()
    reading.timestamp.FromDatetime(when)  # protobuf's own conversion: a naive time is UTC
    reading.data.scalar = value
    return reply.SerializeToString()


@given(times, st.floats(allow_nan=False), st.integers(0, 5000))
def test_scalar_reading_matches_protobuf(when, value, index):
    reading = Reading(drf="M:OUTTMP", value_type=ValueType.SCALAR, value=value, timestamp=when)
    assert reply_bytes(index, reading_body(reading)) == _expected(index, value, when)


def test_error_reading_is_a_status():
    reading = Reading(drf="M:OUTTMP", facility_code=DPM, error_code=DPM_INTERNAL, message="boom")
    reply = DAQ_pb2.ReadingReply.FromString(reply_bytes(3, reading_body(reading)))
    assert reply.index == 3
    assert reply.WhichOneof("value") == "status"
    assert (reply.status.facility_code, reply.status.status_code, reply.status.message) == (DPM, DPM_INTERNAL, "boom")


def _protobuf_body(reading: Reading) -> bytes:
    """What protobuf itself writes for a reading with data (the hand encoder must agree)."""
    from pacsys.replies import value_to_proto

    reply = DAQ_pb2.ReadingReply()
    r = reply.readings.reading.add()
    if reading.timestamp is not None:
        r.timestamp.FromDatetime(reading.timestamp)
    value_to_proto(reading.value, reading.value_type, r.data)
    if reading.facility_code or reading.error_code or reading.message:
        r.status.facility_code = reading.facility_code
        r.status.status_code = reading.error_code
        r.status.message = reading.message or ""
    return reply.SerializeToString()


VALUES = [
    (ValueType.SCALAR, -0.0),
    (ValueType.SCALAR_ARRAY, [1.0, -2.5, 0.0]),
    (ValueType.SCALAR_ARRAY, []),
    (ValueType.TIMED_SCALAR_ARRAY, {"data": [1.0, 2.0], "micros": [1, 2]}),
    (ValueType.RAW, b"\x00\xff"),
    (ValueType.TEXT, "h\u00e9llo"),
    (ValueType.TEXT_ARRAY, ["a", ""]),
    (ValueType.ANALOG_ALARM, {"minimum": 0.0, "maximum": -1.5, "alarm_enable": True, "tries_needed": 3}),
    (ValueType.DIGITAL_ALARM, {"nominal": -5, "mask": 7, "abort": False, "tries_now": 2**32 - 1}),
    (ValueType.BASIC_STATUS, {"on": "True"}),
]


@given(
    st.sampled_from(VALUES),
    st.one_of(st.none(), times),
    st.integers(0, 100),
    st.integers(0, 5),
    st.one_of(st.none(), st.text(max_size=20)),
)
def test_every_value_type_matches_protobuf(kind_value, when, facility, code, message):
    kind, value = kind_value
    reading = Reading(
        "M:X", kind, facility_code=facility, error_code=code, value=value, message=message, timestamp=when
    )
    assert reading_body(reading) == _protobuf_body(reading)


def test_a_value_that_does_not_fit_is_an_internal_error_naming_the_drf():
    reading = Reading("M:X", ValueType.DIGITAL_ALARM, value={"nominal": 2**40})
    reply = DAQ_pb2.ReadingReply.FromString(reading_body(reading))
    assert (reply.status.facility_code, reply.status.status_code) == (DPM, DPM_INTERNAL)
    assert "M:X" in reply.status.message
