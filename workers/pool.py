"""WorkerPool: backend worker processes behind the AsyncBackend interface.

The servicer calls the pool like any AsyncBackend; everything about processes lives
here and stays invisible to it:

- Routing (device affinity): every DRF goes to the worker that ranks first for its
  canonical device name among the ready workers (rendezvous hashing). A request that
  names devices of several workers is split, sent in parallel and reassembled in
  request order. When a worker dies its devices move to their next-ranked worker, and
  back when the slot's replacement is ready.
- Shared subscriptions (fan-out): one backend subscription per distinct canonical DRF,
  whatever the number of client streams; each client stream has its own bounded
  handle, so a slow client loses its own oldest readings and nobody else's. The last
  client leaving closes the backend subscription after a linger.
- Supervision: a worker's death is seen at once (its socket closes; its pidfd becomes
  readable on the loop), it is reaped and respawned with exponential backoff; a slot
  that dies more than `restart_intensity` times within `restart_period` seconds is given
  up. A loop that does not answer pings within `hang_timeout` is killed. One-shot reads
  in flight on a dead worker are retried once elsewhere; writes are never replayed,
  they answer DPM_WRITE_OUTCOME_UNKNOWN. Subscriptions move to the device's next worker
  and the client streams stay open.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import hashlib
import itertools
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import psutil

from pacsys.aio import AsyncBackend, AsyncSubscriptionHandle, caller_authorization
from pacsys.drf import DRFError, parse_cached
from pacsys.errors import AuthenticationError, BackendUnavailable, LimitExceeded, PolicyDenied
from pacsys.replies import ReplyBodies
from pacsys.status import DPM, DPM_INTERNAL, DPM_WRITE_OUTCOME_UNKNOWN
from pacsys.types import BackendCapability, Reading, Value, WriteResult
from workers import protocol as p
from workers.channel import FrameChannel
from workers.worker import command as worker_command

logger = logging.getLogger("pacsys.workers")

# Exceptions a worker reports by class name, raised again here so the servicer maps
# them to the same gRPC status as in the in-process mode.
_EXCEPTIONS: dict[str, type[Exception]] = {
    "NotImplementedError": NotImplementedError,
    "AuthenticationError": AuthenticationError,
    "BackendUnavailable": BackendUnavailable,
    "LimitExceeded": LimitExceeded,
    "PolicyDenied": PolicyDenied,
    "TimeoutError": TimeoutError,
    "ValueError": ValueError,
    "DRFError": ValueError,
}


_FRONT_REASONS = frozenset(
    {
        "hang",
        "protocol_error",
        "startup_failed",
        "spawn_failed",
        "ready_timeout",
        "recycle_rss",
        "recycle_requests",
        "scale_down",
    }
)


class WorkerStartupError(RuntimeError):
    """A worker could not build its backend (the pool does not start)."""


class WorkerLost(Exception):
    """The worker holding a request died before answering it."""


class SlotState(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    RESTARTING = "restarting"
    GIVEN_UP = "given_up"
    STOPPED = "stopped"


@dataclass
class PoolOptions:
    """The pool's settings; the service fills them from `pacsys.supervised.config.Settings`."""

    backend: str = "sim"
    workers: int = 2
    threads_per_worker: int = 16
    min_workers_ready: int = 1
    ready_timeout: float = 30.0
    ping_interval: float = 1.0
    hang_timeout: float = 5.0
    restart_backoff_initial: float = 0.1
    restart_backoff_max: float = 5.0
    restart_backoff_reset: float = 30.0
    restart_intensity: int = 5
    restart_period: float = 60.0
    recycle_rss_mb: int = 0
    recycle_requests: int = 0
    recycle_jitter: float = 0.1
    subscription_linger: float = 2.0
    stream_buffer: int = 1000
    worker_log_level: str = "WARNING"
    event_loop: str = "auto"
    worker_python: str | None = None

    @classmethod
    def from_settings(cls, settings: Any) -> PoolOptions:
        names = cls.__dataclass_fields__.keys()
        return cls(**{n: getattr(settings, n) for n in names if hasattr(settings, n)})


@dataclass
class PoolStats:
    restarts_by_reason: collections.Counter = field(default_factory=collections.Counter)
    slots_given_up: int = 0
    reads_retried: int = 0
    writes_outcome_unknown: int = 0
    stream_gaps: int = 0
    last_gap_seconds: float | None = None
    max_gap_seconds: float = 0.0
    last_restart_to_ready_seconds: float | None = None


class _Worker:
    """One worker process incarnation."""

    def __init__(self, slot: _Slot, process: subprocess.Popen, channel: FrameChannel):
        self.slot = slot
        self.process = process
        self.pid = process.pid
        self.channel = channel
        self.ready: asyncio.Future[p.Ready] = asyncio.get_running_loop().create_future()
        self.pending: dict[int, asyncio.Future] = {}
        self.ready_at: float | None = None
        self.last_pong = time.monotonic()
        self.ping_seq = 0
        self.requests = 0
        self.in_flight_remote = 0
        self.subscriptions_remote = 0
        self.exit_reason: str | None = None  # why the front ended it (hang, recycle, shutdown)
        self.gone = False
        self.pidfd: int | None = None
        self.psutil: psutil.Process | None = None
        self.recycle_after: int = 0


class _Slot:
    def __init__(self, index: int, options: PoolOptions):
        self.index = index
        self.state = SlotState.STARTING
        self.worker: _Worker | None = None
        self.backoff = options.restart_backoff_initial
        self.restart_times: collections.deque[float] = collections.deque()
        self.restarts = 0
        self.last_exit: str | None = None
        self.died_at: float | None = None
        self.respawn: asyncio.Handle | None = None
        self.replacing = False


class _Shared:
    """One backend subscription (one canonical DRF) and the client streams that share it."""

    def __init__(self, key: str, device: str, periodic: bool):
        self.key = key
        self.device = device
        self.periodic = periodic
        self.sid = 0
        self.worker: _Worker | None = None  # the incarnation holding the backend subscription
        self.subscribers: set[AsyncSubscriptionHandle] = set()
        self.last: Reading | None = None
        self.linger: asyncio.TimerHandle | None = None
        self.gap_started: float | None = None
        self.authorization: str | None = None


class WorkerPool(AsyncBackend):
    def __init__(self, settings: Any = None, **overrides: Any):
        options = PoolOptions.from_settings(settings) if settings is not None else PoolOptions()
        for name, value in overrides.items():
            if not hasattr(options, name):
                raise TypeError(f"unknown pool option {name!r}")
            setattr(options, name, value)
        if options.workers < 1:
            raise ValueError("a WorkerPool needs at least one worker")
        self.options = options
        self.stats = PoolStats()
        # The workers encode each reading's reply body; the servicer uses this as its cache.
        self.reply_bodies: ReplyBodies = ReplyBodies()
        self._slots: list[_Slot] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ids = itertools.count(1)
        self._rankings: dict[str, tuple[int, ...]] = {}
        self._shared: dict[str, _Shared] = {}
        self._by_sid: dict[int, _Shared] = {}
        self._clients: dict[AsyncSubscriptionHandle, list[_Shared]] = {}
        self._capabilities = BackendCapability(0)
        self._ticker: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._live: set[_Worker] = set()  # every worker process not yet reaped
        self._closing = False
        self._started = False

    # -- public state ----------------------------------------------------------------

    @property
    def capabilities(self) -> BackendCapability:
        return self._capabilities

    @property
    def ready_count(self) -> int:
        return sum(1 for s in self._slots if s.state is SlotState.READY)

    @property
    def is_ready(self) -> bool:
        """Enough workers are ready to serve (health readiness)."""
        return self.ready_count >= self.options.min_workers_ready

    @property
    def subscription_count(self) -> int:
        """Backend subscriptions held in the workers (one per distinct DRF in use)."""
        return sum(1 for s in self._shared.values() if s.worker is not None)

    @property
    def client_subscription_count(self) -> int:
        return len(self._clients)

    def worker_states(self) -> list[dict[str, Any]]:
        """One dict per slot, for health, metrics and the status view."""
        now = time.monotonic()
        subscriptions: collections.Counter[int] = collections.Counter()
        devices: dict[int, set[str]] = collections.defaultdict(set)
        for shared in self._shared.values():
            if shared.worker is not None:
                subscriptions[shared.worker.slot.index] += 1
                devices[shared.worker.slot.index].add(shared.device)
        rows = []
        for slot in self._slots:
            w = slot.worker
            row: dict[str, Any] = {
                "slot": slot.index,
                "state": slot.state.value,
                "pid": w.pid if w else None,
                "restarts": slot.restarts,
                "last_exit": slot.last_exit,
                "subscriptions": subscriptions[slot.index],
                "devices": len(devices[slot.index]),  # distinct devices it streams now
                "in_flight": len(w.pending) if w else 0,
                # as the worker last reported: calls inside its backend (a saturated
                # thread pool shows here) and the backend subscriptions it holds
                "backend_in_flight": w.in_flight_remote if w else 0,
                "backend_subscriptions": w.subscriptions_remote if w else 0,
                "requests": w.requests if w else 0,
                "heartbeat_age": (now - w.last_pong) if w and w.ready_at else None,
                "uptime": (now - w.ready_at) if w and w.ready_at else None,
                "restart_budget_left": max(0, self.options.restart_intensity - len(slot.restart_times)),
            }
            if w is not None and w.psutil is not None:
                try:
                    with w.psutil.oneshot():
                        row["rss_bytes"] = w.psutil.memory_info().rss
                        cpu = w.psutil.cpu_times()
                        row["cpu_seconds"] = cpu.user + cpu.system
                except psutil.Error:
                    pass
            rows.append(row)
        return rows

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Spawn the workers and wait until enough are ready; WorkerStartupError if the backend cannot be built."""
        if self._started:
            return
        self._started = True
        self._loop = asyncio.get_running_loop()
        self._slots = [_Slot(i, self.options) for i in range(self.options.workers)]
        results = await asyncio.gather(*(self._start_slot(s) for s in self._slots), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        startup = [r for r in failures if isinstance(r, WorkerStartupError)]
        if startup or self.ready_count < self.options.min_workers_ready:
            await self.close()
            if startup:
                raise startup[0]
            raise WorkerStartupError(
                f"only {self.ready_count} of {self.options.workers} workers became ready "
                f"within {self.options.ready_timeout} s: {failures[0] if failures else 'unknown'}"
            )
        self._ticker = self._loop.create_task(self._tick())
        logger.info("event=pool_ready workers=%d backend=%s", self.ready_count, self.options.backend)

    async def _start_slot(self, slot: _Slot) -> None:
        slot.state = SlotState.STARTING
        worker = await self._spawn(slot)
        try:
            ready = await asyncio.wait_for(asyncio.shield(worker.ready), self.options.ready_timeout)
        except TimeoutError:
            self._kill(worker, "ready_timeout")
            raise WorkerStartupError(
                f"worker {slot.index} was not ready within {self.options.ready_timeout} s"
            ) from None
        except WorkerLost as exc:
            raise WorkerStartupError(str(exc)) from None
        self._on_ready(worker, ready)

    async def _spawn(self, slot: _Slot, install: bool = True) -> _Worker:
        loop = asyncio.get_running_loop()
        front_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ)
        # The worker resolves `module:factory` specs on the same import path as the front.
        env["PYTHONPATH"] = os.pathsep.join(x for x in [os.getcwd(), *sys.path] if x)
        env["PACSYS_WORKER_SLOT"] = str(slot.index)
        # Under another interpreter (worker_python) the worker sets its own path: see worker.command.
        start = (
            worker_command(self.options.worker_python)
            if self.options.worker_python
            else [sys.executable, "-m", "workers.worker"]
        )
        cmd = [
            *start,
            "--fd",
            str(worker_end.fileno()),
            "--backend",
            self.options.backend,
            "--threads",
            str(self.options.threads_per_worker),
            "--slot",
            str(slot.index),
            "--log-level",
            self.options.worker_log_level,
            "--loop",
            self.options.event_loop,
        ]
        try:
            # A session of its own: a terminal's Ctrl-C, hangup or job-control signals go to
            # the front, which decides what the workers do.
            process = subprocess.Popen(
                cmd, pass_fds=(worker_end.fileno(),), env=env, stdin=subprocess.DEVNULL, start_new_session=True
            )
        finally:
            worker_end.close()
        holder: list[_Worker] = []
        try:
            _, channel = await loop.create_unix_connection(
                lambda: FrameChannel(
                    p.ToFront,
                    lambda m: self._on_message(holder[0], m),
                    lambda exc: self._on_disconnect(holder[0], exc),
                ),
                sock=front_end,
            )
        except BaseException:  # cancelled or failed: the process must not be left behind
            process.kill()
            process.wait()
            front_end.close()
            raise
        worker = _Worker(slot, process, channel)
        holder.append(worker)
        self._live.add(worker)
        if install:
            slot.worker = worker
        try:
            worker.psutil = psutil.Process(process.pid)
        except psutil.Error:
            worker.psutil = None
        self._watch_exit(worker)
        logger.info("event=worker_spawned slot=%d pid=%d", slot.index, worker.pid)
        return worker

    def _watch_exit(self, worker: _Worker) -> None:
        """Reap the process the moment it exits: its pidfd becomes readable on the loop."""
        assert self._loop is not None
        try:
            worker.pidfd = os.pidfd_open(worker.pid)
        except (AttributeError, OSError):
            # No pidfd (old kernel): wait in a thread instead.
            self._loop.run_in_executor(None, worker.process.wait).add_done_callback(
                lambda _f: self._loop.call_soon_threadsafe(self._reap, worker)  # type: ignore[union-attr]
            )
            return
        self._loop.add_reader(worker.pidfd, self._reap, worker)

    def _reap(self, worker: _Worker) -> None:
        if worker.pidfd is not None:
            assert self._loop is not None
            self._loop.remove_reader(worker.pidfd)
            os.close(worker.pidfd)
            worker.pidfd = None
        code = worker.process.wait()
        self._live.discard(worker)
        reason = worker.exit_reason or (f"signal {signal.Signals(-code).name}" if code < 0 else f"exit {code}")
        self._on_exit(worker, reason)
        worker.channel.abort()

    def _on_ready(self, worker: _Worker, ready: p.Ready) -> None:
        slot = worker.slot
        worker.ready_at = time.monotonic()
        worker.last_pong = worker.ready_at
        self._capabilities = BackendCapability(ready.capabilities)
        if self.options.recycle_requests:
            jitter = 1 + random.uniform(0, self.options.recycle_jitter)
            worker.recycle_after = int(self.options.recycle_requests * jitter)
        slot.state = SlotState.READY
        if slot.died_at is not None:
            self.stats.last_restart_to_ready_seconds = worker.ready_at - slot.died_at
            slot.died_at = None
        logger.info("event=worker_ready slot=%d pid=%d backend=%r", slot.index, worker.pid, ready.backend)
        self._rebalance()

    def _background(self, coro: Any) -> None:
        """Run a restart or a recycle on the loop; close() cancels what is still running."""
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._ticker is not None:
            self._ticker.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for handle in list(self._clients):
            handle._signal_stop()
        self._clients.clear()
        workers = list(self._live)  # slot holders, and replacements still starting
        for slot in self._slots:
            if slot.respawn is not None:
                slot.respawn.cancel()
            slot.state = SlotState.STOPPED
        for w in workers:
            w.exit_reason = "shutdown"
            w.channel.send(p.Shutdown())
        deadline = time.monotonic() + 5.0
        for w in workers:
            while w.process.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if w.process.poll() is None:
                w.process.kill()
                w.process.wait()
            if w.pidfd is not None:
                self._reap(w)
            w.channel.abort()
        logger.info("event=pool_stopped")

    # -- supervision -----------------------------------------------------------------

    def _kill(self, worker: _Worker, reason: str) -> None:
        if worker.process.poll() is None:
            worker.exit_reason = worker.exit_reason or reason
            logger.warning("event=worker_kill slot=%d pid=%d reason=%s", worker.slot.index, worker.pid, reason)
            worker.process.kill()

    def _on_disconnect(self, worker: _Worker, exc: BaseException | None) -> None:
        """The worker's socket closed: it can serve nothing more. Fail over at once.

        Its process is reaped (and its slot restarted) when the process exits, which a
        closed socket means is imminent; a worker that broke the protocol is killed.
        """
        if worker.gone:
            return
        worker.gone = True
        if isinstance(exc, p.ProtocolError):
            worker.exit_reason = worker.exit_reason or "protocol_error"
        if worker.process.poll() is None:
            worker.process.kill()
        if not worker.ready.done():
            worker.ready.set_exception(WorkerLost(f"worker {worker.slot.index} exited before it was ready"))
            worker.ready.exception()  # retrieved here, so an unawaited future logs nothing
        for future in worker.pending.values():
            if not future.done():
                future.set_exception(WorkerLost(f"worker {worker.slot.index} (pid {worker.pid}) died"))
        worker.pending.clear()
        if not self._closing:
            self._rebalance()

    def _on_exit(self, worker: _Worker, reason: str) -> None:
        """The process has exited and is reaped: restart its slot, or give the slot up."""
        self._on_disconnect(worker, None)
        slot = worker.slot
        if slot.worker is not worker:
            return
        slot.worker = None
        if self._closing or slot.state in (SlotState.STOPPED, SlotState.GIVEN_UP):
            return
        self._slot_down(slot, reason, worker.ready_at, worker.pid)

    def _slot_down(self, slot: _Slot, reason: str, ready_at: float | None, pid: int | None) -> None:
        slot.last_exit = reason
        # Reasons the front chose (hang, recycle_rss, ...) are counted by name; any
        # other end of a process (a signal, an exit code) is a crash.
        self.stats.restarts_by_reason[reason if reason in _FRONT_REASONS else "crash"] += 1
        logger.warning("event=worker_lost slot=%d pid=%s reason=%s", slot.index, pid, reason)
        now = time.monotonic()
        slot.died_at = slot.died_at or now
        if ready_at is not None and now - ready_at > self.options.restart_backoff_reset:
            slot.backoff = self.options.restart_backoff_initial  # it had been stable: start over
        slot.restart_times.append(now)
        while slot.restart_times and now - slot.restart_times[0] > self.options.restart_period:
            slot.restart_times.popleft()
        if len(slot.restart_times) > self.options.restart_intensity:
            slot.state = SlotState.GIVEN_UP
            self.stats.slots_given_up += 1
            logger.error(
                "event=slot_given_up slot=%d restarts=%d period=%.0fs last_exit=%s",
                slot.index,
                len(slot.restart_times),
                self.options.restart_period,
                reason,
            )
        else:
            slot.state = SlotState.RESTARTING
            delay = slot.backoff
            slot.backoff = min(slot.backoff * 2, self.options.restart_backoff_max)
            assert self._loop is not None
            slot.respawn = self._loop.call_later(delay, self._respawn, slot)
        self._rebalance()

    def _respawn(self, slot: _Slot) -> None:
        slot.respawn = None
        if self._closing or slot.state is not SlotState.RESTARTING:
            return
        slot.restarts += 1
        assert self._loop is not None
        self._background(self._restart(slot))

    async def _restart(self, slot: _Slot) -> None:
        try:
            await self._start_slot(slot)
        except Exception as exc:
            logger.warning("event=worker_start_failed slot=%d error=%s", slot.index, exc)
            worker = slot.worker
            if worker is None:  # it could not even be spawned
                self._slot_down(slot, "spawn_failed", None, None)
            elif not worker.gone:
                worker.exit_reason = "startup_failed"
                self._kill(worker, "startup_failed")
            # else: its exit is being reaped, which restarts the slot

    async def _tick(self) -> None:
        """Heartbeats, hang detection and recycling, once per ping interval."""
        interval = self.options.ping_interval
        rss_limit = self.options.recycle_rss_mb * 1024 * 1024
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for slot in self._slots:
                w = slot.worker
                if w is None or w.gone or slot.state is not SlotState.READY:
                    continue
                if now - w.last_pong > self.options.hang_timeout:
                    self._kill(w, "hang")
                    continue
                w.ping_seq += 1
                w.channel.send(p.Ping(seq=w.ping_seq))
                if rss_limit and w.psutil is not None:
                    try:
                        rss = w.psutil.memory_info().rss
                    except psutil.Error:
                        continue
                    if rss > rss_limit:
                        self._recycle(w, "recycle_rss")

    def _recycle(self, worker: _Worker, reason: str) -> None:
        """Replace a worker gracefully: the replacement is ready first, then work moves, then the old one stops."""
        slot = worker.slot
        if worker.exit_reason is not None or slot.replacing or self._closing:
            return
        slot.replacing = True
        assert self._loop is not None
        self._background(self._replace(worker, reason))

    async def _replace(self, old: _Worker, reason: str) -> None:
        slot = old.slot
        logger.info("event=worker_recycle slot=%d pid=%d reason=%s", slot.index, old.pid, reason)
        try:
            new = await self._spawn(slot, install=False)
            try:
                ready = await asyncio.wait_for(asyncio.shield(new.ready), self.options.ready_timeout)
            except (TimeoutError, WorkerLost, WorkerStartupError) as exc:
                logger.warning("event=worker_recycle_failed slot=%d error=%s", slot.index, exc)
                self._kill(new, "recycle_failed")
                return
            if old.gone or self._closing:
                self._kill(new, "recycle_cancelled")
                return
            old.exit_reason = reason
            self.stats.restarts_by_reason[reason] += 1
            slot.worker = new
            self._on_ready(new, ready)  # new calls and the subscriptions go to the new worker now
        finally:
            slot.replacing = False
        deadline = time.monotonic() + 30
        while old.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        old.channel.send(p.Shutdown())

    # -- routing -----------------------------------------------------------------------

    def _ranking(self, device: str) -> tuple[int, ...]:
        ranking = self._rankings.get(device)
        if ranking is None:
            scores = []
            for slot in self._slots:
                digest = hashlib.blake2b(f"{device}\x00{slot.index}".encode(), digest_size=8).digest()
                scores.append((digest, slot.index))
            ranking = tuple(i for _, i in sorted(scores, reverse=True))
            if len(self._rankings) > 100_000:
                self._rankings.clear()
            self._rankings[device] = ranking
        return ranking

    def _owner(self, device: str) -> _Slot | None:
        for index in self._ranking(device):
            slot = self._slots[index]
            worker = slot.worker
            # A worker whose socket closed is not reaped yet (its slot still says READY) but
            # serves nothing; one being recycled takes no new work.
            if slot.state is SlotState.READY and worker is not None and not worker.gone and worker.exit_reason is None:
                return slot
        return None

    @staticmethod
    def _device(drf: str) -> str:
        try:
            return parse_cached(drf).device
        except DRFError as exc:
            raise ValueError(str(exc)) from None

    async def _call(self, slot: _Slot, make: Any, timeout: float | None) -> Any:
        """Send the request `make(id)` to the slot's worker and wait for its reply.

        WorkerLost when the worker is gone or dies first; TimeoutError after `timeout`.
        """
        worker = slot.worker
        if worker is None or worker.gone:
            raise WorkerLost(f"worker {slot.index} is not running")
        request_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        worker.pending[request_id] = future
        worker.requests += 1
        worker.channel.send(make(request_id))
        if worker.recycle_after and worker.requests >= worker.recycle_after:
            self._recycle(worker, "recycle_requests")
        try:
            async with asyncio.timeout(timeout):
                return await future
        finally:
            worker.pending.pop(request_id, None)  # answered, timed out or cancelled: forget it

    def _group(self, drfs: list[str], positions: Iterable[int] | None = None) -> dict[int, list[int]]:
        """Positions of `drfs` (all, or the given ones) grouped by the slot that owns each device."""
        groups: dict[int, list[int]] = {}
        for pos in range(len(drfs)) if positions is None else positions:
            slot = self._owner(self._device(drfs[pos]))
            if slot is None:
                raise BackendUnavailable("no backend worker is ready")
            groups.setdefault(slot.index, []).append(pos)
        return groups

    # -- AsyncBackend: reads ---------------------------------------------------------------

    async def get_many(self, drfs: list[str], timeout: float | None = None) -> list[Reading]:
        results: list[Reading | None] = [None] * len(drfs)
        groups = self._group(drfs)
        auth = caller_authorization.get()
        await _all(
            self._read_group(self._slots[i], drfs, positions, results, timeout, auth) for i, positions in groups.items()
        )
        return results  # type: ignore[return-value]

    async def _read_group(
        self,
        slot: _Slot,
        drfs: list[str],
        positions: list[int],
        results: list[Reading | None],
        timeout: float | None,
        auth: str | None,
        retry: bool = True,
    ) -> None:
        subset = [drfs[i] for i in positions]
        try:
            reply = await self._call(
                slot, lambda rid: p.Read(id=rid, drfs=subset, timeout=timeout, authorization=auth), timeout
            )
        except WorkerLost:
            if not retry:
                raise BackendUnavailable("the backend worker died twice while reading") from None
            # Reads are idempotent: once more, on each device's next worker.
            self.stats.reads_retried += 1
            regroup = self._group(drfs, positions)
            await _all(
                self._read_group(self._slots[i], drfs, sub, results, timeout, auth, False) for i, sub in regroup.items()
            )
            return
        for pos, wire in zip(positions, reply.readings, strict=True):
            results[pos] = self._reading(drfs[pos], wire)

    def _reading(self, drf: str, wire: p.WireReading) -> Reading:
        reading = p.reading_from_wire(drf, wire)
        if wire.body is not None:
            self.reply_bodies.remember(reading, wire.body)
        return reading

    # -- AsyncBackend: writes ----------------------------------------------------------

    async def write_many(self, settings: list[tuple[str, Value]], timeout: float | None = None) -> list[WriteResult]:
        drfs = [d for d, _ in settings]
        groups = self._group(drfs)
        results: list[WriteResult | None] = [None] * len(settings)
        auth = caller_authorization.get()

        async def write_group(slot: _Slot, positions: list[int]) -> None:
            subset = [drfs[i] for i in positions]
            values = [settings[i][1] for i in positions]
            try:
                reply = await self._call(
                    slot,
                    lambda rid: p.Write(id=rid, drfs=subset, values=values, timeout=timeout, authorization=auth),
                    timeout,
                )
            except WorkerLost:
                # Never replayed: the setting may or may not have reached the device.
                self.stats.writes_outcome_unknown += len(positions)
                for pos in positions:
                    results[pos] = WriteResult(
                        drf=drfs[pos],
                        facility_code=DPM,
                        error_code=DPM_WRITE_OUTCOME_UNKNOWN,
                        message="backend worker lost while writing; outcome unknown, not retried",
                    )
                return
            for pos, r in zip(positions, reply.results, strict=True):
                results[pos] = WriteResult(
                    drf=drfs[pos], facility_code=r.facility, error_code=r.error, message=r.message
                )

        await _all(write_group(self._slots[i], pos) for i, pos in groups.items())
        return results  # type: ignore[return-value]

    # -- AsyncBackend: subscriptions -------------------------------------------------------

    async def subscribe(self, drfs: list[str], callback: Any = None, on_error: Any = None) -> AsyncSubscriptionHandle:
        if self.ready_count == 0:
            raise BackendUnavailable("no backend worker is ready")
        handle = AsyncSubscriptionHandle(remover=self._release, maxsize=self.options.stream_buffer)
        shares: list[_Shared] = []
        auth = caller_authorization.get()
        for drf in drfs:
            try:
                parsed = parse_cached(drf)
            except DRFError as exc:
                raise ValueError(str(exc)) from None
            key = parsed.canonical
            shared = self._shared.get(key)
            if shared is None:
                periodic = parsed.event is not None and parsed.event.kind in ("P", "Q", "U")
                shared = _Shared(key, parsed.device, periodic or parsed.event is None)
                shared.authorization = auth
                self._shared[key] = shared
                self._place(shared)
            if shared in shares:
                continue
            if shared.linger is not None:
                shared.linger.cancel()
                shared.linger = None
            shared.subscribers.add(handle)
            shares.append(shared)
            if shared.last is not None and shared.periodic:
                handle._dispatch(shared.last)  # a late joiner gets the latest reading at once
        self._clients[handle] = shares
        return handle

    async def _release(self, handle: AsyncSubscriptionHandle) -> None:
        assert self._loop is not None
        for shared in self._clients.pop(handle, []):
            shared.subscribers.discard(handle)
            if not shared.subscribers and shared.linger is None:
                shared.linger = self._loop.call_later(self.options.subscription_linger, self._close_shared, shared)

    def _close_shared(self, shared: _Shared) -> None:
        shared.linger = None
        if shared.subscribers or self._shared.get(shared.key) is not shared:
            return
        del self._shared[shared.key]
        self._unplace(shared)

    def _place(self, shared: _Shared) -> None:
        """Open the backend subscription on the device's worker (or leave it waiting for one)."""
        slot = self._owner(shared.device)
        worker = slot.worker if slot is not None else None
        shared.worker = worker
        if worker is None:
            return
        shared.sid = next(self._ids)
        self._by_sid[shared.sid] = shared
        worker.channel.send(p.Subscribe(sid=shared.sid, drf=shared.key, authorization=shared.authorization))

    def _unplace(self, shared: _Shared) -> None:
        worker, sid = shared.worker, shared.sid
        self._by_sid.pop(sid, None)
        shared.worker = None
        if worker is not None and not worker.gone:
            worker.channel.send(p.Unsubscribe(sid=sid))

    def _rebalance(self) -> None:
        """Put every subscription on the worker that now serves its device.

        After a death its subscriptions move to the device's next worker (a gap, counted);
        when the slot is back, or a recycled worker's replacement is ready, they move again.
        """
        now = time.monotonic()
        for shared in list(self._shared.values()):
            slot = self._owner(shared.device)
            target = slot.worker if slot is not None else None
            current = shared.worker
            if current is target and current is not None:
                continue
            if current is None or current.gone:
                self._mark_gap(shared, now)
            if target is None:
                if current is not None and current.gone:
                    self._by_sid.pop(shared.sid, None)
                    shared.worker = None
                continue
            self._unplace(shared)
            self._place(shared)

    def _mark_gap(self, shared: _Shared, now: float) -> None:
        if shared.gap_started is None:
            shared.gap_started = now
            self.stats.stream_gaps += 1

    # -- messages from workers -------------------------------------------------------------

    def _on_message(self, worker: _Worker, msg: object) -> None:
        if isinstance(msg, p.Data):
            self._on_data(worker, msg)
        elif isinstance(msg, p.ReadDone | p.WriteDone):
            future = worker.pending.pop(msg.id, None)
            if future is not None and not future.done():
                future.set_result(msg)
        elif isinstance(msg, p.Failed):
            future = worker.pending.pop(msg.id, None)
            if future is not None and not future.done():
                future.set_exception(_EXCEPTIONS.get(msg.kind, RuntimeError)(f"{msg.kind}: {msg.message}"))
        elif isinstance(msg, p.Pong):
            worker.last_pong = time.monotonic()
            worker.in_flight_remote = msg.in_flight
            worker.subscriptions_remote = msg.subscriptions
        elif isinstance(msg, p.SubscriptionEnded):
            self._on_subscription_error(worker, msg)
        elif isinstance(msg, p.Ready):
            if not worker.ready.done():
                worker.ready.set_result(msg)
        elif isinstance(msg, p.StartupFailed):
            if not worker.ready.done():
                worker.ready.set_exception(WorkerStartupError(f"backend {self.options.backend!r}: {msg.message}"))

    def _on_data(self, worker: _Worker, msg: p.Data) -> None:
        now: float | None = None
        for sid, wire in msg.items:
            shared = self._by_sid.get(sid)
            if shared is None or shared.worker is not worker:
                continue  # late data of a subscription that moved or closed
            reading = self._reading(shared.key, wire)
            shared.last = reading
            if shared.gap_started is not None:
                now = now or time.monotonic()
                gap = now - shared.gap_started
                shared.gap_started = None
                self.stats.last_gap_seconds = gap
                self.stats.max_gap_seconds = max(self.stats.max_gap_seconds, gap)
            for handle in shared.subscribers:
                handle._feed(reading)  # the pool and its handles share the front's loop

    def _on_subscription_error(self, worker: _Worker, msg: p.SubscriptionEnded) -> None:
        """The backend refused or ended one DRF: its clients get a status for that slot, nothing more."""
        shared = self._by_sid.pop(msg.sid, None)
        if shared is None or shared.worker is not worker:
            return
        shared.worker = None
        if self._shared.get(shared.key) is shared:
            del self._shared[shared.key]
        reading = Reading(
            drf=shared.key, facility_code=DPM, error_code=DPM_INTERNAL, message=f"{msg.kind}: {msg.message}"
        )
        for handle in shared.subscribers:
            handle._dispatch(reading)
        for handle in shared.subscribers:
            shares = self._clients.get(handle)
            if shares is not None and shared in shares:
                shares.remove(shared)

    # -- run-time scaling ---------------------------------------------------------------------

    async def add_worker(self) -> None:
        """Start one more worker, in a slot retired earlier if there is one (its ranking is kept)."""
        retired = [s for s in self._slots if s.state is SlotState.STOPPED]
        if retired:
            slot = retired[0]
            slot.restart_times.clear()
            slot.backoff = self.options.restart_backoff_initial
            slot.state = SlotState.STARTING
        else:
            slot = _Slot(len(self._slots), self.options)
            self._slots.append(slot)
            self._rankings.clear()
        self._count_workers()
        await self._start_slot(slot)

    def _count_workers(self) -> None:
        self.options.workers = sum(1 for s in self._slots if s.state is not SlotState.STOPPED)

    async def remove_worker(self) -> None:
        """Retire the last slot: its devices and subscriptions move first, then it stops."""
        live = [s for s in self._slots if s.state is not SlotState.STOPPED]
        if len(live) <= 1:
            logger.warning("event=remove_worker_refused reason=last_worker")
            return
        slot = live[-1]
        slot.state = SlotState.STOPPED
        self._count_workers()
        if slot.respawn is not None:
            slot.respawn.cancel()
        self._rebalance()
        worker = slot.worker
        if worker is not None:
            worker.exit_reason = "scale_down"
            deadline = time.monotonic() + 30
            while worker.pending and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            worker.channel.send(p.Shutdown())


async def _all(coros: Iterable[Any]) -> None:
    """Await the coroutines concurrently; a lone one is awaited directly (no task: the common case)."""
    pending = list(coros)
    if len(pending) == 1:
        await pending[0]
    else:
        await asyncio.gather(*pending)
