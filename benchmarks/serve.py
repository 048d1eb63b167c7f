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
`ServerProcess.serving` starts one of these as a subprocess; `ServerProcess` any server command.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil

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
BANNER = re.compile(r"serving DAQ on \S+:(\d+)")  # pacsys-supervisor's first line


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
    """A server subprocess that prints its port first: `with ServerProcess(argv) as s:` s.port, s.pid.

    The port is the first line that is a bare number (`benchmarks.serve`, the null server, the
    release's server) or pacsys-supervisor's banner. The process always ends on exit: its
    stdin is closed (where the benchmark servers end), then SIGTERM (where pacsys-supervisor
    drains and ends), then after 30 s SIGKILL for it and its children. `log`: a file for its
    stderr (else this process's).
    """

    def __init__(
        self,
        argv: list[str],
        cwd: Path = ROOT,
        env: dict[str, str] | None = None,
        log: Path | None = None,
        name: str = "",
    ):
        self.argv = argv
        self.cwd = cwd
        self.env = env
        self.log = log
        self.name = name or " ".join(argv[1:])
        self.process: subprocess.Popen | None = None
        self.port = 0

    @classmethod
    def serving(cls, mode: str, backend: str = "benchmarks.backends:memory", workers: int = 0) -> ServerProcess:
        """`python -m benchmarks.serve MODE BACKEND WORKERS`."""
        return cls([sys.executable, "-m", "benchmarks.serve", mode, backend, str(workers)], name=f"{mode} {backend}")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def __enter__(self) -> ServerProcess:
        env = None if self.env is None else {**os.environ, **self.env}
        with open(self.log, "wb") if self.log else contextlib.nullcontext() as log:
            self.process = subprocess.Popen(
                self.argv, cwd=self.cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log
            )
        try:
            self.port = self._read_port(60.0)
        except BaseException:
            self.stop()
            raise
        return self

    def _read_port(self, timeout: float) -> int:
        assert self.process is not None and self.process.stdout is not None
        stdout = self.process.stdout
        found: list[int] = []

        def read() -> None:
            for raw in iter(stdout.readline, b""):
                line = raw.decode(errors="replace").strip()
                banner = BANNER.search(line)
                if line.isdigit() or banner:
                    found.append(int(banner.group(1)) if banner else int(line))
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout)
        if not found:
            why = ""
            if self.log is not None and self.log.exists():
                why = ": " + " / ".join(self.log.read_text(errors="replace").strip().splitlines()[-5:])
            raise RuntimeError(f"server {self.name} did not start (exit {self.process.poll()}){why}")
        return found[0]

    def stop(self) -> None:
        process = self.process
        if process is None:
            return
        self.process = None
        try:
            process.stdin.close()  # type: ignore[union-attr]
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            process.wait(30)
        except (OSError, subprocess.TimeoutExpired):
            pass
        finally:
            if process.poll() is None:
                for child in _children(process.pid):
                    child.kill()
                process.kill()
                process.wait()
            process.stdout.close()  # type: ignore[union-attr]

    def __exit__(self, *exc_info) -> None:
        self.stop()


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


if __name__ == "__main__":
    main(sys.argv[1:])
