"""Replies built as bytes are exactly what protobuf writes for the same message."""

from datetime import UTC, datetime, timedelta, timezone

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


def test_reading_without_timestamp_gets_the_current_time():
    before = datetime.now(UTC)
    reply = DAQ_pb2.ReadingReply.FromString(
        reading_body(Reading(drf="M:OUTTMP", value_type=ValueType.SCALAR, value=1.0))
    )
    stamp = reply.readings.reading[0].timestamp.ToDatetime(tzinfo=UTC)
    assert before - timedelta(seconds=1) <= stamp <= datetime.now(UTC)


def test_reply_bodies_live_as_long_as_their_readings():
    import gc

    from pacsys.replies import ReplyBodies

    bodies = ReplyBodies()
    when = datetime(2026, 11, 27, tzinfo=UTC)
    readings = [
        Reading(drf="M:OUTTMP", value_type=ValueType.SCALAR, value=float(i), timestamp=when) for i in range(100)
    ]
    for reading in readings:
        bodies.remember(reading, b"body %d" % reading.value)
    assert bodies.held == 100
    assert bodies.body(readings[7]) == b"body 7"  # remembered, not encoded
    fresh = Reading(drf="M:OUTTMP", value_type=ValueType.SCALAR, value=7.0, timestamp=when)
    assert bodies.body(fresh) == reading_body(fresh)  # an equal but different object is encoded
    del readings, reading, fresh
    gc.collect()
    assert bodies.held == 0
