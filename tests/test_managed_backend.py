"""The server reads a managed backend through the ManagedBackend protocol: any backend with
its members (not only the worker pool) is started, and health and the status view follow it.
A backend without them is always ready and alive."""

import json

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import wait_for

from pacsys.pool import PoolStats, WorkerPool
from pacsys.supervised import CountsSubscriptions, ManagedBackend, SupervisedServer
from pacsys.supervised._server import ADMIN_SERVICE
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
        return [{"slot": 0, "state": "ready" if self.ready else "restarting", "pid": None}]

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
            assert view["workers"] == backend.worker_states() and view["pool"]["exits_by_reason"] == {"signal": 2}
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
