"""What the worker pool reports: its counters (`PoolStats`: exits, recycles, cool-downs,
waits) and one row per slot (`WorkerRow`), read by health, the metrics and the status view.
Its own module so that those readers, and the `ManagedBackend` protocol, name the types
without importing the pool.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import msgspec

from pacsys.pool.supervision import EndReason, SlotState

__all__ = ["GapStats", "PoolStats", "WorkerRow"]


@dataclass
class GapStats:
    """Stream gaps: the fan-out counts them (a subscription moved after its worker stopped serving)."""

    stream_gaps: int = 0  # subscriptions interrupted because their worker stopped serving
    last_gap_seconds: float | None = None
    max_gap_seconds: float = 0.0


@dataclass
class PoolStats(GapStats):
    exits_by_reason: collections.Counter = field(default_factory=collections.Counter)
    recycles_by_reason: collections.Counter = field(default_factory=collections.Counter)
    cooldowns: int = 0  # slots cooled down after too many early exits
    reads_retried: int = 0
    writes_outcome_unknown: int = 0
    calls_waited: int = 0  # one-shot calls and subscriptions that found no worker serving
    calls_unavailable: int = 0  # ... and still none after worker_wait: UNAVAILABLE
    last_restart_to_ready_seconds: float | None = None


class WorkerRow(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One slot and its worker now. The status view sends it as JSON (msgspec), under these keys;
    `rss_bytes` and `cpu_seconds` are left out when the process cannot be read."""

    slot: int
    state: SlotState
    pid: int | None
    restarts: int
    last_exit: EndReason | None
    last_exit_detail: str | None
    subscriptions: int  # backend subscriptions it holds for the pool
    devices: int  # distinct devices it streams now
    in_flight: int  # requests sent to it and not answered yet
    # As the worker last reported: calls inside its backend (a saturated thread pool shows
    # here) and the backend subscriptions it holds.
    backend_in_flight: int
    backend_subscriptions: int
    requests: int
    heartbeat_age: float | None
    uptime: float | None
    # The restart rules at work: counted early exits left before a cool-down, the delay of
    # the next restart, and when a waiting slot starts again.
    restart_budget_left: int
    next_backoff: float
    next_start_in: float | None
    cooldowns: int
    rss_bytes: int | None = None
    cpu_seconds: float | None = None
