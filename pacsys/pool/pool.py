"""WorkerPool: backend worker processes behind the AsyncBackend interface.

The servicer calls the pool like any AsyncBackend; everything about processes stays
invisible to it. The pool is a composition of five ideas, each in its own module:

- `pacsys.pool.process`: one worker process (spawn, socket, exit watch, kill);
- `pacsys.pool.supervision`: the life of a slot as a state machine (restart, backoff,
  cool-down, recycling), which decides what happens after each event;
- `pacsys.pool.routing`: which worker serves a device (rendezvous hashing);
- `pacsys.pool.fanout`: one backend subscription per distinct DRF, shared by client streams;
- `pacsys.pool.calls`: one-shot reads and writes, with their wait and retry rules.

What stays here: carrying out the state machine's actions on real processes (spawning,
reaping, killing, timers, pings, recycling), the messages from the workers, scaling, and
the state that health, metrics and the status view read.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import Sequence
from typing import Any

import psutil

from pacsys.aio import AsyncBackend, AsyncSubscriptionHandle, caller_authorization
from pacsys.backends.spec import is_builtin
from pacsys.pool.calls import OneShotCalls
from pacsys.pool.fanout import Fanout
from pacsys.pool.process import WorkerCommand, WorkerLost, WorkerProcess, WorkerStartupError
from pacsys.pool.routing import Router
from pacsys.pool.stats import PoolStats, WorkerRow
from pacsys.pool.supervision import (
    Action,
    EndReason,
    Exit,
    Kill,
    Retire,
    Slot,
    SlotState,
    Spawn,
    SpawnReplacement,
    Wait,
)
from pacsys.settings import Settings
from pacsys.types import BackendCapability, Reading, Value, WriteResult
from workers import protocol as p

__all__ = ["PoolStats", "WorkerLost", "WorkerPool", "WorkerStartupError"]

logger = logging.getLogger("pacsys.workers")

_DRAIN_SECONDS = 30.0  # how long a retired worker may take to finish its calls in flight
_SHUTDOWN_SECONDS = 5.0  # how long the workers of a closing pool may take to exit before they are killed


class WorkerPool(AsyncBackend):
    def __init__(self, settings: Settings | None = None, **overrides: Any):
        """A pool run with `settings` (`pacsys.settings.Settings`, the one owner of
        every default), each keyword argument replacing the setting of its name:
        `WorkerPool(backend="sim", workers=4, stream_buffer=200)`. They are checked as the
        service's are (an unknown name is a TypeError, a bad value a ConfigError)."""
        settings = Settings(**overrides) if settings is None else settings.replace(**overrides)
        if settings.workers < 1:
            raise ValueError("a WorkerPool needs at least one worker")
        self.settings = settings
        self.workers = settings.workers  # live slots: SIGTTIN and SIGTTOU change it, not the setting
        self.stats = PoolStats()
        # Workers read only module:factory specs: a built-in form is rewritten here.
        self._command = WorkerCommand.from_settings(settings)
        self._slots: list[Slot] = []
        self._workers: dict[tuple[int, int], WorkerProcess] = {}  # (slot, generation): every unreaped process
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._ids = itertools.count(1)
        self._router: Router[WorkerProcess] = Router(self._serving_worker)
        self._fanout = Fanout(
            self._router.owner,
            self._ids,
            settings.stream_buffer,
            settings.subscription_linger,
            self.stats,
        )
        self._any_serving = asyncio.Event()
        self._calls = OneShotCalls(
            self._router,
            self._any_serving,
            self._ids,
            self.stats,
            settings.worker_wait,
            self._over_request_limit,
        )
        self._unready_since: float | None = None
        self._capabilities = BackendCapability(0)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ticker: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._closing = False
        self._started = False

    # -- public state ----------------------------------------------------------------

    @property
    def capabilities(self) -> BackendCapability:
        return self._capabilities

    @property
    def ready_count(self) -> int:
        return sum(1 for slot in self._slots if self._serving_worker(slot.index) is not None)

    @property
    def is_ready(self) -> bool:
        """Enough workers are ready to serve (health readiness)."""
        return self.ready_count >= self.settings.min_workers_ready

    def unready_seconds(self) -> float:
        """How long the pool has not been ready (fewer than `min_workers_ready` serving; 0 while ready)."""
        return 0.0 if self._unready_since is None else time.monotonic() - self._unready_since

    @property
    def is_alive(self) -> bool:
        """The pool can still recover by itself: it was ready within the last `unready_limit` seconds.

        The pool never stops trying (the last slot standing never cools down), so past that
        limit a restart of the whole service is the only remedy left: health liveness, the
        systemd watchdog and, with `unready_exit`, the service itself act on this. So the
        service never sits NOT_SERVING for good while its liveness says SERVING.
        """
        return self.unready_seconds() <= self.settings.unready_limit

    @property
    def subscription_count(self) -> int:
        """Backend subscriptions held in the workers (one per distinct DRF in use)."""
        return self._fanout.subscription_count

    @property
    def client_subscription_count(self) -> int:
        return self._fanout.client_count

    def worker_states(self) -> list[WorkerRow]:
        """One row per slot, for health, metrics and the status view."""
        now = time.monotonic()
        subscriptions, devices = self._fanout.by_slot()
        rows = []
        for slot in self._slots:
            w = self._workers.get((slot.index, slot.generation))
            row = WorkerRow(
                slot=slot.index,
                state=slot.state,
                pid=w.pid if w else None,
                restarts=slot.restarts,
                last_exit=slot.last_exit.reason if slot.last_exit else None,
                last_exit_detail=slot.last_exit.detail if slot.last_exit else None,
                subscriptions=subscriptions.get(slot.index, 0),
                devices=len(devices.get(slot.index, ())),
                in_flight=w.in_flight if w else 0,
                backend_in_flight=w.in_flight_remote if w else 0,
                backend_subscriptions=w.subscriptions_remote if w else 0,
                requests=w.requests if w else 0,
                heartbeat_age=(now - w.last_pong) if w and w.ready_at else None,
                uptime=(now - w.ready_at) if w and w.ready_at else None,
                restart_budget_left=slot.restart_budget_left(),
                next_backoff=slot.backoff,
                next_start_in=max(0.0, slot.wake_at - now) if slot.wake_at is not None else None,
                cooldowns=slot.cooldowns,
            )
            if w is not None and w.psutil is not None:
                try:
                    with w.psutil.oneshot():
                        row.rss_bytes = w.psutil.memory_info().rss
                        cpu = w.psutil.cpu_times()
                        row.cpu_seconds = cpu.user + cpu.system
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
        self._slots = [self._new_slot(i) for i in range(self.workers)]
        self._router.resize(len(self._slots))
        starts = [self._start_worker(slot, _spawned(slot.start()), first=True) for slot in self._slots]
        results = await asyncio.gather(*starts, return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        startup = [r for r in failures if isinstance(r, WorkerStartupError)]
        if startup or self.ready_count < self.settings.min_workers_ready:
            await self.close()
            if startup:
                raise startup[0]
            raise WorkerStartupError(
                f"only {self.ready_count} of {self.workers} workers became ready "
                f"within {self.settings.ready_timeout} s: {failures[0] if failures else 'unknown'}"
            )
        self._ticker = self._loop.create_task(self._tick())
        logger.info("event=pool_ready workers=%d backend=%s", self.ready_count, self.settings.backend)

    def _new_slot(self, index: int) -> Slot:
        return Slot(index, self.settings, others_serving=self._others_serving)

    def _others_serving(self, slot: Slot) -> bool:
        return any(self._serving_worker(s.index) is not None for s in self._slots if s is not slot)

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._ticker is not None:
            self._ticker.cancel()
        for timer in self._timers.values():
            timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._fanout.stop_all()
        for slot in self._slots:
            slot.retire()
        workers = list(self._workers.values())  # serving ones, and any still starting or draining
        for w in workers:
            w.retire(EndReason.SHUTDOWN)
            w.send(p.Shutdown())
        if workers:
            await asyncio.wait([w.exited for w in workers], timeout=_SHUTDOWN_SECONDS)
        for w in workers:
            w.reap_now()  # killed if it did not exit in time
        logger.info("event=pool_stopped")

    def _background(self, coro: Any) -> None:
        """Run a start or a drain on the loop; close() cancels what is still running."""
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- supervision: the state machine's actions, carried out -----------------------------

    def _serving_worker(self, index: int) -> WorkerProcess | None:
        """The worker that serves slot `index` now (None while it starts, restarts or cools)."""
        slot = self._slots[index]
        if not slot.serving:
            return None
        worker = self._workers.get((index, slot.generation))
        # A worker whose socket closed is not reaped yet (its slot still serves) but serves
        # nothing; one being retired takes no new work.
        if worker is None or not worker.serving:
            return None
        return worker

    def _apply(self, slot: Slot, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Spawn):
                self._background(self._start_worker(slot, action.generation))
            elif isinstance(action, SpawnReplacement):
                logger.info("event=worker_recycle slot=%d reason=%s", slot.index, action.reason)
                self.stats.recycles_by_reason[action.reason] += 1
                self._background(self._start_worker(slot, action.generation))
            elif isinstance(action, Wait):
                assert self._loop is not None
                old = self._timers.pop(slot.index, None)
                if old is not None:
                    old.cancel()
                self._timers[slot.index] = self._loop.call_later(action.delay, self._timer_fired, slot, action.token)
            elif isinstance(action, Kill):
                worker = self._workers.get((slot.index, action.generation))
                if worker is not None:
                    worker.kill(action.reason)
            elif isinstance(action, Retire):
                worker = self._workers.get((slot.index, action.generation))
                if worker is not None:
                    worker.retire(EndReason.RECYCLED)
                    self._background(worker.finish(_DRAIN_SECONDS))
        self._serving_changed()

    def _serving_changed(self) -> None:
        """Move subscriptions to the workers that serve now, and wake calls waiting for one."""
        if self._closing:
            return
        self._fanout.rebalance()
        serving = self.ready_count
        if serving:
            self._any_serving.set()
        else:
            self._any_serving.clear()
        if serving >= self.settings.min_workers_ready:
            self._unready_since = None
        else:
            self._unready_since = self._unready_since or time.monotonic()

    def _timer_fired(self, slot: Slot, token: int) -> None:
        self._timers.pop(slot.index, None)
        if not self._closing:
            self._apply(slot, slot.timer_fired(token))

    async def _start_worker(self, slot: Slot, generation: int, first: bool = False) -> None:
        """Start generation `generation` of the slot and report how it went to the slot.

        The first start of a pool raises WorkerStartupError instead, so a backend that
        cannot be built fails the service's start rather than looping.
        """
        try:
            worker = await WorkerProcess.spawn(
                slot.index, generation, self._command, self._on_message, self._on_disconnect, self._on_exit
            )
        except OSError as exc:
            logger.error("event=worker_spawn_failed slot=%d error=%s", slot.index, exc)
            if first:
                raise WorkerStartupError(f"worker {slot.index} could not be started: {exc}") from None
            self._exited(slot, generation, Exit(EndReason.SPAWN_FAILED, str(exc)), None)
            return
        self._workers[(slot.index, generation)] = worker
        try:
            ready = await asyncio.wait_for(asyncio.shield(worker.ready), self.settings.ready_timeout)
        except TimeoutError:
            worker.kill(EndReason.READY_TIMEOUT)  # its exit, reaped, reaches the slot
            self._apply(slot, slot.replacement_failed(generation))
            if first:
                raise WorkerStartupError(
                    f"worker {slot.index} was not ready within {self.settings.ready_timeout} s"
                ) from None
            return
        except WorkerStartupError as exc:
            worker.retire(EndReason.STARTUP_FAILED)
            worker.kill(EndReason.STARTUP_FAILED)
            if first:
                raise
            logger.warning("event=worker_start_failed slot=%d error=%s", slot.index, exc)
            return
        except WorkerLost as exc:  # it died first; its exit, reaped, reaches the slot
            if first:
                raise WorkerStartupError(str(exc)) from None
            return
        worker.ready_at = worker.last_pong = time.monotonic()
        self._capabilities = BackendCapability(ready.capabilities)
        if self.settings.recycle_requests:
            worker.recycle_after = int(
                self.settings.recycle_requests * (1 + random.uniform(0, self.settings.recycle_jitter))
            )
        actions = slot.ready(generation)
        if slot.last_restart_to_ready is not None:
            self.stats.last_restart_to_ready_seconds = slot.last_restart_to_ready
        logger.info("event=worker_ready slot=%d pid=%d backend=%s", slot.index, worker.pid, ready.backend)
        self._apply(slot, actions)
        if self._serving_worker(slot.index) is not worker:  # the slot was retired meanwhile
            worker.retire(EndReason.SCALE_DOWN)
            self._background(worker.finish(_DRAIN_SECONDS))

    def _on_disconnect(self, worker: WorkerProcess) -> None:
        """A worker's socket closed (its calls in flight have failed): move its work at once.

        Its process is reaped (and its slot told) when it exits, which a closed socket means
        is imminent.
        """
        self._serving_changed()

    def _on_exit(self, worker: WorkerProcess, how: Exit) -> None:
        """The process has exited and is reaped: tell its slot (unless the front retired it)."""
        self._workers.pop((worker.slot, worker.generation), None)
        if self._closing:
            return
        if how.reason.stopped_by_front:
            logger.info(
                "event=worker_stopped slot=%d pid=%d reason=%s detail=%s",
                worker.slot,
                worker.pid,
                how.reason,
                how.detail,
            )
            return
        self._exited(self._slots[worker.slot], worker.generation, how, worker.pid)

    def _exited(self, slot: Slot, generation: int, how: Exit, pid: int | None) -> None:
        was_current = generation == slot.generation and slot.state in (
            SlotState.STARTING,
            SlotState.READY,
            SlotState.RECYCLING,
        )
        actions = slot.exited(generation, how)
        if was_current:
            self.stats.exits_by_reason[how.reason] += 1
            wait = next((a for a in actions if isinstance(a, Wait)), None)
            delay = wait.delay if wait is not None else 0.0
            if slot.state is SlotState.COOLING:
                self.stats.cooldowns += 1
                logger.error(
                    "event=slot_cooling slot=%d pid=%s reason=%s detail=%s early_exits=%d period=%.0fs cooldown=%.0fs",
                    slot.index,
                    pid,
                    how.reason,
                    how.detail,
                    self.settings.restart_intensity + 1,
                    self.settings.restart_period,
                    delay,
                )
            else:
                logger.warning(
                    "event=worker_lost slot=%d pid=%s reason=%s detail=%s restart_in=%.2fs",
                    slot.index,
                    pid,
                    how.reason,
                    how.detail,
                    delay,
                )
        self._apply(slot, actions)

    async def _tick(self) -> None:
        """Heartbeats, hang detection and recycling by memory, once per ping interval."""
        interval = self.settings.ping_interval
        rss_limit = self.settings.recycle_rss_mb * 1024 * 1024
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for slot in self._slots:
                w = self._serving_worker(slot.index)
                if w is None:
                    continue
                if now - w.last_pong > self.settings.hang_timeout:
                    self._apply(slot, slot.pong_missed(w.generation))
                    continue
                w.ping()
                if rss_limit and w.psutil is not None:
                    try:
                        rss = w.psutil.memory_info().rss
                    except psutil.Error:
                        continue
                    if rss > rss_limit:
                        self._apply(slot, slot.over_limit(w.generation, EndReason.RECYCLE_RSS))

    # -- messages from workers -------------------------------------------------------------

    def _on_message(self, worker: WorkerProcess, msg: object) -> None:
        """The frames a worker sends that concern the pool (its replies and pongs are its own)."""
        if isinstance(msg, p.Data):
            self._fanout.on_data(worker, msg)
        elif isinstance(msg, p.SubscriptionEnded):
            self._fanout.on_ended(worker, msg)
        elif isinstance(msg, p.StartupFailed):
            worker.start_failed(WorkerStartupError(self._startup_failure(msg.message)))

    def _startup_failure(self, message: str) -> str:
        """Why a worker could not build its backend, as the front explains it."""
        spec, python = self.settings.backend, self.settings.worker_python
        if python is not None and is_builtin(spec):
            # Another interpreter, whose `pacsys` is not ours (the release's, say).
            return (
                f"backend {spec!r} is one of this project's own backends (built by {self._command.backend.partition('?')[0]}), "
                f"which the workers' interpreter worker_python {python} could not build: {message}; "
                "under another interpreter use the module:factory form"
            )
        return f"backend {spec!r}: {message}"

    # -- one-shot calls (calls.py) --------------------------------------------------------------

    async def get_many(self, drfs: list[str], timeout: float | None = None) -> list[Reading]:
        return await self._calls.get_many(drfs, timeout)

    async def read_bodies(
        self, drfs: list[str], timeout: float | None = None, devices: Sequence[str] | None = None
    ) -> list[bytes]:
        """The servicer's one-shot read: the bodies the workers encoded, passed through."""
        return await self._calls.read_bodies(drfs, timeout, devices)

    async def write_many(self, settings: list[tuple[str, Value]], timeout: float | None = None) -> list[WriteResult]:
        return await self._calls.write_many(settings, timeout)

    def _over_request_limit(self, worker: WorkerProcess) -> None:
        """The worker has served `recycle_requests` calls: replace it gracefully."""
        slot = self._slots[worker.slot]
        self._apply(slot, slot.over_limit(worker.generation, EndReason.RECYCLE_REQUESTS))

    # -- subscriptions ---------------------------------------------------------------------

    async def subscribe(self, drfs: list[str], callback: Any = None, on_error: Any = None) -> AsyncSubscriptionHandle:
        if self.ready_count == 0:
            await self._calls.wait_for_a_worker()  # the stream then moves with its devices
        return self._fanout.subscribe(drfs, caller_authorization.get())

    async def subscribe_bodies(self, drfs: list[str]) -> AsyncSubscriptionHandle:
        """The servicer's stream: each reading as (DRF, the body its worker encoded), no Reading built."""
        if self.ready_count == 0:
            await self._calls.wait_for_a_worker()
        return self._fanout.subscribe(drfs, caller_authorization.get(), bodies=True)

    # -- run-time scaling ------------------------------------------------------------------

    async def add_worker(self) -> None:
        """Start one more worker, in a slot retired earlier if there is one (its ranking is kept)."""
        retired = [s for s in self._slots if s.state is SlotState.RETIRED]
        if retired:
            slot = retired[0]
            generation = _spawned(slot.revive())
        else:
            slot = self._new_slot(len(self._slots))
            self._slots.append(slot)
            self._router.resize(len(self._slots))
            generation = _spawned(slot.start())
        self._count_workers()
        await self._start_worker(slot, generation)

    def _count_workers(self) -> None:
        self.workers = sum(1 for s in self._slots if s.state is not SlotState.RETIRED)

    async def remove_worker(self) -> None:
        """Retire the last slot: its devices and subscriptions move first, then it stops."""
        live = [s for s in self._slots if s.state is not SlotState.RETIRED]
        if len(live) <= 1:
            logger.warning("event=remove_worker_refused reason=last_worker")
            return
        slot = live[-1]
        slot.retire()
        timer = self._timers.pop(slot.index, None)
        if timer is not None:
            timer.cancel()
        self._count_workers()
        leaving = [w for (index, _), w in self._workers.items() if index == slot.index]
        for worker in leaving:
            worker.retire(EndReason.SCALE_DOWN)
        self._serving_changed()  # its subscriptions move to the other workers first
        await asyncio.gather(*(w.finish(_DRAIN_SECONDS) for w in leaving))


def _spawned(actions: list[Action]) -> int:
    """The generation a start event asked to spawn."""
    (spawn,) = actions
    assert isinstance(spawn, Spawn)
    return spawn.generation
