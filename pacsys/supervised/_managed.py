"""What the server, its health, status view and metrics read from a backend beyond AsyncBackend.

A backend that runs and supervises processes of its own (the worker pool,
`pacsys.pool.WorkerPool`) implements `ManagedBackend`: the server starts it before it
serves, reports its readiness and liveness through health, and shows its workers in the
status view and the metrics. Any other backend is always ready and alive. These are
structural types: a backend implements one by having its members, it need not inherit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from pacsys.pool.stats import PoolStats, WorkerRow


@runtime_checkable
class CountsSubscriptions(Protocol):
    """A backend that says how many backend subscriptions it holds (metric pacsys_backend_subscriptions)."""

    @property
    def subscription_count(self) -> int: ...


@runtime_checkable
class ManagedBackend(CountsSubscriptions, Protocol):
    """A backend with workers of its own (the worker pool)."""

    #: Counters of its supervision (exits, recycles, cool-downs, waits ...), read by metrics.
    stats: PoolStats

    async def start(self) -> None:
        """Start the workers and wait until enough serve; called on the server's loop before it serves."""

    @property
    def is_ready(self) -> bool:
        """Enough workers serve (health readiness)."""

    @property
    def is_alive(self) -> bool:
        """It can still recover by itself: it was ready within its `unready_limit` (health liveness)."""

    @property
    def ready_count(self) -> int:
        """Workers serving now."""

    def unready_seconds(self) -> float:
        """How long it has not been ready (0 while it is)."""

    def worker_states(self) -> list[WorkerRow]:
        """One row per worker slot, for the status view and the metrics."""

    async def add_worker(self) -> None:
        """One more worker slot (the service's SIGTTIN)."""

    async def remove_worker(self) -> None:
        """One worker slot less (the service's SIGTTOU)."""


if TYPE_CHECKING:
    from pacsys.pool.pool import WorkerPool

    def _the_pool_is_managed(pool: WorkerPool) -> ManagedBackend:
        return pool  # mypy proves that the worker pool implements the protocol
