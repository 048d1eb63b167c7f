"""The pool's logic without processes: Router, Fanout and OneShotCalls, as tests/test_supervision.py
does for slots.

Each worker is a real `WorkerProcess` whose OS process and socket are fakes: the socket
records every frame the front sends, and a test answers as a worker would, by handing the
WorkerProcess the frame a worker sends back (`on_frame`). A worker dies as a real one does
for the front: its socket closes (`disconnected`). The clock the parts read is a
hand-driven one. Fail-over, the read retry, write outcome unknown, late joiners and
rebalancing run here in milliseconds; tests/test_pool.py keeps what only real processes show.
"""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime

import pytest

from pacsys.aio import AsyncSubscriptionHandle
from pacsys.errors import BackendUnavailable
from pacsys.pool.calls import OneShotCalls
from pacsys.pool.fanout import Fanout
from pacsys.pool.process import WorkerLost, WorkerProcess
from pacsys.pool.routing import Router
from pacsys.pool.stats import PoolStats
from pacsys.status import DPM, DPM_INTERNAL, DPM_WRITE_OUTCOME_UNKNOWN
from pacsys.types import Reading, ValueType
from workers import protocol as p
from workers.reply_body import reading_body

TS = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeProcess:
    """The OS process as a WorkerProcess sees it."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            self.returncode = -9

    def wait(self) -> int | None:
        return self.returncode


class Frames:
    """The socket to a worker: records what the front sends."""

    def __init__(self) -> None:
        self.sent: list[object] = []

    def send(self, message: object) -> None:
        self.sent.append(message)

    def abort(self) -> None:
        pass

    def of(self, kind: type) -> list:
        return [m for m in self.sent if isinstance(m, kind)]


class Pool:
    """What the pool gives its parts: a worker per slot, the router, the serving event, counters."""

    def __init__(self, slots: int = 2, *, worker_wait: float = 1.0, stream_buffer: int = 100, linger: float = 0.0):
        self.clock = Clock()
        self.stats = PoolStats()
        self.ids = itertools.count(1)
        self.any_serving = asyncio.Event()
        self.workers: dict[int, WorkerProcess] = {}
        self.generations = itertools.count(1)
        self.router: Router[WorkerProcess] = Router(self.serving)
        self.router.resize(slots)
        self.recycled: list[WorkerProcess] = []
        self.calls = OneShotCalls(
            self.router,
            self.any_serving,
            self.ids,
            self.stats,
            worker_wait,
            self.recycled.append,
            clock=self.clock,
        )
        self.fanout = Fanout(self.router.owner, self.ids, stream_buffer, linger, self.stats, clock=self.clock)
        for slot in range(slots):
            self.start(slot)

    def serving(self, slot: int) -> WorkerProcess | None:
        worker = self.workers.get(slot)
        return worker if worker is not None and worker.serving else None

    def start(self, slot: int) -> WorkerProcess:
        """A new worker serves the slot (a restart, or the first start)."""
        generation = next(self.generations)
        worker = WorkerProcess(
            slot, generation, FakeProcess(1000 + generation), Frames(), on_disconnect=lambda w: self.changed()
        )
        self.workers[slot] = worker
        self.changed()
        return worker

    def kill(self, slot: int) -> WorkerProcess:
        """The slot's worker dies: its socket closes."""
        worker = self.workers[slot]
        worker.process.kill()
        worker.disconnected(None)
        return worker

    def changed(self) -> None:
        """What the pool does when the serving workers change."""
        self.fanout.rebalance()
        if any(self.serving(s) for s in self.workers):
            self.any_serving.set()
        else:
            self.any_serving.clear()

    def device_of(self, slot: int, n: int = 0) -> str:
        """The `n`th device (Z:D000, Z:D001 ...) that slot `slot` ranks first for."""
        devices = (f"Z:D{i:03d}" for i in itertools.count())
        return next(itertools.islice((d for d in devices if self.router.ranking(d)[0] == slot), n, None))


def frames(worker: WorkerProcess) -> Frames:
    return worker._channel  # type: ignore[return-value]


def wire(value: float, ts: datetime = TS) -> p.WireReading:
    return p.reading_to_wire(Reading("X", value_type=ValueType.SCALAR, value=value, timestamp=ts))


def answer_read(worker: WorkerProcess, *values: float) -> p.Read:
    """The worker answers its latest Read, one reading per DRF."""
    read = frames(worker).of(p.Read)[-1]
    worker.on_frame(p.ReadDone(id=read.id, readings=[wire(v) for v in values]))
    return read


async def settle() -> None:
    """Let the tasks under test run up to their next wait."""
    for _ in range(10):
        await asyncio.sleep(0)


def run(body):
    return asyncio.run(body())


# -- Router ---------------------------------------------------------------------------------------


def test_rendezvous_ranking_falls_through_to_the_next_slot_and_moves_nothing_else():
    async def body():
        pool = Pool(slots=3)
        devices = [f"Z:D{i:03d}" for i in range(300)]
        owners = {d: pool.router.owner(d).slot for d in devices}
        assert set(owners.values()) == {0, 1, 2}  # spread over every slot
        assert pool.router.ranking("Z:D001") == pool.router.ranking("Z:D001")  # fixed per device
        pool.kill(1)
        moved = {d: pool.router.owner(d).slot for d in devices}
        for d in devices:
            if owners[d] != 1:
                assert moved[d] == owners[d]  # the devices of the serving slots stay
            else:
                assert moved[d] == pool.router.ranking(d)[1]  # the dead slot's go to their next-ranked
        pool.start(1)
        assert {d: pool.router.owner(d).slot for d in devices} == owners  # and come back

    run(body)


def test_a_request_is_grouped_by_worker_and_a_bad_drf_is_named():
    async def body():
        pool = Pool(slots=2)
        a, b = pool.device_of(0), pool.device_of(1)
        groups, unserved = pool.router.group([f"{a}@I", f"{b}@I", f"{a}.SETTING@I"], range(3))
        assert {w.slot: pos for w, pos in groups.items()} == {0: [0, 2], 1: [1]} and unserved == []
        pool.kill(0)
        pool.kill(1)
        assert pool.router.group([f"{a}@I"], [0]) == ({}, [0])
        with pytest.raises(ValueError, match="not a drf"):
            pool.router.group(["not a drf"], [0])

    run(body)


# -- OneShotCalls: reads ------------------------------------------------------------------------------


def test_a_read_is_split_by_device_sent_in_parallel_and_answered_in_request_order():
    async def body():
        pool = Pool(slots=2)
        drfs = [f"{pool.device_of(0, 0)}@I", f"{pool.device_of(1, 0)}@I", f"{pool.device_of(0, 1)}@I"]
        call = asyncio.ensure_future(pool.calls.get_many(drfs, timeout=5))
        await settle()
        (to0,) = frames(pool.workers[0]).of(p.Read)
        (to1,) = frames(pool.workers[1]).of(p.Read)
        assert (to0.drfs, to1.drfs) == ([drfs[0], drfs[2]], [drfs[1]])
        answer_read(pool.workers[1], 2.0)
        answer_read(pool.workers[0], 1.0, 3.0)
        readings = await call
        assert [(r.drf, r.value, r.timestamp) for r in readings] == [
            (d, v, TS) for d, v in zip(drfs, (1.0, 2.0, 3.0), strict=True)
        ]
        assert pool.workers[0].in_flight == 0 and pool.workers[0].requests == 1

    run(body)


def test_a_read_whose_worker_dies_is_retried_once_on_the_next_worker():
    async def body():
        pool = Pool(slots=2)
        drf = f"{pool.device_of(0)}@I"
        call = asyncio.ensure_future(pool.calls.get_many([drf], timeout=5))
        await settle()
        assert frames(pool.workers[0]).of(p.Read)
        pool.kill(0)
        await settle()
        (retry,) = frames(pool.workers[1]).of(p.Read)  # reads are idempotent: sent again
        assert retry.drfs == [drf]
        answer_read(pool.workers[1], 7.0)
        assert [r.value for r in await call] == [7.0] and pool.stats.reads_retried == 1

    run(body)


def test_a_read_that_loses_its_worker_twice_answers_unavailable():
    async def body():
        pool = Pool(slots=2)
        call = asyncio.ensure_future(pool.calls.get_many([f"{pool.device_of(0)}@I"], timeout=5))
        await settle()
        pool.kill(0)
        await settle()
        pool.kill(1)
        with pytest.raises(BackendUnavailable, match="died twice"):
            await call
        assert pool.stats.reads_retried == 1

    run(body)


def test_the_retry_gets_only_the_time_the_call_has_left():
    async def body():
        pool = Pool(slots=2)
        call = asyncio.ensure_future(pool.calls.get_many([f"{pool.device_of(0)}@I"], timeout=5))
        await settle()
        pool.clock.now += 3.0  # the first worker took 3 s to die
        pool.kill(0)
        await settle()
        (retry,) = frames(pool.workers[1]).of(p.Read)
        assert retry.timeout == pytest.approx(2.0)
        answer_read(pool.workers[1], 1.0)
        await call

    run(body)


def test_a_backend_error_in_a_worker_is_raised_as_its_class():
    async def body():
        pool = Pool(slots=1)
        call = asyncio.ensure_future(pool.calls.get_many(["Z:X@I"], timeout=5))
        await settle()
        (read,) = frames(pool.workers[0]).of(p.Read)
        pool.workers[0].on_frame(p.Failed(id=read.id, kind="BackendUnavailable", message="upstream down"))
        with pytest.raises(BackendUnavailable, match="upstream down"):
            await call
        assert pool.stats.reads_retried == 0  # an answer, not a death: no retry

    run(body)


def test_a_read_past_its_timeout_is_forgotten_by_its_worker():
    async def body():
        pool = Pool(slots=1)
        with pytest.raises(TimeoutError):
            await pool.calls.get_many(["Z:X@I"], timeout=0.01)
        await settle()
        assert pool.workers[0].in_flight == 0
        answer_read(pool.workers[0], 1.0)  # a late reply finds nobody waiting: ignored

    run(body)


def test_a_worker_is_recycled_after_its_request_limit():
    async def body():
        pool = Pool(slots=1)
        worker = pool.workers[0]
        worker.recycle_after = 2
        for n in range(3):
            call = asyncio.ensure_future(pool.calls.get_many(["Z:X@I"], timeout=5))
            await settle()
            answer_read(worker, float(n))
            await call
        assert pool.recycled == [worker, worker]  # at the 2nd request and after (the slot ignores repeats)

    run(body)


# -- OneShotCalls: waiting for a worker -----------------------------------------------------------------


def test_a_call_that_finds_no_worker_waits_for_one():
    async def body():
        pool = Pool(slots=2)
        pool.kill(0)
        pool.kill(1)
        call = asyncio.ensure_future(pool.calls.get_many(["Z:X@I"], timeout=5))
        await settle()
        assert not call.done() and pool.stats.calls_waited == 1
        pool.start(1)
        await asyncio.sleep(0.05)  # the waiting call looks again
        answer_read(pool.workers[1], 4.0)
        assert [r.value for r in await call] == [4.0] and pool.stats.calls_unavailable == 0

    run(body)


def test_a_call_answers_unavailable_after_worker_wait():
    async def body():
        pool = Pool(slots=1, worker_wait=0.05)
        pool.kill(0)
        with pytest.raises(BackendUnavailable, match="within 0.05 s"):
            await pool.calls.get_many(["Z:X@I"], timeout=10)
        assert (pool.stats.calls_waited, pool.stats.calls_unavailable) == (1, 1)
        with pytest.raises(BackendUnavailable):  # a new stream waits the same way
            await pool.calls.wait_for_a_worker()

    run(body)


def test_a_call_never_waits_past_its_own_deadline():
    async def body():
        pool = Pool(slots=1, worker_wait=60.0)
        pool.kill(0)
        with pytest.raises(BackendUnavailable, match="within 0.05 s"):
            await pool.calls.get_many(["Z:X@I"], timeout=0.05)

    run(body)


# -- OneShotCalls: writes ---------------------------------------------------------------------------------


def test_a_write_in_flight_on_a_worker_that_dies_is_outcome_unknown_and_never_sent_again():
    async def body():
        pool = Pool(slots=2)
        a, b = pool.device_of(0), pool.device_of(1)
        call = asyncio.ensure_future(pool.calls.write_many([(a, 1.0), (b, 2.0)], timeout=5))
        await settle()
        (write1,) = frames(pool.workers[1]).of(p.Write)
        pool.workers[1].on_frame(p.WriteDone(id=write1.id, results=[p.WireResult()]))
        pool.kill(0)
        results = await call
        assert (results[0].drf, results[0].facility_code, results[0].error_code) == (a, DPM, DPM_WRITE_OUTCOME_UNKNOWN)
        assert (results[1].drf, results[1].error_code) == (b, 0)
        assert len(frames(pool.workers[1]).of(p.Write)) == 1  # the lost one was not replayed
        assert pool.stats.writes_outcome_unknown == 1

    run(body)


def test_a_write_waits_for_a_worker_only_before_it_is_sent():
    async def body():
        pool = Pool(slots=1)
        pool.kill(0)
        call = asyncio.ensure_future(pool.calls.write_many([("Z:X", 1.0)], timeout=5))
        await settle()
        worker = pool.start(0)
        await asyncio.sleep(0.05)
        (write,) = frames(worker).of(p.Write)
        assert write.drfs == ["Z:X"] and write.values == [1.0]
        worker.on_frame(p.WriteDone(id=write.id, results=[p.WireResult(facility=1, error=-3, message="no")]))
        (result,) = await call
        assert (result.facility_code, result.error_code, result.message) == (1, -3, "no")

    run(body)


# -- WorkerProcess --------------------------------------------------------------------------------------


def test_a_closed_socket_fails_every_request_in_flight_at_once():
    async def body():
        pool = Pool(slots=1)
        worker = pool.workers[0]
        futures = [worker.request(p.Read(id=i, drfs=["Z:X@I"])) for i in (1, 2)]
        assert worker.in_flight == 2
        pool.kill(0)
        for future in futures:
            with pytest.raises(WorkerLost):
                await asyncio.wait_for(future, 1.0)  # failed at once, not left to time out
        await settle()
        assert worker.in_flight == 0 and not worker.serving
        with pytest.raises(WorkerLost):
            worker.request(p.Read(id=3, drfs=["Z:X@I"]))

    run(body)


def test_a_retired_worker_finishes_its_calls_in_flight_before_it_is_asked_to_stop():
    async def body():
        pool = Pool(slots=1)
        worker = pool.workers[0]
        future = worker.request(p.Read(id=1, drfs=["Z:X@I"]))
        finishing = asyncio.ensure_future(worker.finish(timeout=5))
        await settle()
        assert not frames(worker).of(p.Shutdown)
        worker.on_frame(p.ReadDone(id=1, readings=[wire(1.0)]))
        await finishing
        assert frames(worker).of(p.Shutdown) and future.result().readings[0].value == 1.0

    run(body)


# -- Fanout ---------------------------------------------------------------------------------------------


def data(pool: Pool, worker: WorkerProcess, value: float, ts: datetime = TS, sid: int | None = None) -> None:
    """The worker sends one reading of its latest subscription."""
    sid = sid if sid is not None else frames(worker).of(p.Subscribe)[-1].sid
    pool.fanout.on_data(worker, p.Data(items=[(sid, wire(value, ts))]))


def test_every_spelling_of_one_drf_shares_one_backend_subscription_until_the_last_leaves():
    async def body():
        pool = Pool(slots=1, linger=0.0)
        worker = pool.workers[0]
        first = pool.fanout.subscribe(["Z:SIM001@p,50"], None)
        second = pool.fanout.subscribe(["z_sim001.reading@P,50"], None)
        (subscribe,) = frames(worker).of(p.Subscribe)
        assert subscribe.drf == "Z:SIM001.READING@P,50" and pool.fanout.subscription_count == 1
        data(pool, worker, 1.0)
        assert [r.value for r in first.drain()] == [1.0] and [r.value for r in second.drain()] == [1.0]
        await first.stop()
        await asyncio.sleep(0.01)
        assert not frames(worker).of(p.Unsubscribe)  # one client is left
        await second.stop()
        await asyncio.sleep(0.01)  # the linger
        assert [u.sid for u in frames(worker).of(p.Unsubscribe)] == [subscribe.sid]
        assert pool.fanout.subscription_count == 0 and pool.fanout.client_count == 0

    run(body)


def test_a_client_back_within_the_linger_finds_the_subscription_open():
    async def body():
        pool = Pool(slots=1, linger=60.0)
        worker = pool.workers[0]
        await pool.fanout.subscribe(["Z:SIM001@p,50"], None).stop()
        pool.fanout.subscribe(["Z:SIM001@p,50"], None)
        assert len(frames(worker).of(p.Subscribe)) == 1 and not frames(worker).of(p.Unsubscribe)

    run(body)


def test_a_late_joiner_to_a_periodic_drf_gets_the_latest_reading_at_once_with_its_timestamp():
    async def body():
        pool = Pool(slots=1)
        worker = pool.workers[0]
        pool.fanout.subscribe(["Z:SIM001@p,2000"], None)
        data(pool, worker, 5.0, ts=TS)
        late = pool.fanout.subscribe(["Z:SIM001@P,2000"], None)
        (reading,) = late.drain()
        assert (reading.value, reading.timestamp) == (5.0, TS)
        pool.fanout.subscribe(["Z:SIM002@E,0F"], None)  # an event DRF: the last reading is no answer
        data(pool, worker, 6.0)
        assert pool.fanout.subscribe(["Z:SIM002@E,0F"], None).drain() == []

    run(body)


def test_a_slow_client_loses_its_own_oldest_readings_and_nobody_elses():
    async def body():
        pool = Pool(slots=1, stream_buffer=2)
        worker = pool.workers[0]
        slow = pool.fanout.subscribe(["Z:SIM001@p,50"], None)
        fast = pool.fanout.subscribe(["Z:SIM001@p,50"], None)
        for value in range(5):
            data(pool, worker, float(value))
            fast.drain()
        assert [r.value for r in slow.drain()] == [3.0, 4.0] and slow.dropped == 3 and fast.dropped == 0

    run(body)


def test_subscriptions_move_to_the_next_worker_when_theirs_dies_and_back_when_it_returns():
    async def body():
        pool = Pool(slots=2)
        device = pool.device_of(0)
        other = pool.device_of(1)
        handle = pool.fanout.subscribe([f"{device}@p,100", f"{other}@p,100"], None)
        old = pool.workers[0]
        (first,) = frames(old).of(p.Subscribe)
        data(pool, old, 1.0)
        pool.kill(0)  # its subscription moves to slot 1, a gap starts
        (moved,) = [s for s in frames(pool.workers[1]).of(p.Subscribe) if s.drf.startswith(device)]
        assert moved.sid != first.sid and pool.stats.stream_gaps == 1
        data(pool, old, 99.0, sid=first.sid)  # late data of the dead worker is ignored
        pool.clock.now += 0.25
        data(pool, pool.workers[1], 2.0, sid=moved.sid)
        assert pool.stats.last_gap_seconds == pytest.approx(0.25) and pool.stats.max_gap_seconds == pytest.approx(0.25)
        assert [r.value for r in handle.drain()] == [1.0, 2.0]
        returned = pool.start(0)  # the slot serves again: the device goes home
        (back,) = frames(returned).of(p.Subscribe)
        assert back.drf == moved.drf and moved.sid in [u.sid for u in frames(pool.workers[1]).of(p.Unsubscribe)]
        assert pool.stats.stream_gaps == 1  # a planned move loses nothing
        assert len([s for s in frames(pool.workers[1]).of(p.Subscribe) if s.drf.startswith(other)]) == 1

    run(body)


def test_a_subscription_waits_while_no_worker_serves_and_opens_when_one_does():
    async def body():
        pool = Pool(slots=1)
        pool.kill(0)
        handle = pool.fanout.subscribe(["Z:SIM001@p,100"], "Bearer t")
        assert pool.fanout.subscription_count == 0
        worker = pool.start(0)
        (subscribe,) = frames(worker).of(p.Subscribe)
        assert subscribe.authorization == "Bearer t"  # the first subscriber's, sent with it
        data(pool, worker, 3.0)
        assert [r.value for r in handle.drain()] == [3.0]

    run(body)


def test_a_subscription_the_backend_ends_reaches_its_clients_as_a_status_and_nothing_more():
    async def body():
        pool = Pool(slots=1)
        worker = pool.workers[0]
        handle = pool.fanout.subscribe(["Z:BADSUB@p,100", "Z:GOOD@p,100"], None)
        bad, good = frames(worker).of(p.Subscribe)
        pool.fanout.on_ended(worker, p.SubscriptionEnded(sid=bad.sid, kind="ValueError", message="refused"))
        data(pool, worker, 1.0, sid=good.sid)
        status, reading = handle.drain()
        assert (status.drf, status.facility_code, status.error_code) == (bad.drf, DPM, DPM_INTERNAL)
        assert status.message == "ValueError: refused" and reading.value == 1.0
        assert pool.fanout.subscription_count == 1 and not handle.stopped

    run(body)


def test_a_servicer_stream_gets_the_workers_bodies_and_no_reading_is_built(monkeypatch):
    import pacsys.pool.wire

    def no(*args, **kwargs):
        raise AssertionError("a Reading built for a stream that forwards bodies")

    monkeypatch.setattr(pacsys.pool.wire, "Reading", no)

    async def body():
        pool = Pool(slots=1)
        worker = pool.workers[0]
        first = pool.fanout.subscribe(["Z:SIM001@p,2000"], None, bodies=True)
        second = pool.fanout.subscribe(["z_sim001.reading@P,2000"], None, bodies=True)
        sent = wire(5.0, TS)
        pool.fanout.on_data(worker, p.Data(items=[(frames(worker).of(p.Subscribe)[-1].sid, sent)]))
        (one,) = first.drain()
        (two,) = second.drain()
        assert one == ("Z:SIM001.READING@P,2000", sent.body) and two is one  # one pair, shared
        # A late joiner gets the latest body at once: the worker's bytes, its original timestamp in them.
        (late,) = pool.fanout.subscribe(["Z:SIM001@p,2000"], None, bodies=True).drain()
        assert late == one

    run(body)


def test_library_subscribers_get_readings_beside_servicer_streams_on_one_subscription():
    async def body():
        pool = Pool(slots=1)
        worker = pool.workers[0]
        stream = pool.fanout.subscribe(["Z:SIM001@p,2000"], None, bodies=True)
        reader = pool.fanout.subscribe(["Z:SIM001@p,2000"], None)
        assert pool.fanout.subscription_count == 1
        data(pool, worker, 5.0, ts=TS)
        ((drf, body),) = stream.drain()
        (reading,) = reader.drain()
        assert (reading.drf, reading.value, reading.timestamp) == (drf, 5.0, TS)
        assert body == wire(5.0, TS).body
        (late,) = pool.fanout.subscribe(["Z:SIM001@p,2000"], None).drain()
        assert (late.value, late.timestamp) == (5.0, TS)  # a Reading again, with its original timestamp
        await reader.stop()
        data(pool, worker, 6.0, ts=TS)
        assert [b for _, b in stream.drain()] == [wire(6.0, TS).body]

    run(body)


def test_a_subscription_the_backend_ends_reaches_a_servicer_stream_as_a_status_body():
    async def body():
        pool = Pool(slots=1)
        worker = pool.workers[0]
        handle = pool.fanout.subscribe(["Z:BADSUB@p,100"], None, bodies=True)
        (bad,) = frames(worker).of(p.Subscribe)
        pool.fanout.on_ended(worker, p.SubscriptionEnded(sid=bad.sid, kind="ValueError", message="refused"))
        ((drf, status),) = handle.drain()
        expected = Reading(drf, facility_code=DPM, error_code=DPM_INTERNAL, message="ValueError: refused")
        assert drf == bad.drf and status == reading_body(expected)

    run(body)


def test_every_client_stream_ends_when_the_pool_closes():
    async def body():
        pool = Pool(slots=1)
        handles: list[AsyncSubscriptionHandle] = [pool.fanout.subscribe([f"Z:SIM00{i}@p,100"], None) for i in (1, 2)]
        pool.fanout.stop_all()
        assert all(h.stopped for h in handles) and pool.fanout.client_count == 0

    run(body)


# -- the servicer's one-shot read: the workers' bodies passed through ----------------------------------


def test_a_one_shot_read_passes_the_bodies_the_workers_encoded_through_without_building_a_reading(monkeypatch):
    import pacsys.pool.routing
    import pacsys.pool.wire

    def no(*args, **kwargs):
        raise AssertionError("not on this path")

    monkeypatch.setattr(pacsys.pool.wire, "Reading", no)  # no Reading built
    monkeypatch.setattr(pacsys.pool.routing, "parse_cached", no)  # the caller's devices, not the parse cache

    async def body():
        pool = Pool(slots=2)
        a, b = pool.device_of(0), pool.device_of(1)
        drfs = [f"{a}@I", f"{b}.SETTING@I"]
        call = asyncio.ensure_future(pool.calls.read_bodies(drfs, 5, devices=[a, b]))
        await settle()
        sent = [wire(1.0), wire(2.0)]
        for worker, reading in zip(pool.workers.values(), sent, strict=True):
            (read,) = frames(worker).of(p.Read)
            worker.on_frame(p.ReadDone(id=read.id, readings=[reading]))
        assert await call == [sent[0].body, sent[1].body]

    run(body)


def test_a_reading_that_came_without_its_body_is_encoded_in_the_front():
    from pacsys.pool.wire import body_of
    from workers.reply_body import reading_body

    bare = p.WireReading(value_type="scalar", value=2.5, timestamp_ns=1_700_000_000_000_000_000)
    expected = reading_body(Reading("Z:X@I", value_type=ValueType.SCALAR, value=2.5, timestamp=bare_ts(bare)))
    assert body_of("Z:X@I", bare) == expected


def bare_ts(w: p.WireReading) -> datetime:
    from workers import epoch

    return epoch.from_ns(w.timestamp_ns)
