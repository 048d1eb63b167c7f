"""The byte budget of queued readings: a client that stops reading loses its streams, nobody else.

Real servers (in process and through a worker pool), real gRPC clients and hand-driven HTTP/2
clients that stop reading (`benchmarks.h2_raw`), on loopback; other source addresses
(127.0.0.2, 127.0.0.3) stand for other clients. The rules themselves (`QueueBudget`) and the
handle's counting are checked first, without a server.
"""

import asyncio
import logging
import struct
from dataclasses import dataclass

import grpc
import pytest
from helpers import FAST, until

from benchmarks.h2_raw import connect, frame
from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2, DAQ_pb2_grpc
from pacsys.aio import AsyncSubscriptionHandle
from pacsys.backends.sim import SimBackend
from pacsys.pool.pool import WorkerPool
from pacsys.supervised import ServicerLimits, SupervisedServer
from pacsys.supervised._audit import AuditLog, read_audit
from pacsys.supervised._queue_budget import PER_PEER, SERVICE, QueueBudget
from pacsys.types import Reading, ValueType

READ = "/services.daq.DAQ/Read"
FAST_DRFS = [f"Z:SIM{i:03d}@p,20" for i in range(100)]  # 5,000 readings/s: a stalled queue fills in 0.2 s
SETTINGS, INITIAL_WINDOW = 0x4, 0x4


# -- the handle counts what its readings cost ----------------------------------------------


def _reading(cost: int) -> Reading:
    return Reading(drf="Z:SIM000", value_type=ValueType.SCALAR, value=float(cost))


def test_a_metered_handle_counts_each_reading_from_queued_to_sent_or_dropped():
    handle = AsyncSubscriptionHandle(maxsize=3)
    handle.dispatch(_reading(1))  # before the meter: counted when it is set
    handle.meter(lambda r: int(r.value))
    assert handle.queued_bytes == 1
    handle.dispatch_on_loop(_reading(10))
    handle.dispatch_on_loop(_reading(100))
    handle.dispatch_on_loop(_reading(1000))  # drops the oldest (1)
    assert (handle.queued_bytes, handle.dropped) == (1110, 1)
    handle.dispatch_many([_reading(2), _reading(20), _reading(200), _reading(2000)])  # more than it holds
    assert (handle.queued_bytes, handle.dropped) == (2220, 5)
    batch = handle.drain()
    assert [int(r.value) for r in batch] == [20, 200, 2000]
    assert handle.queued_bytes == 2220  # taken, not yet written
    handle.dispatch(_reading(5))
    handle.sent()
    assert handle.queued_bytes == 5
    handle.resize(1)
    handle.dispatch(_reading(7))  # drops 5
    assert handle.queued_bytes == 7


# -- the rules -----------------------------------------------------------------------------


@dataclass(eq=False)
class Stream:
    identity: str
    queued_bytes: int
    caught_up: int = 0
    written: int = 0
    writing: bool = True


def _looks(budget, streams, seconds, progress=(), step=0.5):
    """Look every `step` seconds from 0 to `seconds` (the servicer ends what a look cuts); the
    streams in `progress` write a reply between two looks. Returns (time, cut) pairs."""
    streams, cuts, now = list(streams), [], 0.0
    while now <= seconds:
        for stream in progress:
            stream.written += 1
        for cut in budget.cuts(streams, now):
            streams.remove(cut.stream)
            cuts.append((now, cut))
        now += step
    return cuts


def test_a_client_over_its_budget_loses_its_stalled_streams_largest_first_until_it_fits():
    budget = QueueBudget(per_peer=1000, total=10**9, stall_seconds=2.0)
    big, small, reading = Stream("a", 700), Stream("a", 500), Stream("a", 300)
    cuts = _looks(budget, [big, small, reading], 5.0, progress=[reading])
    assert [(now, c.stream, c.limit) for now, c in cuts] == [(2.0, big, PER_PEER)]  # 800 left: within 1000
    cut = cuts[0][1]
    assert (cut.client_bytes, cut.share, cut.queued_bytes) == (1500, 1000, 700)
    assert "not been read for 2 s" in cut.details() and "max_queued_bytes_per_peer" in cut.details()
    # A client that reads is never cut for its own budget, however much it holds.
    budget = QueueBudget(per_peer=1000, total=10**9, stall_seconds=2.0)
    assert _looks(budget, [Stream("b", 5000)], 5.0, progress=[]) != []
    reader = Stream("b", 5000)
    assert _looks(QueueBudget(1000, 10**9, 2.0), [reader], 5.0, progress=[reader]) == []


def test_a_stream_first_seen_waiting_then_never_taking_its_first_reply_is_stalled():
    budget = QueueBudget(per_peer=1000, total=10**9, stall_seconds=1.0)
    stream = Stream("a", 5000, writing=False)  # not yet writing at the first look
    assert budget.cuts([stream], 0.0) == []
    stream.writing = True  # its first batch, whose first reply the client never takes
    assert [now for now, _ in _looks(budget, [stream], 3.0)] == [1.0]


def test_over_the_service_budget_the_biggest_holder_goes_first_and_a_client_within_its_share_never():
    budget = QueueBudget(per_peer=10**9, total=3000, stall_seconds=1.0)
    big = [Stream("big", 1500), Stream("big", 1200)]
    middle = Stream("middle", 1200)  # over its share too, but the total fits once "big" is down to its own
    small = Stream("small", 900)  # within its share (3000 / 3) however long it stays behind
    cuts = _looks(budget, [*big, middle, small], 5.0)
    assert [(now, c.stream, c.limit) for now, c in cuts] == [(1.0, big[0], SERVICE), (1.0, big[1], SERVICE)]
    assert all(c.share == 1000 and c.client_bytes == 2700 for _, c in cuts)
    assert "not caught up" in cuts[0][1].details() and "max_queued_bytes" in cuts[0][1].details()


def test_a_reader_that_catches_up_is_never_cut():
    budget = QueueBudget(per_peer=100, total=100, stall_seconds=1.0)
    bursty = Stream("a", 5000)
    cuts, now = [], 0.0
    while now < 5:
        bursty.caught_up += 1  # it finds its queue empty between looks, and writes
        bursty.written += 1
        cuts += budget.cuts([bursty], now)
        now += 0.5
    assert cuts == []


# -- real servers and clients ------------------------------------------------------------


def _request(drfs: list[str]) -> bytes:
    return DAQ_pb2.ReadingList(drf=drfs).SerializeToString()


def _grpc_client(port: int) -> DAQ_pb2_grpc.DAQStub:
    # Without BDP probing the client's window stays at 64 KiB: a stream it does not read fills
    # it in a moment and the server's write waits (with probing, gRPC keeps widening it).
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.http2.bdp_probe", 0)])
    return DAQ_pb2_grpc.DAQStub(channel)


async def _reader(port: int, source: str, drfs: list[str]):
    """A client on `source` that reads everything at once: (connection, stream id)."""
    conn = await connect("127.0.0.1", port, source)
    return conn, await conn.call(READ, _request(drfs), f"127.0.0.1:{port}")


async def _keeps_delivering(conn, stream_id: int, replies: int = 25) -> None:
    before = conn.streams[stream_id].messages
    await until(lambda: conn.streams[stream_id].messages >= before + replies, what="the reader's next replies")
    assert not conn.ended(stream_id)


def _identities(server: SupervisedServer) -> list[str]:
    return [row["identity"] for row in server.status()["streams"]]


def test_a_stalled_client_is_ended_with_resource_exhausted_while_another_keeps_reading_its_device(caplog, tmp_path):
    audit = AuditLog(tmp_path / "audit.jsonl")
    limits = ServicerLimits(max_queued_bytes_per_peer=100_000, stalled_stream_seconds=1.0, refusal_log_interval=60)
    server = SupervisedServer(SimBackend(), port=0, host="127.0.0.1", limits=limits, audit_log=audit)

    async def main() -> None:
        reader, stream_id = await _reader(server.port, "127.0.0.3", ["Z:SIM000@p,20"])
        stub = _grpc_client(server.port)
        stalled = [stub.Read(DAQ_pb2.ReadingList(drf=FAST_DRFS)) for _ in range(2)]  # never read, for now
        hits = server.servicer.stats.limits_hit
        await until(lambda: hits[PER_PEER] == 2, timeout=30, what="both stalled streams to be ended")
        assert _identities(server) == ["ipv4:127.0.0.3"]
        await _keeps_delivering(reader, stream_id)
        # Reading again, the stalled client gets what gRPC held for it, then the status.
        for call in stalled:
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                async for _ in call:
                    pass
            assert ended.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "not been read" in ended.value.details() and "max_queued_bytes_per_peer" in ended.value.details()
        reader.close()

    with caplog.at_level(logging.WARNING, logger="pacsys.supervised"), server:
        asyncio.run(main())
    assert server.servicer.stats.limits_hit[SERVICE] == 0
    # One log line per client and kind per refusal_log_interval; the second cut is counted.
    (line,) = [r.getMessage() for r in caplog.records if "event=stream_cut" in r.getMessage()]
    assert "limit=max_queued_bytes_per_peer" in line and "identity=ipv4:127.0.0.1" in line
    assert "drfs=Z:SIM000@p,20, Z:SIM001@p,20, Z:SIM002@p,20, Z:SIM003@p,20, Z:SIM004@p,20 and 95 more" in line
    assert server.servicer.stats.refusals_not_logged >= 1
    audit.close()
    cut = [e for e in read_audit(tmp_path / "audit.jsonl") if e.get("event") == "stream_cut"]
    admitted = {e["seq"] for e in read_audit(tmp_path / "audit.jsonl") if e.get("drfs", [None])[0] == "Z:SIM000@p,20"}
    assert len(cut) == 2 and {e["limit"] for e in cut} == {PER_PEER}
    assert {e["seq"] for e in cut} <= admitted  # each tied to the request it ends


def test_a_slow_client_that_reads_now_and_then_is_not_cut():
    limits = ServicerLimits(max_queued_bytes_per_peer=100_000, stalled_stream_seconds=3.0)
    server = SupervisedServer(SimBackend(), port=0, host="127.0.0.1", limits=limits)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        call = _grpc_client(server.port).Read(DAQ_pb2.ReadingList(drf=FAST_DRFS))
        replies = aiter(call)
        most = 0
        for _ in range(5):  # read for 0.4 s, then leave it alone for 0.7 s: over its budget meanwhile
            until_then = loop.time() + 0.4
            while loop.time() < until_then:
                await anext(replies)
            until_then = loop.time() + 0.7
            while loop.time() < until_then:
                most = max(most, server.status()["queued_bytes"])
                await asyncio.sleep(0.05)
        assert most > 100_000, "the pauses should have taken the client over its budget"
        await anext(replies)  # still served
        call.cancel()

    with server:
        asyncio.run(main())
    assert server.servicer.stats.limits_hit[PER_PEER] == 0


def test_over_the_service_budget_the_biggest_holder_is_cut_and_a_client_within_its_share_is_not():
    limits = ServicerLimits(max_queued_bytes_per_peer=10**9, max_queued_bytes=150_000, stalled_stream_seconds=1.0)
    server = SupervisedServer(SimBackend(), port=0, host="127.0.0.1", limits=limits)

    async def main() -> None:
        big = await connect("127.0.0.1", server.port, "127.0.0.2", window=False)
        await big.call(READ, _request(FAST_DRFS), f"127.0.0.1:{server.port}")
        # A client whose streams may receive nothing (a window of 0): it holds what 1 Hz brings.
        small = await connect("127.0.0.1", server.port, "127.0.0.3", window=False)
        await small.write(frame(SETTINGS, 0, 0, struct.pack(">HI", INITIAL_WINDOW, 0)))
        await small.call(READ, _request(["Z:SIM000@p,1000"]), f"127.0.0.1:{server.port}")
        hits = server.servicer.stats.limits_hit
        await until(lambda: hits[SERVICE] == 1, timeout=30, what="the biggest holder to be cut")
        assert _identities(server) == ["ipv4:127.0.0.3"]
        await asyncio.sleep(3 * server.servicer.queue_budget.interval)  # a few more looks
        assert _identities(server) == ["ipv4:127.0.0.3"] and hits[SERVICE] == 1 and hits[PER_PEER] == 0
        big.close()
        small.close()

    with server:
        asyncio.run(main())


def test_through_a_worker_pool_a_stalled_stream_is_ended_and_its_neighbour_keeps_the_device():
    pool = WorkerPool(backend="sim", workers=1, **FAST)
    limits = ServicerLimits(max_queued_bytes_per_peer=100_000, stalled_stream_seconds=1.0)
    server = SupervisedServer(pool, port=0, host="127.0.0.1", limits=limits, close_backend=True)

    async def main() -> None:
        reader, stream_id = await _reader(server.port, "127.0.0.3", ["Z:SIM000@p,20"])
        stalled = await connect("127.0.0.1", server.port, "127.0.0.2", window=False)  # never reads
        await stalled.call(READ, _request(FAST_DRFS), f"127.0.0.1:{server.port}")
        hits = server.servicer.stats.limits_hit
        await until(lambda: hits[PER_PEER] == 1, timeout=30, what="the stalled stream to be ended")
        assert _identities(server) == ["ipv4:127.0.0.3"]
        await _keeps_delivering(reader, stream_id)
        assert server.status()["queued_bytes"] < 100_000
        stalled.close()
        reader.close()

    with server:
        asyncio.run(main())
