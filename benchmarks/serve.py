"""Serve the DAQ service for a benchmark: `python -m benchmarks.serve MODE BACKEND WORKERS`.

MODE is one of
    null     the bare grpc.aio server of `benchmarks.null_server` (BACKEND and WORKERS ignored)
    inproc   SupervisedServer(backend): the backend in this process (a sync one through
             pacsys's thread-pool adapter)
    to_thread  as inproc, but a sync backend runs through `asyncio.to_thread` (the default
               executor), as the server's first form did
    pool     SupervisedServer(WorkerPool(backend=BACKEND, workers=WORKERS))
BACKEND is a backend SPEC (sim, fake, module:factory such as benchmarks.backends:memory).

Prints the port once serving, then serves until stdin closes or SIGTERM/SIGINT. Run from the
repository root (the workers import `module:factory` specs from the front's cwd).
`ServerProcess` starts one of these as a subprocess and always ends it.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
from pathlib import Path

from pacsys.aio import AsyncBackend
from pacsys.backends import Backend
from pacsys.backends.spec import build_backend
from pacsys.supervised import ServicerLimits
from pacsys.supervised._server import tune_gc_for_serving
from pacsys.types import BackendCapability, Reading, Value, WriteResult

MODES = ("null", "inproc", "to_thread", "pool")

# Every benchmark client connects from 127.0.0.1, one client as far as the per-client limits
# go: lift those (the per-request and per-stream ones stay the service's).
ONE_HOST_LIMITS = ServicerLimits(max_streams_per_peer=1_000_000, max_calls_per_peer=1_000_000, max_peer_rate=1e12)


def parse_modes(text: str, fixed: tuple[str, ...]) -> list[str]:
    """A comma-separated mode list: names from `fixed`, or poolN; ValueError names a bad one."""
    modes = [m.strip() for m in text.split(",") if m.strip()]
    for mode in modes:
        if mode not in fixed and not (mode.startswith("pool") and mode[4:].isdigit()):
            raise ValueError(f"unknown mode {mode!r}")
    return modes


ROOT = Path(__file__).resolve().parent.parent


class ToThreadBackend(AsyncBackend):
    """The server's first design: each call of a sync backend in `asyncio.to_thread` (the default executor)."""

    def __init__(self, backend: Backend):
        self.backend = backend

    @property
    def capabilities(self) -> BackendCapability:
        return self.backend.capabilities

    async def get_many(self, drfs: list[str], timeout: float | None = None) -> list[Reading]:
        return await asyncio.to_thread(self.backend.get_many, drfs, timeout)

    async def write_many(self, settings: list[tuple[str, Value]], timeout: float | None = None) -> list[WriteResult]:
        return await asyncio.to_thread(self.backend.write_many, settings, timeout)

    async def close(self) -> None:
        await asyncio.to_thread(self.backend.close)


def make_server(mode: str, spec: str, workers: int):
    """A started server with `.port` and `.stop()`."""
    if mode == "null":
        from benchmarks.null_server import NullServer

        return NullServer().start()
    from pacsys.supervised import SupervisedServer

    backend: Backend | AsyncBackend
    if mode == "pool":
        from pacsys.pool.pool import WorkerPool

        backend = WorkerPool(backend=spec, workers=workers)
    else:
        backend = build_backend(spec)
        if mode == "to_thread" and isinstance(backend, Backend):
            backend = ToThreadBackend(backend)
    server = SupervisedServer(
        backend, port=0, host="127.0.0.1", close_backend=True, shutdown_grace=0.5, limits=ONE_HOST_LIMITS
    )
    server.start()
    return server


def main(argv: list[str]) -> None:
    if len(argv) != 3 or argv[0] not in MODES:
        sys.exit(f"usage: python -m benchmarks.serve {{{','.join(MODES)}}} BACKEND WORKERS")
    server = make_server(argv[0], argv[1], int(argv[2]))
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    tune_gc_for_serving()  # as pacsys-supervisor does
    print(server.port, flush=True)
    try:
        while not done.wait(0.5):
            pass
    finally:
        server.stop()


class ServerProcess:
    """`with ServerProcess("pool", "sim", 2) as s:` s.port, s.pid; the process always ends on exit."""

    def __init__(self, mode: str, backend: str = "benchmarks.backends:memory", workers: int = 0):
        self.args = [sys.executable, "-m", "benchmarks.serve", mode, backend, str(workers)]
        self.process: subprocess.Popen | None = None
        self.port = 0

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def __enter__(self) -> ServerProcess:
        self.process = subprocess.Popen(self.args, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            line = self.process.stdout.readline()  # type: ignore[union-attr]
            if not line.strip().isdigit():
                raise RuntimeError(f"server {self.args[3:]} did not start (exit {self.process.poll()})")
            self.port = int(line)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        process = self.process
        if process is None:
            return
        try:
            process.stdin.close()  # type: ignore[union-attr]
            process.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            pass
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            process.stdout.close()  # type: ignore[union-attr]
            self.process = None

    def __exit__(self, *exc_info) -> None:
        self.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
