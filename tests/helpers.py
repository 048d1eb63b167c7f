"""Shared by the tests that run a real worker pool behind a real server."""

import asyncio
import threading
import time

import grpc
import psutil

from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2, DAQ_pb2_grpc
from pacsys.pool.pool import WorkerPool
from pacsys.supervised import SupervisedServer

FAST = dict(
    ping_interval=0.2,
    hang_timeout=1.5,
    restart_backoff_initial=0.05,
    restart_backoff_max=0.5,
    subscription_linger=0.2,
    ready_timeout=30.0,
)


POLL_INTERVAL = 0.02  # seconds between two looks at a condition


def _polls(condition, timeout, what):
    """The one poll-until: yields while `condition()` is false, AssertionError once `timeout` seconds
    have passed. Tests wait on conditions this way, with generous deadlines, never on fixed sleeps."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out waiting for {what}")
        yield


def wait_for(condition, timeout=20.0, what="condition"):
    """Block until `condition()` holds (a test's thread)."""
    for _ in _polls(condition, timeout, what):
        time.sleep(POLL_INTERVAL)


async def until(condition, timeout=20.0, what="condition"):
    """Wait on the running event loop until `condition()` holds (a coroutine's test)."""
    for _ in _polls(condition, timeout, what):
        await asyncio.sleep(POLL_INTERVAL)


def worker_pids(pool):
    return [w.pid for w in pool.worker_states() if w.pid is not None]


class Running:
    """A SupervisedServer over a WorkerPool, and a client stub for it."""

    def __init__(self, backend="sim", workers=2, **options):
        self.pool = WorkerPool(backend=backend, workers=workers, **{**FAST, **options})
        self.server = SupervisedServer(self.pool, port=0, host="127.0.0.1", close_backend=True)
        self.server.start()
        self.pids_seen = set(worker_pids(self.pool))
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.server.port}")
        self.stub = DAQ_pb2_grpc.DAQStub(self.channel)

    def read(self, drfs, timeout=10.0):
        return list(self.stub.Read(DAQ_pb2.ReadingList(drf=drfs), timeout=timeout))

    def set(self, device, value, timeout=10.0):
        request = DAQ_pb2.SettingList()
        s = request.setting.add()
        s.device = device
        s.value.scalar = value
        return self.stub.Set(request, timeout=timeout)

    def owner_pid(self, device):
        """The pid that serves `device` (the scripted backend reads Z:PID as its pid)."""
        return self.pool._router.owner(device).pid

    def stop(self):
        self.pids_seen |= set(worker_pids(self.pool))
        self.channel.close()
        self.server.stop()
        for pid in self.pids_seen:
            assert not _alive(pid), f"worker {pid} outlived the server"


def _alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class OneShotLoad:
    """`clients` threads doing one-shot reads until stopped; counts what succeeded and what failed.

    Use as a context manager: the threads stop and are joined on exit.
    """

    def __init__(self, running: Running, clients: int, devices: int = 64):
        self.done = 0
        self.errors: list[grpc.StatusCode] = []
        self._stop = threading.Event()
        self._running = running
        self._devices = [f"Z:SIM{i:03d}@I" for i in range(devices)]
        self._threads = [threading.Thread(target=self._client, args=(k,), daemon=True) for k in range(clients)]

    def _client(self, k: int) -> None:
        while not self._stop.is_set():
            try:
                self._running.read([self._devices[(k + self.done) % len(self._devices)]], timeout=10)
                self.done += 1
            except grpc.RpcError as exc:
                self.errors.append(exc.code())

    def __enter__(self) -> "OneShotLoad":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)
