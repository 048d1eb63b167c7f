"""The life of one worker slot, as a state machine with no processes in it.

A slot is a place in the pool that always wants one worker process. Its state changes
only on events, and each event answers with what the pool should do next (an `Action`);
the pool carries it out (spawns, kills, schedules a timer) and reports back. Every event
names the worker *generation* it is about, so a late event of a worker that has already
been replaced (an exit reaped after its restart failed, a pong of a retired process) is
ignored instead of counted twice. The clock is injected, so every transition can be
tested in microseconds.

States::

    starting ──ready──> ready ──over limit──> recycling ──replacement ready──> ready
       ^                  │                      │
       │                exited                 exited (the serving worker)
       │                  v                      v
       ├──timer── restarting <──────────── (crash loop?) ──> cooling ──timer──┐
       └──────────────────────────────────────────────────────────────────────┘
    any ──retire──> retired ──revive──> starting

The rules (docs/design.md, "Supervision"):

- A worker that served `restart_stable_uptime` seconds or more before it ended had a crash, not
  a crash loop: the slot starts again after `restart_backoff_initial`, whatever happened to it
  before, and the exit does not count towards the restart intensity.
- A worker that ended before it was ready, or sooner than `restart_stable_uptime` after it, is a
  crash-loop suspect: the backoff doubles (up to `restart_backoff_max`) and the exit counts.
- More than `restart_intensity` counted exits within `restart_period` seconds cools the slot down: it
  waits `restart_cooldown_initial` seconds, doubling on each repeated exhaustion up to
  `restart_cooldown_max` (Kubernetes' CrashLoopBackOff), then tries again. A worker that then
  serves `restart_stable_uptime` returns the slot to normal (backoff and cool-down start over).
- A slot cools down only while another slot serves: the last slot standing keeps
  restarting at `restart_backoff_max`, so a pool never stops trying to run a worker.
"""

from __future__ import annotations

import collections
import enum
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


class SlotState(enum.Enum):
    STARTING = "starting"  # a worker process is starting; not serving yet
    READY = "ready"  # its worker serves
    RECYCLING = "recycling"  # its worker serves while a replacement starts
    RESTARTING = "restarting"  # waiting out the backoff before the next start
    COOLING = "cooling"  # too many early exits: waiting out a cool-down
    RETIRED = "retired"  # scaled down, or the pool is closed


SERVING = frozenset({SlotState.READY, SlotState.RECYCLING})


class SupervisionPolicy(Protocol):
    """The numbers the rules above are written in: the settings of these names (a `Settings` is one)."""

    @property
    def restart_backoff_initial(self) -> float: ...
    @property
    def restart_backoff_max(self) -> float: ...
    @property
    def restart_stable_uptime(self) -> float: ...
    @property
    def restart_intensity(self) -> int: ...
    @property
    def restart_period(self) -> float: ...
    @property
    def restart_cooldown_initial(self) -> float: ...
    @property
    def restart_cooldown_max(self) -> float: ...


# -- actions: what the pool must do after an event ---------------------------------------------


@dataclass(frozen=True)
class Spawn:
    """Start a worker of this generation in the slot."""

    generation: int


@dataclass(frozen=True)
class Wait:
    """Call `timer_fired(token)` after `delay` seconds (the slot is restarting or cooling)."""

    delay: float
    token: int


@dataclass(frozen=True)
class Kill:
    """Kill the worker of this generation (its exit comes later as an event)."""

    generation: int
    reason: EndReason


@dataclass(frozen=True)
class SpawnReplacement:
    """Start a replacement of this generation beside the serving worker (make-before-break)."""

    generation: int
    reason: EndReason


@dataclass(frozen=True)
class Retire:
    """The worker of this generation no longer serves: let it finish its calls, then stop it."""

    generation: int


Action = Spawn | Wait | Kill | SpawnReplacement | Retire


class EndReason(enum.StrEnum):
    """Why a worker ended, or is replaced: the one vocabulary of logs, metrics and the status view.

    Its values are the words those show (a StrEnum: it is its value wherever a string is).
    The detail (which signal, which exit code) goes beside it, never into a metric's label.
    """

    # Exits of a slot's worker: counted (pacsys_worker_exits_total), and they restart the slot.
    SIGNAL = "signal"  # killed by a signal the front did not send (the OOM killer, an operator)
    EXIT = "exit"  # the process exited by itself (the detail holds the code)
    HANG = "hang"  # its loop stopped answering pings: the front killed it
    PROTOCOL_ERROR = "protocol_error"  # it sent a frame that does not decode: the front killed it
    STARTUP_FAILED = "startup_failed"  # its backend could not be built
    SPAWN_FAILED = "spawn_failed"  # the process could not be started at all
    READY_TIMEOUT = "ready_timeout"  # it did not become ready in time: the front killed it
    # Why a serving worker is replaced gracefully: recycles (pacsys_worker_recycles_total).
    RECYCLE_RSS = "recycle_rss"
    RECYCLE_REQUESTS = "recycle_requests"
    # The front stopped a worker that no longer served: not an exit of its slot.
    RECYCLED = "recycled"  # replaced by its recycle: drained, then stopped
    SCALE_DOWN = "scale_down"  # its slot was retired
    SHUTDOWN = "shutdown"  # the pool closed
    RECYCLE_FAILED = "recycle_failed"  # a replacement that did not become ready in time
    RECYCLE_CANCELLED = "recycle_cancelled"  # a replacement whose serving worker died meanwhile

    @property
    def is_exit(self) -> bool:
        """An exit of a slot's worker (a label value of pacsys_worker_exits_total)."""
        return not self.is_recycle and not self.stopped_by_front

    @property
    def is_recycle(self) -> bool:
        """A graceful replacement (a label value of pacsys_worker_recycles_total)."""
        return self in (EndReason.RECYCLE_RSS, EndReason.RECYCLE_REQUESTS)

    @property
    def stopped_by_front(self) -> bool:
        """The front ended a worker that no longer served: its slot is not told of the exit."""
        return self in (
            EndReason.RECYCLED,
            EndReason.SCALE_DOWN,
            EndReason.SHUTDOWN,
            EndReason.RECYCLE_FAILED,
            EndReason.RECYCLE_CANCELLED,
        )


@dataclass(frozen=True)
class Exit:
    """How a worker ended: its reason and a detail (the signal's name, the exit code)."""

    reason: EndReason
    detail: str = ""


class Slot:
    """One slot's state and history. Events in, actions out; nothing here runs a process."""

    def __init__(
        self,
        index: int,
        policy: SupervisionPolicy,
        clock: Callable[[], float] = time.monotonic,
        others_serving: Callable[[Slot], bool] = lambda slot: False,
    ):
        self.index = index
        self.policy = policy
        self.clock = clock
        self._others_serving = others_serving
        self.state = SlotState.STARTING
        self._generations = 0  # generations only grow, so an old worker's number is never reused
        self.generation = 0  # the worker that serves or is starting
        self.replacement: int | None = None  # the worker starting beside it while recycling
        self.backoff = policy.restart_backoff_initial
        self.cooldown = policy.restart_cooldown_initial
        self.early_exits: collections.deque[float] = collections.deque()  # times, within `period`
        self.ready_at: float | None = None
        self.down_since: float | None = None  # when the slot last stopped serving
        self.wake_at: float | None = None  # when a restarting or cooling slot starts again
        self.timer_token = 0
        self.restarts = 0  # workers started after the first
        self.cooldowns = 0
        self.last_exit: Exit | None = None
        self.last_restart_to_ready: float | None = None

    # -- queries ---------------------------------------------------------------------------

    @property
    def serving(self) -> bool:
        return self.state in SERVING

    def restart_budget_left(self) -> int:
        self._forget_old_exits(self.clock())
        return max(0, self.policy.restart_intensity - len(self.early_exits))

    # -- events ----------------------------------------------------------------------------

    def start(self) -> list[Action]:
        """The pool starts the slot's first worker."""
        self.state = SlotState.STARTING
        self.generation = self._new_generation()
        return [Spawn(self.generation)]

    def ready(self, generation: int) -> list[Action]:
        """A worker finished starting and serves from now on."""
        now = self.clock()
        if generation == self.replacement and self.state is SlotState.RECYCLING:
            old, self.generation, self.replacement = self.generation, generation, None
            self.state = SlotState.READY
            self.ready_at = now
            return [Retire(old)]
        if generation != self.generation or self.state is not SlotState.STARTING:
            return []
        self.state = SlotState.READY
        self.ready_at = now
        if self.down_since is not None:
            self.last_restart_to_ready = now - self.down_since
            self.down_since = None
        return []

    def exited(self, generation: int, how: Exit) -> list[Action]:
        """A worker of the slot ended (reaped, or could not be spawned)."""
        if generation == self.replacement:
            self.replacement = None  # the replacement died first: the old worker keeps serving
            if self.state is SlotState.RECYCLING:
                self.state = SlotState.READY
            return []
        if generation != self.generation or self.state not in (SlotState.STARTING, *SERVING):
            return []  # a worker already replaced or retired, or an exit reported twice
        now = self.clock()
        self.last_exit = how
        self.down_since = self.down_since or now
        replacement = self.replacement
        self.replacement = None
        served = now - self.ready_at if self.state in SERVING and self.ready_at is not None else None
        self.ready_at = None
        if served is not None and served >= self.policy.restart_stable_uptime:
            # It had been serving: a crash, not a crash loop. Back at once, history forgiven.
            self.backoff = self.policy.restart_backoff_initial
            self.cooldown = self.policy.restart_cooldown_initial
            self.early_exits.clear()
            action = self._wait(SlotState.RESTARTING, self.policy.restart_backoff_initial, now)
        else:
            self.early_exits.append(now)
            self._forget_old_exits(now)
            if len(self.early_exits) > self.policy.restart_intensity and self._others_serving(self):
                self.cooldowns += 1
                self.early_exits.clear()
                delay = self.cooldown
                self.cooldown = min(self.cooldown * 2, self.policy.restart_cooldown_max)
                action = self._wait(SlotState.COOLING, delay, now)
            else:
                delay = self.backoff
                self.backoff = min(self.backoff * 2, self.policy.restart_backoff_max)
                action = self._wait(SlotState.RESTARTING, delay, now)
        if replacement is not None:
            # The serving worker died while its replacement was starting: that replacement
            # was made for a worker that is gone; the slot starts over on its own rules.
            return [Kill(replacement, EndReason.RECYCLE_CANCELLED), action]
        return [action]

    def timer_fired(self, token: int) -> list[Action]:
        """The backoff or the cool-down is over: start the next worker."""
        if token != self.timer_token or self.state not in (SlotState.RESTARTING, SlotState.COOLING):
            return []
        self.wake_at = None
        self.restarts += 1
        return self.start()

    def pong_missed(self, generation: int) -> list[Action]:
        """The serving worker's loop did not answer within the hang timeout."""
        if generation != self.generation or not self.serving:
            return []
        return [Kill(generation, EndReason.HANG)]

    def over_limit(self, generation: int, reason: EndReason) -> list[Action]:
        """The serving worker passed a recycle limit (memory, requests): replace it gracefully."""
        if generation != self.generation or self.state is not SlotState.READY:
            return []
        self.state = SlotState.RECYCLING
        self.replacement = self._new_generation()
        return [SpawnReplacement(self.replacement, reason)]

    def replacement_failed(self, generation: int) -> list[Action]:
        """The replacement did not become ready: the old worker keeps serving."""
        if generation != self.replacement:
            return []
        self.replacement = None
        if self.state is SlotState.RECYCLING:
            self.state = SlotState.READY
        return [Kill(generation, EndReason.RECYCLE_FAILED)]

    def retire(self) -> None:
        """The slot is scaled down or the pool closes: nothing more is started in it."""
        self.state = SlotState.RETIRED
        self.timer_token += 1  # a pending timer no longer counts
        self.wake_at = None
        self.replacement = None

    def revive(self) -> list[Action]:
        """A retired slot is used again (scaling up): it starts with a clean history."""
        self.backoff = self.policy.restart_backoff_initial
        self.cooldown = self.policy.restart_cooldown_initial
        self.early_exits.clear()
        self.down_since = None
        self.last_exit = None
        return self.start()

    # -- internals -------------------------------------------------------------------------

    def _new_generation(self) -> int:
        self._generations += 1
        return self._generations

    def _wait(self, state: SlotState, delay: float, now: float) -> Wait:
        self.state = state
        self.timer_token += 1
        self.wake_at = now + delay
        return Wait(delay, self.timer_token)

    def _forget_old_exits(self, now: float) -> None:
        while self.early_exits and now - self.early_exits[0] > self.policy.restart_period:
            self.early_exits.popleft()
