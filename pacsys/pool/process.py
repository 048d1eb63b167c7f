"""One worker process: the OS process, its socket, and what the front knows about it.

A worker is a fresh interpreter, `python -m workers.worker --fd N`, started with
`subprocess.Popen(pass_fds=...)` in a session of its own, talking msgspec frames over one
end of a socketpair. Its death is seen at once, twice over: the socket closes
(`on_disconnect`: fail over what was pending) and the process's pidfd becomes readable on
the loop (`on_exit`: it is reaped, with how it ended). Nothing here decides what happens
next; that is the slot's state machine (pacsys/pool/supervision.py) and the pool's.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil

from pacsys.backends.spec import factory_spec
from pacsys.pool.supervision import Exit
from pacsys.settings import Settings
from workers import protocol as p
from workers.channel import FrameChannel
from workers.worker import command as worker_command

logger = logging.getLogger("pacsys.workers")


class WorkerLost(Exception):
    """The worker holding a request died before answering it."""


class WorkerStartupError(RuntimeError):
    """A worker could not build its backend."""


@dataclass(frozen=True)
class WorkerCommand:
    """How to start a worker: its backend's factory spec and the settings of these names."""

    backend: str  # a module:factory spec: a built-in spec is rewritten by the front
    threads_per_worker: int
    worker_log_level: str
    event_loop: str
    worker_python: str | None  # another environment's interpreter, or None for this one

    @classmethod
    def from_settings(cls, settings: Settings) -> WorkerCommand:
        # Workers read only module:factory specs: a built-in form is rewritten here.
        return cls(
            factory_spec(settings.backend),
            settings.threads_per_worker,
            settings.worker_log_level,
            settings.event_loop,
            settings.worker_python,
        )

    def argv(self, fd: int, slot: int) -> list[str]:
        # Under another interpreter the worker sets its own import path (see worker.command),
        # so that environment's own `pacsys` is not shadowed by ours.
        start = worker_command(self.worker_python) if self.worker_python else [sys.executable, "-m", "workers.worker"]
        return [
            *start,
            "--fd",
            str(fd),
            "--backend",
            self.backend,
            "--threads",
            str(self.threads_per_worker),
            "--slot",
            str(slot),
            "--log-level",
            self.worker_log_level,
            "--loop",
            self.event_loop,
        ]

    def env(self, slot: int) -> dict[str, str]:
        env = dict(os.environ)
        # The worker resolves `module:factory` specs on the same import path as the front.
        env["PYTHONPATH"] = os.pathsep.join(x for x in [os.getcwd(), *sys.path] if x)
        env["PACSYS_WORKER_SLOT"] = str(slot)
        return env


class WorkerProcess:
    """One incarnation of a slot: generation `generation` of slot `slot`."""

    def __init__(self, slot: int, generation: int, process: subprocess.Popen, channel: FrameChannel):
        self.slot = slot
        self.generation = generation
        self.process = process
        self.pid = process.pid
        self.channel = channel
        self.ready: asyncio.Future[p.Ready] = asyncio.get_running_loop().create_future()
        self.pending: dict[int, asyncio.Future] = {}
        self.ready_at: float | None = None
        self.last_pong = time.monotonic()
        self.ping_seq = 0
        self.requests = 0
        self.recycle_after = 0  # requests after which it is recycled (0: never)
        self.in_flight_remote = 0  # as the worker last reported: calls inside its backend
        self.subscriptions_remote = 0
        self.ended_by: str | None = None  # why the front ended it (hang, recycle, shutdown ...)
        self.gone = False  # its socket closed: it serves nothing more
        self.pidfd: int | None = None
        self.reaped = False
        self.reap: Callable[[], None] = lambda: None  # set once the exit is watched
        self.psutil: psutil.Process | None = None

    @classmethod
    async def spawn(
        cls,
        slot: int,
        generation: int,
        command: WorkerCommand,
        on_message: Callable[[WorkerProcess, object], None],
        on_disconnect: Callable[[WorkerProcess, BaseException | None], None],
        on_exit: Callable[[WorkerProcess, Exit], None],
    ) -> WorkerProcess:
        """Start the process and connect to it (OSError if it cannot be started)."""
        loop = asyncio.get_running_loop()
        front_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # A session of its own: a terminal's Ctrl-C, hangup or job-control signals go to
            # the front, which decides what the workers do.
            process = subprocess.Popen(
                command.argv(worker_end.fileno(), slot),
                pass_fds=(worker_end.fileno(),),
                env=command.env(slot),
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        except BaseException:
            front_end.close()
            raise
        finally:
            worker_end.close()
        holder: list[WorkerProcess] = []
        try:
            _, channel = await loop.create_unix_connection(
                lambda: FrameChannel(
                    p.ToFront, lambda m: on_message(holder[0], m), lambda exc: on_disconnect(holder[0], exc)
                ),
                sock=front_end,
            )
        except BaseException:  # cancelled or failed: the process must not be left behind
            process.kill()
            process.wait()
            front_end.close()
            raise
        worker = cls(slot, generation, process, channel)
        holder.append(worker)
        try:
            worker.psutil = psutil.Process(process.pid)
        except psutil.Error:
            worker.psutil = None
        worker._watch_exit(on_exit)
        logger.info("event=worker_spawned slot=%d pid=%d", slot, worker.pid)
        return worker

    def kill(self, reason: str) -> None:
        """SIGKILL the process (if it still runs); `reason` is how its exit will be reported."""
        if self.process.poll() is None:
            self.ended_by = self.ended_by or reason
            logger.warning("event=worker_kill slot=%d pid=%d reason=%s", self.slot, self.pid, reason)
            self.process.kill()

    def how_it_ended(self) -> Exit:
        """The exit in the one vocabulary: the front's reason, else `signal` or `exit`, with the detail."""
        code = self.process.returncode
        if code is not None and code < 0:
            kind, detail = "signal", _signal_name(-code)
        else:
            kind, detail = "exit", str(code)
        return Exit(self.ended_by or kind, detail)

    def _watch_exit(self, on_exit: Callable[[WorkerProcess, Exit], None]) -> None:
        """Reap the process the moment it exits: its pidfd becomes readable on the loop."""
        loop = asyncio.get_running_loop()

        def reap() -> None:
            if self.reaped:
                return
            self.reaped = True
            self.close_pidfd(loop)
            self.process.wait()
            on_exit(self, self.how_it_ended())
            self.channel.abort()

        self.reap = reap
        try:
            self.pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            # No pidfd (old kernel): wait in a thread instead.
            loop.run_in_executor(None, self.process.wait).add_done_callback(lambda _f: loop.call_soon_threadsafe(reap))
            return
        loop.add_reader(self.pidfd, reap)

    def close_pidfd(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.pidfd is not None:
            loop.remove_reader(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = None


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
