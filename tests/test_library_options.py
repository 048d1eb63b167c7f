"""A library user's options take effect: `WorkerPool(**options)` is checked and applied as the
service's settings are, and nothing behind it (the servicer) puts its own value back."""

import psutil
import pytest
from helpers import wait_for, worker_pids

from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2
from pacsys.pool.pool import WorkerPool
from pacsys.settings import ConfigError


def test_the_pools_stream_buffer_bounds_each_stream_behind_a_server(running):
    r = running(workers=1, stream_buffer=20)
    stalled = r.stub.Read(DAQ_pb2.ReadingList(drf=[f"Z:SIM{i:03d}@p,20" for i in range(50)]))  # never read
    try:
        # The simulator sends each 20 ms tick's 50 readings together: a buffer of 20 keeps 20 of
        # them and drops 30 at once, long before gRPC's flow control holds the stream back (a
        # buffer of 1000 would drop nothing for many seconds).
        def bounded() -> bool:
            rows = r.server.status()["streams"]
            return bool(rows) and rows[0]["delivered"] > 200 and rows[0]["dropped"] > rows[0]["delivered"]

        wait_for(bounded, timeout=10, what="the stream to keep 20 readings of each tick and drop the rest")
        for _ in range(50):  # it never holds more: the servicer no longer resizes it to its own 1000
            assert r.server.status()["streams"][0]["queued"] <= 20
    finally:
        stalled.cancel()


def test_worker_log_level_and_worker_count_reach_the_workers(running):
    r = running(workers=3, min_workers_ready=3, worker_log_level="debug")
    assert r.pool.ready_count == 3  # start() waited for all three
    pids = worker_pids(r.pool)
    assert len(pids) == 3
    for pid in pids:
        cmdline = psutil.Process(pid).cmdline()
        assert cmdline[cmdline.index("--log-level") + 1] == "DEBUG"


def test_a_bad_pool_option_is_refused_by_name():
    with pytest.raises(TypeError, match="stream_bufer"):
        WorkerPool(stream_bufer=10)
    with pytest.raises(ConfigError, match="stream_buffer"):
        WorkerPool(stream_buffer=0)
    with pytest.raises(ConfigError, match="min_workers_ready"):
        WorkerPool(workers=1, min_workers_ready=2)


def test_in_process_streams_keep_the_settings_buffer_unless_limits_say_otherwise():
    from pacsys.supervised import ServicerLimits, SupervisedServer
    from pacsys.testing import demo_backend

    assert SupervisedServer(demo_backend(), port=0).servicer.limits.stream_buffer == 1000
    given = SupervisedServer(demo_backend(), port=0, limits=ServicerLimits(stream_buffer=5))
    assert given.servicer.limits.stream_buffer == 5
    assert SupervisedServer(WorkerPool(backend="sim", workers=1), port=0).servicer.limits.stream_buffer is None
