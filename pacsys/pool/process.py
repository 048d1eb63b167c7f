"""One worker process: the OS process, its socket, and what the front knows about it.

A worker is a fresh interpreter, `python -m workers.worker --fd N`, started with
`subprocess.Popen(pass_fds=...)` in a session of its own, talking msgspec frames over one
end of a socketpair. A `WorkerProcess` owns what concerns that one process: its requests in
flight (sending one, matching its reply, failing it), its pings, its start, and its end.
Its death is seen at once, twice over: the socket closes (every request in flight fails
with `WorkerLost` at once, then the pool is told: fail over) and the process's pidfd
becomes readable on the loop (it is reaped, `exited` resolves with how it ended, and the
pool is told). Nothing here decides what happens next; that is the slot's state machine
(`pacsys.pool.supervision`) and the pool's.
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
from typing import Protocol

import msgspec
import psutil

from pacsys.backends.spec import factory_spec
from pacsys.errors import exception_for_kind
from pacsys.pool.supervision import EndReason, Exit
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
    """One incarnation of a slot: generation `generation` of slot `slot`.

    `process` is the OS process (a `subprocess.Popen`) and `channel` the framed socket to it
    (`send`, `abort`); `on_frame` gets every frame the worker sends. The pool reads its state;
    it changes only through the methods below.
    """

    def __init__(
        self,
        slot: int,
        generation: int,
        process: subprocess.Popen,
        channel: Channel,
        on_message: Callable[[WorkerProcess, object], None] = lambda worker, msg: None,
        on_disconnect: Callable[[WorkerProcess], None] = lambda worker: None,
        on_exit: Callable[[WorkerProcess, Exit], None] = lambda worker, how: None,
    ):
        self.slot = slot
        self.generation = generation
        self.process = process
        self.pid = process.pid
        self._channel = channel
        self._on_message = on_message  # the frames that are the pool's: Data, SubscriptionEnded, StartupFailed
        self._on_disconnect = on_disconnect
        self._on_exit = on_exit
        loop = self._loop = asyncio.get_running_loop()  # its requests' futures are made on it
        self.ready: asyncio.Future[p.Ready] = loop.create_future()
        self.exited: asyncio.Future[Exit] = loop.create_future()  # resolved when it is reaped
        self._pending: dict[int, asyncio.Future] = {}
        self._idle = asyncio.Event()  # set while no request is in flight
        self._idle.set()
        self.ready_at: float | None = None
        self.last_pong = time.monotonic()
        self._ping_seq = 0
        self.requests = 0  # requests sent to it
        self.recycle_after = 0  # requests after which it is recycled (0: never)
        self.in_flight_remote = 0  # as the worker last reported: calls inside its backend
        self.subscriptions_remote = 0
        self.ended_by: EndReason | None = None  # why the front ended it, or is ending it
        self.gone = False  # its socket closed: it serves nothing more
        self.psutil: psutil.Process | None = None
        self._pidfd: int | None = None
        self._reaped = False

    @classmethod
    async def spawn(
        cls,
        slot: int,
        generation: int,
        command: WorkerCommand,
        on_message: Callable[[WorkerProcess, object], None],
        on_disconnect: Callable[[WorkerProcess], None],
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
        # Made before the connection: the worker's first frames may be read as soon as it is made
        # (a backend that fails at once sends StartupFailed before this coroutine resumes).
        worker = cls(slot, generation, process, _Unconnected(), on_message, on_disconnect, on_exit)
        try:
            _, worker._channel = await loop.create_unix_connection(
                lambda: FrameChannel(p.ToFront, worker.on_frame, worker.disconnected), sock=front_end
            )
        except BaseException:  # cancelled or failed: the process must not be left behind
            process.kill()
            process.wait()
            front_end.close()
            raise
        try:
            worker.psutil = psutil.Process(process.pid)
        except psutil.Error:
            worker.psutil = None
        worker._watch_exit()
        logger.info("event=worker_spawned slot=%d pid=%d", slot, worker.pid)
        return worker

    # -- what the pool reads -----------------------------------------------------------------

    @property
    def serving(self) -> bool:
        """It takes new work: connected, and not being ended by the front."""
        return not self.gone and self.ended_by is None

    @property
    def in_flight(self) -> int:
        """Requests sent and not answered yet."""
        return len(self._pending)

    @property
    def recycle_due(self) -> bool:
        """It has been sent `recycle_after` requests (the recycle_requests setting, with jitter)."""
        return bool(self.recycle_after) and self.requests >= self.recycle_after

    # -- requests ----------------------------------------------------------------------------

    def send(self, message: p.Subscribe | p.Unsubscribe | p.Ping | p.Shutdown) -> None:
        """A frame that expects no reply of its own (a subscription's, a ping, the request to stop)."""
        if not self.gone:
            self._channel.send(message)

    def request(self, message: p.Read | p.Write) -> asyncio.Future:
        """Send a request; the future resolves to its reply (ReadDone, WriteDone), or fails with
        the worker's exception or WorkerLost. Cancelling it (a timeout) forgets the request."""
        if self.gone:
            raise WorkerLost(f"worker {self.slot} is not running")
        future = self._loop.create_future()
        request_id = message.id
        self._pending[request_id] = future
        self._idle.clear()
        future.add_done_callback(lambda _f: self._forget(request_id))
        self.requests += 1
        self._channel.send(message)
        return future

    def _forget(self, request_id: int) -> None:
        self._pending.pop(request_id, None)
        if not self._pending:
            self._idle.set()

    def on_frame(self, msg: object) -> None:
        """A frame from the worker: its replies, pongs and Ready are its own; the rest goes to the pool."""
        if isinstance(msg, p.ReadDone | p.WriteDone):
            future = self._pending.get(msg.id)
            if future is not None and not future.done():
                future.set_result(msg)
        elif isinstance(msg, p.Failed):
            future = self._pending.get(msg.id)
            if future is not None and not future.done():
                # by class name, raised again here so the servicer answers the same status as in-process
                future.set_exception(exception_for_kind(msg.kind, f"{msg.kind}: {msg.message}"))
        elif isinstance(msg, p.Pong):
            self.last_pong = time.monotonic()
            self.in_flight_remote = msg.in_flight
            self.subscriptions_remote = msg.subscriptions
        elif isinstance(msg, p.Ready):
            self._on_ready(msg)
        else:
            self._on_message(self, msg)

    def ping(self) -> None:
        """Ask the worker's event loop to answer (a Pong), proof that it turns."""
        self._ping_seq += 1
        self.send(p.Ping(seq=self._ping_seq))

    # -- its start ---------------------------------------------------------------------------

    def _on_ready(self, msg: p.Ready) -> None:
        if self.ready.done():
            return
        if msg.protocol == p.PROTOCOL_VERSION:
            self.ready.set_result(msg)
            return
        # Started from other code than the front's (an upgrade on disk): a start failure.
        logger.error(
            "event=worker_protocol_mismatch slot=%d pid=%d worker_protocol=%d front_protocol=%d",
            self.slot,
            self.pid,
            msg.protocol,
            p.PROTOCOL_VERSION,
        )
        self.start_failed(
            WorkerStartupError(
                f"worker {self.slot} (pid {self.pid}) speaks worker protocol {msg.protocol}, "
                f"this front {p.PROTOCOL_VERSION}: refused (restart the service to run the new code)"
            )
        )

    def start_failed(self, exc: Exception) -> None:
        """Its start failed with `exc` (for whoever still waits on `ready`)."""
        if self.ready.done():
            return
        self.ready.set_exception(exc)
        # Marked retrieved: when nobody waits any more (the pool closed under it), asyncio
        # would log "Future exception was never retrieved" at ERROR when it is collected.
        self.ready.exception()

    # -- its end -----------------------------------------------------------------------------

    def retire(self, reason: EndReason) -> None:
        """It takes no new work from now on (recycled, scaled down): `finish` lets it end."""
        self.ended_by = self.ended_by or reason

    async def finish(self, timeout: float) -> None:
        """Let its requests in flight end (for at most `timeout` seconds), then ask it to exit."""
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            pass
        self.send(p.Shutdown())

    def kill(self, reason: EndReason) -> None:
        """SIGKILL the process (if it still runs); `reason` is how its exit will be reported."""
        if self.process.poll() is None:
            self.ended_by = self.ended_by or reason
            logger.warning("event=worker_kill slot=%d pid=%d reason=%s", self.slot, self.pid, reason)
            self.process.kill()

    def disconnected(self, exc: BaseException | None) -> None:
        """Its socket closed: it serves nothing more. Every request in flight fails now, then the pool is told.

        A worker that broke the protocol (`exc`, a ProtocolError) is killed; any other is about
        to exit by itself, which its pidfd reports.
        """
        if self.gone:
            return
        self.gone = True
        if isinstance(exc, p.ProtocolError):
            self.ended_by = self.ended_by or EndReason.PROTOCOL_ERROR
        if self.process.poll() is None:
            self.process.kill()
        self.start_failed(WorkerLost(f"worker {self.slot} exited before it was ready"))
        lost = WorkerLost(f"worker {self.slot} (pid {self.pid}) died")
        for future in list(self._pending.values()):
            if not future.done():
                future.set_exception(lost)
        self._on_disconnect(self)

    def how_it_ended(self) -> Exit:
        """The exit in the one vocabulary: the front's reason, else `signal` or `exit`, with the detail."""
        code = self.process.returncode
        if code is not None and code < 0:
            kind, detail = EndReason.SIGNAL, _signal_name(-code)
        else:
            kind, detail = EndReason.EXIT, str(code)
        return Exit(self.ended_by or kind, detail)

    def reap_now(self) -> None:
        """Kill it if it still runs, wait for it and reap it (a pool closing that cannot wait longer)."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self._reap()

    def _watch_exit(self) -> None:
        """Reap the process the moment it exits: its pidfd becomes readable on the loop."""
        loop = asyncio.get_running_loop()
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            # No pidfd (old kernel): wait in a thread instead.
            loop.run_in_executor(None, self.process.wait).add_done_callback(
                lambda _f: loop.call_soon_threadsafe(self._reap)
            )
            return
        loop.add_reader(self._pidfd, self._reap)

    def _reap(self) -> None:
        if self._reaped:
            return
        self._reaped = True
        if self._pidfd is not None:
            asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        self.process.wait()
        how = self.how_it_ended()
        self.disconnected(None)  # a socket that is not closed yet serves nothing either
        if not self.exited.done():
            self.exited.set_result(how)
        self._on_exit(self, how)
        self._channel.abort()


class Channel(Protocol):
    """The framed socket to a worker as a WorkerProcess uses it (`workers.channel.FrameChannel`)."""

    def send(self, message: msgspec.Struct) -> None: ...

    def abort(self) -> None: ...


class _Unconnected:
    """The channel of a WorkerProcess until its socket is connected (nothing is sent before)."""

    def send(self, message: msgspec.Struct) -> None:
        raise RuntimeError("the worker is not connected yet")

    def abort(self) -> None:
        pass


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
