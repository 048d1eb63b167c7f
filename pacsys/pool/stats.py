"""PoolStats: the worker pool's counters (exits, recycles, cool-downs, waits), read by the
metrics and the status view. Its own module so that those readers, and the `ManagedBackend`
protocol, name the type without importing the pool.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

__all__ = ["GapStats", "PoolStats"]


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
