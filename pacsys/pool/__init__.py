"""The worker pool: the front's side of the backend worker processes.

`WorkerPool` is an AsyncBackend that runs the backend in worker processes (the runtime in
the top-level `workers` package: what runs in a worker) and supervises them. It imports the
settings (`pacsys.settings`) and never the gRPC service (`pacsys.supervised`), which uses it.
"""

from pacsys.pool.pool import WorkerPool
from pacsys.pool.process import WorkerLost, WorkerStartupError
from pacsys.pool.stats import PoolStats

__all__ = ["PoolStats", "WorkerLost", "WorkerPool", "WorkerStartupError"]
