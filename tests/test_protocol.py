"""The worker protocol: every message round-trips; bad frames are errors, never hangs."""

from datetime import UTC, datetime

import pytest

from pacsys.pool.wire import reading_from_wire
from pacsys.types import Reading, ValueType
from workers import protocol as p

READING = Reading(
    drf="M:OUTTMP",
    value_type=ValueType.ANALOG_ALARM,
    value={"minimum": 1.0, "maximum": 2.0, "alarm_enable": True},
    facility_code=17,
    error_code=1,
    message="pending",
    timestamp=datetime(2026, 11, 27, 6, 0, 0, 123456, tzinfo=UTC),
    cycle=42,
)

MESSAGES = [
    p.Read(id=1, drfs=["M:OUTTMP@I"], timeout=2.5, authorization="Bearer x"),
    p.Write(id=2, drfs=["Z:ACLTST"], values=[[1.0, 2.0]]),
    p.Subscribe(sid=3, drf="M:OUTTMP.READING@P,1000"),
    p.Unsubscribe(sid=3),
    p.Ping(seq=4),
    p.Shutdown(),
    p.Ready(pid=10, capabilities=7, backend="sim"),
    p.StartupFailed(pid=10, message="no"),
    p.ReadDone(id=1, readings=[p.reading_to_wire(READING)]),
    p.WriteDone(id=2, results=[p.WireResult(facility=17, error=-26, message="no such device")]),
    p.Failed(id=1, kind="ValueError", message="bad"),
    p.Data(items=[(3, p.reading_to_wire(READING))]),
    p.SubscriptionEnded(sid=3, kind="RuntimeError", message="gone"),
    p.Pong(seq=4, in_flight=0, subscriptions=1),
]


def test_every_message_round_trips_in_one_stream():
    to_worker = [m for m in MESSAGES if isinstance(m, p.ToWorker)]
    to_front = [m for m in MESSAGES if isinstance(m, p.ToFront)]
    for batch, kind in ((to_worker, p.ToWorker), (to_front, p.ToFront)):
        stream = b"".join(p.encode(m) for m in batch)
        reader = p.FrameReader(kind)
        # fed in awkward pieces: frames split across reads must still come out whole
        got = []
        for i in range(0, len(stream), 7):
            got += reader.feed(stream[i : i + 7])
        assert got == batch and reader.pending == 0


def test_a_reading_keeps_every_field_across_the_pipe():
    (frame,) = p.FrameReader(p.ToFront).feed(p.encode(p.ReadDone(id=1, readings=[p.reading_to_wire(READING)])))
    assert reading_from_wire("M:OUTTMP", frame.readings[0]) == READING


def test_a_truncated_frame_waits_for_the_rest():
    frame = p.encode(p.Ping(seq=1))
    reader = p.FrameReader(p.ToWorker)
    assert reader.feed(frame[:-1]) == [] and reader.pending == len(frame) - 1
    assert reader.feed(frame[-1:]) == [p.Ping(seq=1)]


def test_oversized_and_undecodable_frames_are_protocol_errors():
    with pytest.raises(p.ProtocolError, match="exceeds"):
        p.FrameReader(p.ToWorker).feed(b"\xff\xff\xff\xff")
    with pytest.raises(p.ProtocolError, match="undecodable"):
        p.FrameReader(p.ToWorker).feed(p.HEADER.pack(3) + b"abc")
    with pytest.raises(p.ProtocolError):  # a valid message of the wrong direction
        p.FrameReader(p.ToWorker).feed(p.encode(p.Pong(seq=1, in_flight=0, subscriptions=0)))


def test_wire_reading_carries_the_reply_body_the_front_would_encode():
    from pacsys.replies import reading_body

    wire = p.reading_to_wire(READING)
    assert wire.body == reading_body(READING)
    (frame,) = p.FrameReader(p.ToFront).feed(p.encode(p.Data(items=[(3, wire)])))
    assert frame.items[0][1].body == wire.body


def test_the_worker_runtime_imports_no_grpc_and_none_of_our_pacsys():
    """A worker may run in another environment, whose `pacsys` (the release's) ours must not shadow."""
    import subprocess
    import sys

    code = "import sys, workers.worker; print(sorted({m.split('.')[0] for m in sys.modules} & {'grpc', 'pacsys', 'google'}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_capability_bits_are_the_fronts():
    from pacsys.types import BackendCapability

    assert p.CAPABILITY_BITS == {c.name: c.value for c in BackendCapability}
    assert p.capability_bits(BackendCapability.READ | BackendCapability.STREAM) == 5


def test_epoch_times_one_conversion_for_the_protocol_and_the_reply_body():
    from datetime import UTC, datetime, timedelta, timezone

    from google.protobuf.timestamp_pb2 import Timestamp

    from workers import epoch

    aware = datetime(2026, 12, 1, 12, 30, 5, 123456, tzinfo=UTC)
    assert epoch.to_ns(aware) == epoch.to_ns(aware.replace(tzinfo=None))  # naive counts as UTC
    assert epoch.to_ns(aware.astimezone(timezone(timedelta(hours=-6)))) == epoch.to_ns(aware)
    assert epoch.from_ns(epoch.to_ns(aware)) == aware
    for ts in (aware, datetime(1969, 12, 31, 23, 59, 59, 500000, tzinfo=UTC), epoch.EPOCH):
        expected = Timestamp()
        expected.FromDatetime(ts)
        assert epoch.since_epoch(ts) == (expected.seconds, expected.nanos // 1000)
