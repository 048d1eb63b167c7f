"""The worker pool: the front's side of the backend worker processes.

`pacsys.pool.pool.WorkerPool` is an AsyncBackend that runs the backend in worker processes
(the runtime in the top-level `workers` package: what runs in a worker) and supervises them.
It imports the settings (`pacsys.settings`) and never the gRPC service (`pacsys.supervised`),
which uses it. This package imports none of its modules: the status view and the metrics
import `stats` and `supervision` without loading the pool.
"""
