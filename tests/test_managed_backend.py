"""The server reads a managed backend through the ManagedBackend protocol: any backend with
its members (not only the worker pool) is started, and health and the status view follow it.
A backend without them is always ready and alive."""

import json

import grpc
import msgspec
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import wait_for

from pacsys.pool.pool import WorkerPool
from pacsys.pool.stats import PoolStats, WorkerRow
from pacsys.pool.supervision import EndReason, SlotState
from pacsys.supervised import CountsSubscriptions, ManagedBackend, SupervisedServer
from pacsys.supervised._server import ADMIN_SERVICE
from pacsys.supervised.admin import render_status
from pacsys.testing import AsyncFakeBackend

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Managed(AsyncFakeBackend):
    """A fake with one pretend worker whose readiness and liveness a test sets."""

    def __init__(self):
        super().__init__()
        self.stats = PoolStats()
        self.started = 0
        self.ready = True
        self.alive = True

    async def start(self):
        self.started += 1

    @property
    def is_ready(self):
        return self.ready

    @property
    def is_alive(self):
        return self.alive

    @property
    def ready_count(self):
        return int(self.ready)

    def unready_seconds(self):
        return 0.0 if self.ready else 99.0

    def worker_states(self):
        state = SlotState.READY if self.ready else SlotState.RESTARTING
        return [WorkerRow(slot=0, state=state, pid=None, restarts=0, last_exit=EndReason.SIGNAL, last_exit_detail="SIGKILL",
                          subscriptions=0, devices=0, in_flight=0, backend_in_flight=0, backend_subscriptions=0,
                          requests=0, heartbeat_age=None, uptime=None, restart_budget_left=5, next_backoff=0.1,
                          next_start_in=None, cooldowns=0, rss_bytes=1024)]  # fmt: skip

    async def add_worker(self):
        pass

    async def remove_worker(self):
        pass


def _check(channel, service):
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_the_protocol_is_what_the_pool_and_a_lookalike_implement():
    assert isinstance(WorkerPool(backend="sim", workers=1), ManagedBackend)  # not started: no process
    assert isinstance(Managed(), ManagedBackend)
    fake = AsyncFakeBackend()
    assert not isinstance(fake, ManagedBackend) and isinstance(fake, CountsSubscriptions)


def test_health_and_status_follow_a_managed_backend():
    backend = Managed()
    backend.stats.exits_by_reason["signal"] = 2
    with SupervisedServer(backend, port=0, host="127.0.0.1") as srv:
        assert backend.started == 1 and srv.managed is backend
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
            assert _check(channel, "readiness") == SERVING
            view = json.loads(channel.unary_unary(f"/{ADMIN_SERVICE}/Status")(b"", timeout=5))
            # the rows as JSON objects, under their field names (rss_bytes given, cpu_seconds left out)
            (row,) = view["workers"]
            assert row == msgspec.to_builtins(backend.worker_states()[0]) and "cpu_seconds" not in row
            assert (row["state"], row["last_exit"], row["rss_bytes"]) == ("ready", "signal", 1024)
            assert view["pool"]["exits_by_reason"] == {"signal": 2}
            assert "READY" in render_status(view) and "signal SIGKILL" in render_status(view)
            backend.ready = False
            wait_for(lambda: _check(channel, "readiness") == NOT_SERVING, what="readiness to follow is_ready")
            assert _check(channel, "liveness") == SERVING
            backend.alive = False
            wait_for(lambda: _check(channel, "liveness") == NOT_SERVING, what="liveness to follow is_alive")


def test_any_other_backend_is_always_ready_and_has_no_workers():
    with SupervisedServer(AsyncFakeBackend(), port=0, host="127.0.0.1") as srv:
        assert srv.managed is None
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
            assert _check(channel, "readiness") == SERVING and _check(channel, "liveness") == SERVING
            view = json.loads(channel.unary_unary(f"/{ADMIN_SERVICE}/Status")(b"", timeout=5))
            assert "workers" not in view and "pool" not in view
