"""The worker pool with real worker processes, a real gRPC server and real clients.

Fault tests kill workers with SIGKILL, block their loops and make them fail at start,
and check what the clients see. Every wait is on a condition with a generous deadline.
What needs no process (routing, the read retry, write outcome unknown, waiting for a
worker, sharing and moving subscriptions) is unit-tested in tests/test_pool_logic.py.
"""

import os
import signal
import threading
import time

import grpc
import pytest
from helpers import FAST, OneShotLoad, wait_for, worker_pids

from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2
from pacsys.pool.pool import WorkerPool, WorkerStartupError
from pacsys.supervised import SupervisedServer


def test_writes_reach_the_device_and_later_reads_see_them(running):
    r = running(workers=2)
    assert [s.status_code for s in r.set("Z:ACLTST", 5.0).status] == [0]
    (reply,) = r.read(["Z:ACLTST.SETTING@I"])
    assert reply.readings.reading[0].data.scalar == pytest.approx(5.0)


def test_module_factory_backend_runs_in_the_workers(running):
    r = running(backend="fault_backends:scripted", workers=2)
    (reply,) = r.read(["Z:PID@I"])
    pid = int(reply.readings.reading[0].data.scalar)
    assert pid in worker_pids(r.pool) and pid != os.getpid()


def test_kill_a_worker_during_oneshot_load_fails_no_call(running):
    r = running(workers=2)
    with OneShotLoad(r, clients=32) as load:
        wait_for(lambda: load.done > 200, what="load to run")
        victim = worker_pids(r.pool)[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: r.pool.ready_count == 2 and victim not in worker_pids(r.pool), what="replacement")
        before = load.done
        wait_for(lambda: load.done > before + 200, what="load after the restart")
    assert load.errors == []
    assert r.pool.stats.exits_by_reason["signal"] == 1


def test_streams_survive_the_death_of_their_worker(running):
    r = running(workers=2)
    drfs = [f"Z:SIM{i:03d}@p,100" for i in range(50)]
    calls = [r.stub.Read(DAQ_pb2.ReadingList(drf=[d])) for d in drfs]
    last_seen = [0.0] * len(calls)
    ended = []

    def consume(i, call):
        try:
            for _ in call:
                last_seen[i] = time.monotonic()
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                ended.append(exc.code())
        else:
            ended.append("ended")

    threads = [threading.Thread(target=consume, args=(i, c), daemon=True) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    wait_for(lambda: all(last_seen), what="every stream's first reading")
    victim = worker_pids(r.pool)[0]
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    wait_for(lambda: all(t > killed_at for t in last_seen), timeout=10, what="every stream to resume")
    resumed = max(last_seen) - killed_at
    for c in calls:
        c.cancel()
    for t in threads:
        t.join(10)
    assert ended == []
    assert resumed < 2.0, f"streams resumed {resumed:.2f} s after the kill"
    assert r.pool.stats.stream_gaps > 0


def test_a_slot_that_cannot_start_cools_down_and_comes_back_when_it_can(running, tmp_path, monkeypatch):
    flag = tmp_path / "cursed"
    monkeypatch.setenv("FAULT_FLAG", str(flag))
    r = running(
        backend="fault_backends:broken_when_flagged",
        workers=2,
        restart_intensity=2,
        restart_cooldown_initial=1.0,
    )
    flag.touch()
    os.kill(r.pool.worker_states()[1].pid, signal.SIGKILL)
    wait_for(lambda: r.pool.worker_states()[1].state.value == "cooling", what="slot 1 cooling down")
    assert r.pool.stats.cooldowns >= 1 and r.pool.ready_count == 1
    assert r.read(["Z:PID@I"])[0].WhichOneof("value") == "readings"  # the other slot serves everything
    wait_for(lambda: r.pool.stats.cooldowns >= 2, what="a second, longer cool-down")
    assert r.pool.worker_states()[1].next_start_in is not None
    flag.unlink()  # the cause is fixed: the slot serves again after its cool-down, by itself
    wait_for(lambda: r.pool.ready_count == 2, what="slot 1 back")
    assert r.pool.worker_states()[1].state.value == "ready"


def test_every_worker_killed_at_once_a_call_waits_and_the_service_recovers(running):
    r = running(workers=2, restart_backoff_initial=0.5)
    port = r.server.port
    for pid in worker_pids(r.pool):
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: r.pool.ready_count == 0, what="no worker serving")
    assert r.read(["M:OUTTMP@I"])[0].WhichOneof("value") == "readings"  # waited, did not fail
    assert r.pool.stats.calls_waited >= 1 and r.pool.stats.calls_unavailable == 0
    wait_for(lambda: r.pool.ready_count == 2 and r.pool.stats.exits_by_reason["signal"] == 2, what="recovery")
    assert r.server.port == port
    for pid in worker_pids(r.pool):
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: r.pool.ready_count == 0, what="no worker serving again")
    stream = r.stub.Read(DAQ_pb2.ReadingList(drf=["Z:SIM001@p,100"]), timeout=20)
    assert next(stream).WhichOneof("value") == "readings"  # a new stream waits too
    stream.cancel()
    assert r.pool.stats.calls_unavailable == 0


def test_a_backend_that_cannot_be_built_stops_the_start():
    pool = WorkerPool(backend="fault_backends:broken", workers=2, **FAST)
    server = SupervisedServer(pool, port=0, host="127.0.0.1", close_backend=True)
    with pytest.raises(WorkerStartupError, match="cannot reach its hardware"):
        server.start()


def test_a_hung_event_loop_is_killed_and_replaced(running):
    r = running(backend="fault_backends:scripted", workers=2)
    victim = r.owner_pid("Z:HANG")
    with pytest.raises(grpc.RpcError) as exc_info:
        r.read(["Z:HANG@I"], timeout=1.0)
    assert exc_info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: r.pool.stats.exits_by_reason["hang"] == 1, what="hang detection")
    wait_for(lambda: r.pool.ready_count == 2 and victim not in worker_pids(r.pool), what="replacement")


def test_recycling_by_request_count_fails_no_call(running):
    r = running(workers=1, recycle_requests=50, recycle_jitter=0.0)
    first = worker_pids(r.pool)[0]
    deadline = time.monotonic() + 60
    i = 0
    while r.pool.stats.recycles_by_reason["recycle_requests"] < 2 and time.monotonic() < deadline:
        assert r.read([f"Z:SIM{i % 10:03d}@I"])[0].WhichOneof("value") == "readings"
        i += 1
    assert r.pool.stats.recycles_by_reason["recycle_requests"] >= 2
    assert first not in worker_pids(r.pool)
    assert r.pool.worker_states()[0].restart_budget_left == r.pool.settings.restart_intensity


def test_a_worker_sent_a_malformed_frame_is_replaced(running):
    r = running(workers=2)
    victim = r.pool._serving_worker(0)
    r.server.loop.call_soon_threadsafe(victim._channel._transport.write, b"\x00\x00\x00\x03abc")
    wait_for(lambda: r.pool.ready_count == 2 and victim.pid not in worker_pids(r.pool), what="replacement")
    assert r.read(["M:OUTTMP@I"])[0].WhichOneof("value") == "readings"


def test_recycling_by_rss_under_load_fails_no_call(running):
    r = running(workers=2, recycle_rss_mb=1)  # every worker is over 1 MiB: each is recycled in turn
    with OneShotLoad(r, clients=8) as load:
        wait_for(lambda: r.pool.stats.recycles_by_reason["recycle_rss"] >= 3, timeout=60, what="recycles")
    assert load.errors == [] and load.done > 0


def test_scaling_moves_subscriptions_without_ending_streams(running):
    r = running(workers=1)
    calls = [r.stub.Read(DAQ_pb2.ReadingList(drf=[f"Z:SIM{i:03d}@p,50"])) for i in range(20)]
    for c in calls:
        next(c)
    r.server.loop.call_soon_threadsafe(lambda: r.server.loop.create_task(r.pool.add_worker()))
    wait_for(lambda: r.pool.ready_count == 2, what="a second worker")
    wait_for(lambda: all(w.subscriptions for w in r.pool.worker_states()), what="subscriptions to spread")
    for c in calls:  # every stream still delivers
        assert next(c).WhichOneof("value") == "readings"
    r.server.loop.call_soon_threadsafe(lambda: r.server.loop.create_task(r.pool.remove_worker()))
    wait_for(lambda: r.pool.worker_states()[1].pid is None, what="the second worker to stop")
    for c in calls:
        assert next(c).WhichOneof("value") == "readings"
    assert r.pool.worker_states()[0].subscriptions == 20
    r.server.loop.call_soon_threadsafe(lambda: r.server.loop.create_task(r.pool.add_worker()))
    wait_for(lambda: r.pool.ready_count == 2, what="the retired slot to serve again")
    assert len(r.pool.worker_states()) == 2 and r.pool.workers == 2  # the slot was reused
    for c in calls:
        assert next(c).WhichOneof("value") == "readings"
        c.cancel()


def test_a_sync_backend_with_every_thread_blocked_times_out_per_call_and_keeps_pinging(running):
    r = running(backend="fault_backends:blocking_sync", workers=2, threads_per_worker=2)
    victim = r.owner_pid("Z:BLOCK")
    for _ in range(3):  # more blocked calls than threads
        with pytest.raises(grpc.RpcError) as exc_info:
            r.read(["Z:BLOCK@I"], timeout=1.0)
        assert exc_info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # Its loop still answers pings for longer than the hang timeout: it is busy, not hung.
    worker = next(w for w in r.pool._workers.values() if w.pid == victim)
    blocked_at = time.monotonic()
    wait_for(lambda: worker.last_pong > blocked_at + FAST["hang_timeout"], what="pongs past the hang timeout")
    assert victim in worker_pids(r.pool) and r.pool.stats.exits_by_reason["hang"] == 0


def test_liveness_fails_when_the_pool_stays_short_of_min_workers_ready(running, tmp_path, monkeypatch):
    flag = tmp_path / "cursed"
    monkeypatch.setenv("FAULT_FLAG", str(flag))
    r = running(backend="fault_backends:broken_when_flagged", workers=2, min_workers_ready=2, unready_limit=1.0)
    assert r.pool.is_alive
    flag.touch()
    os.kill(r.pool.worker_states()[1].pid, signal.SIGKILL)
    wait_for(lambda: not r.pool.is_alive, what="liveness to fail")
    assert r.pool.ready_count == 1  # one worker serves, but never enough to be ready: not alive
    flag.unlink()
    wait_for(lambda: r.pool.is_ready and r.pool.is_alive, what="ready and alive again")
