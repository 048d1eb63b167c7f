"""Prometheus metrics and HTTP probes on one port: /metrics, /healthz, /readyz.

Nothing is counted twice: the servicer and the pool keep their own counters, and a
collector reads them when Prometheus scrapes. Only request latency is observed on the
hot path (one histogram observation per request). The registry is the server's own (two
servers in one process must not share series), so the front's process_* and python_gc_*
collectors and pacsys_build_info are registered on it explicitly.

An IPv6 host (``::``) is bound dual-stack: the port answers on IPv4 as well.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import logging
import math
import platform
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import GC_COLLECTOR, PROCESS_COLLECTOR, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from pacsys.supervised._listen import reason as bind_reason
from pacsys.supervised._managed import CountsSubscriptions
from workers.logformat import counts as log_counts
from workers.supervision import EXIT_REASONS, RECYCLE_REASONS, SERVING, SlotState

SLOT_STATES = tuple(state.value for state in SlotState if state is not SlotState.RETIRED)
SERVING_STATES = frozenset(state.value for state in SERVING)

# The label values a labelled counter can take, each exported at 0 before it first counts, so
# that `increase()` and `rate()` see a counter's first event too (a series that appears at 1
# has no increase). Values not listed here are exported as they come.
RPCS = ("Read", "Set")
# The `decision` of pacsys_requests_total: a gate.Refusal's, or the servicer's allow and error.
DECISIONS = ("allow", "invalid", "limit", "unauthenticated", "denied", "draining", "error", "audit_unavailable")
# The `limit` of pacsys_limits_hit_total: the setting that bit.
LIMITS = (
    "max_drfs_per_request",
    "max_settings_per_request",
    "max_drf_length",
    "max_rate_hz",
    "max_stream_rate",
    "max_peer_rate",
    "max_streams",
    "max_streams_per_peer",
    "max_health_watches",
    "max_health_watches_per_peer",
    "max_connections",
    "max_connections_per_address",
    "max_calls_per_peer",
    "metrics_max_connections",
    "metrics_timeout",
)

if TYPE_CHECKING:
    from pacsys.supervised._server import SupervisedServer
    from workers.pool_stats import PoolStats

logger = logging.getLogger(__name__)

# accept() failed: out of descriptors (the process's or the system's) or of kernel memory.
OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
ACCEPT_FAILURE_LOG_INTERVAL = 60.0  # at most one log line per this many seconds about failed accepts

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _Collector:
    def __init__(self, server: SupervisedServer):
        self._server = server

    def collect(self) -> Iterator[Metric]:
        servicer = self._server.servicer
        stats = servicer.stats
        requests = CounterMetricFamily("pacsys_requests", "Requests by RPC and decision", labels=["rpc", "decision"])
        yield _counted(requests, stats.requests, [(rpc, decision) for rpc in RPCS for decision in DECISIONS])
        denials = CounterMetricFamily("pacsys_policy_denials", "Requests denied, by policy", labels=["policy"])
        chain = list(servicer.policies)  # the running chain's names; "approval" when one grants writes
        names = [p.name for p in chain] + (["approval"] if any(p.allows_writes for p in chain) else [])
        yield _counted(denials, stats.denials_by_policy, [(name,) for name in names])
        limits = CounterMetricFamily("pacsys_limits_hit", "Requests refused by a limit", labels=["limit"])
        yield _counted(limits, stats.limits_hit, [(limit,) for limit in LIMITS])
        yield GaugeMetricFamily("pacsys_active_streams", "Open client streams", value=servicer.active_streams)
        yield CounterMetricFamily(
            "pacsys_refusals_not_logged",
            "Refusal log lines left out by refusal_log_interval",
            value=stats.refusals_not_logged,
        )
        if servicer.audit is not None:
            yield GaugeMetricFamily(
                "pacsys_audit_healthy",
                "1 while the audit log records (writes are refused while it cannot)",
                value=1 if servicer.audit.healthy else 0,
            )
        yield CounterMetricFamily(
            "pacsys_readings_delivered", "Readings delivered to client streams", value=stats.readings_delivered
        )
        yield CounterMetricFamily(
            "pacsys_readings_dropped", "Readings dropped for slow clients", value=servicer.dropped_now()
        )
        yield GaugeMetricFamily(
            "pacsys_ready", "1 while the service reports SERVING", value=1 if self._server.ready else 0
        )
        yield CounterMetricFamily(
            "pacsys_log_values_cut", "Log values cut at log_value_chars characters", value=log_counts.values_cut
        )
        backend = self._server.backend
        yield GaugeMetricFamily(
            "pacsys_alive",
            "1 while liveness is SERVING (0: not ready for unready_limit seconds)",
            value=1 if self._server.backend_alive() else 0,
        )
        managed = self._server.managed
        if managed is not None:
            yield GaugeMetricFamily(
                "pacsys_unready_seconds",
                "Seconds since a worker last served (0 while one does)",
                value=managed.unready_seconds(),
            )
        if isinstance(backend, CountsSubscriptions):
            yield GaugeMetricFamily(
                "pacsys_backend_subscriptions", "Backend subscriptions held", value=backend.subscription_count
            )
        if managed is not None:
            yield from _worker_metrics(managed.worker_states(), managed.stats)


def _worker_metrics(rows: list[dict[str, Any]], pool_stats: PoolStats) -> Iterator[Metric]:
    gauges = {
        "up": GaugeMetricFamily("pacsys_worker_up", "1 when the slot's worker serves", labels=["slot"]),
        "pid": GaugeMetricFamily("pacsys_worker_pid", "Process id of the worker", labels=["slot"]),
        "rss": GaugeMetricFamily("pacsys_worker_rss_bytes", "Resident memory of the worker", labels=["slot"]),
        "heartbeat": GaugeMetricFamily(
            "pacsys_worker_heartbeat_age_seconds", "Seconds since the worker's loop answered", labels=["slot"]
        ),
        "in_flight": GaugeMetricFamily("pacsys_worker_in_flight", "Requests waiting on the worker", labels=["slot"]),
        "budget": GaugeMetricFamily(
            "pacsys_worker_restart_budget_left",
            "Early exits the slot may still have within restart_period before it cools down",
            labels=["slot"],
        ),
    }
    state = GaugeMetricFamily(
        "pacsys_worker_state", "1 for the slot's current state (starting, ready, ...)", labels=["slot", "state"]
    )
    restarts = CounterMetricFamily("pacsys_worker_restarts", "Restarts of the slot", labels=["slot"])
    cooldowns = CounterMetricFamily("pacsys_worker_cooldowns", "Cool-downs of the slot", labels=["slot"])
    cpu = CounterMetricFamily("pacsys_worker_cpu_seconds", "CPU time of the current worker process", labels=["slot"])
    for row in rows:
        if row["state"] == SlotState.RETIRED.value:
            continue  # a retired slot leaves no series behind
        slot = [str(row["slot"])]
        gauges["up"].add_metric(slot, 1 if row["state"] in SERVING_STATES else 0)
        for name in SLOT_STATES:
            state.add_metric([slot[0], name], 1 if row["state"] == name else 0)
        if row["pid"] is not None:
            gauges["pid"].add_metric(slot, row["pid"])
        if "rss_bytes" in row:
            gauges["rss"].add_metric(slot, row["rss_bytes"])
        if "cpu_seconds" in row:
            cpu.add_metric(slot, row["cpu_seconds"])
        if row["heartbeat_age"] is not None:
            gauges["heartbeat"].add_metric(slot, row["heartbeat_age"])
        gauges["in_flight"].add_metric(slot, row["in_flight"])
        gauges["budget"].add_metric(slot, row["restart_budget_left"])
        restarts.add_metric(slot, row["restarts"])
        cooldowns.add_metric(slot, row["cooldowns"])
    yield from gauges.values()
    yield state
    yield restarts
    yield cooldowns
    yield cpu
    for name, help_text, counts, reasons in (
        (
            "pacsys_worker_exits",
            "Worker exits by reason (signal, exit, hang, ...)",
            pool_stats.exits_by_reason,
            EXIT_REASONS,
        ),
        (
            "pacsys_worker_recycles",
            "Workers replaced gracefully, by reason",
            pool_stats.recycles_by_reason,
            RECYCLE_REASONS,
        ),
    ):
        family = CounterMetricFamily(name, help_text, labels=["reason"])
        yield _counted(family, counts, [(reason,) for reason in sorted(reasons)])
    for name, help_text in (
        ("cooldowns", "Slots cooled down after too many early exits"),
        ("calls_waited", "One-shot calls and subscriptions that found no worker serving and waited"),
        ("calls_unavailable", "Calls that waited worker_wait for a worker in vain (UNAVAILABLE)"),
        ("reads_retried", "One-shot reads retried after their worker died"),
        ("writes_outcome_unknown", "Settings answered 'worker lost; outcome unknown'"),
        ("stream_gaps", "Subscriptions interrupted by a worker's death"),
    ):
        yield CounterMetricFamily(f"pacsys_{name}", help_text, value=getattr(pool_stats, name))


def _counted(family: CounterMetricFamily, counts: Mapping[Any, int], known: list[tuple[str, ...]]) -> Metric:
    """`family` with a series per known label value (0 until it counts), then any other value counted."""
    counts = dict(counts)  # a copy: the counters change under a scrape
    for labels in known:
        family.add_metric(list(labels), counts.pop(labels if len(labels) > 1 else labels[0], 0))
    for key, n in counts.items():
        family.add_metric(list(key) if isinstance(key, tuple) else [key], n)
    return family


def _build_info() -> Iterator[Metric]:
    from pacsys.supervised.reporting import version

    info = GaugeMetricFamily("pacsys_build_info", "Always 1: the running version", labels=["version", "python"])
    info.add_metric([version(), platform.python_version()], 1)
    yield info


class _BuildInfo:
    def __init__(self) -> None:
        self._families = list(_build_info())  # fixed for the life of the process

    def collect(self) -> Iterator[Metric]:
        yield from self._families


class MetricsServer:
    """Serves /metrics, /healthz (liveness) and /readyz (SERVING) over HTTP.

    `host` is an address to bind: IPv4 (``0.0.0.0``), or IPv6 with or without brackets
    (``::`` listens on both families).

    One thread runs an event loop of its own (not the front's: a slow scrape must not delay a
    reply). Connections are bounded (`max_connections`; more are closed at once and counted
    as `metrics_max_connections` in `pacsys_limits_hit`) and each has `timeout` seconds to
    send its request and take the answer (else it is closed and counted as
    `metrics_timeout`), so idle connections cost neither threads nor slots for long.
    """

    def __init__(
        self,
        server: SupervisedServer,
        port: int,
        host: str = "0.0.0.0",
        *,
        max_connections: int = 64,
        timeout: float = 5.0,
    ):
        self.registry = CollectorRegistry()
        self.registry.register(_Collector(server))  # type: ignore[arg-type]
        self.registry.register(_BuildInfo())  # type: ignore[arg-type]
        # prometheus_client's own process and GC collectors (they read process-wide figures).
        self.registry.register(PROCESS_COLLECTOR)
        self.registry.register(GC_COLLECTOR)
        latency = Histogram(
            "pacsys_request_latency_seconds",
            "Time from a request's arrival to its backend answer",
            ["rpc"],
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        )
        observers = {rpc: latency.labels(rpc).observe for rpc in ("Read", "Set")}
        server.servicer.stats.latency_observer = lambda rpc, seconds: observers[rpc](seconds)
        self._supervised = server
        self._max_connections = max_connections
        self._timeout = timeout
        self._open = 0
        self._accept_failures = 0  # since the last line about them
        self._accept_failure_logged = -math.inf
        host = host.strip("[]")
        try:
            if ":" in host:  # IPv6; "::" takes IPv4 clients as well where the system allows it
                self._sock = socket.create_server(
                    (host, port), family=socket.AF_INET6, backlog=128, dualstack_ipv6=socket.has_dualstack_ipv6()
                )
            else:
                self._sock = socket.create_server((host, port), family=socket.AF_INET, backlog=128)
        except OSError as exc:
            raise OSError(f"cannot listen on {host}:{port} (metrics_port): {bind_reason(exc, port)}") from None
        self.port = self._sock.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        # /healthz asks the front's loop and may wait up to 2 s for it: one thread does that.
        self._probe = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pacsys-metrics-probe")
        self._thread = threading.Thread(target=self._run, name="pacsys-metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        elif not self._loop.is_closed():
            self._loop.close()  # never started
        self._sock.close()
        self._probe.shutdown(wait=False)

    def _run(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        loop.set_exception_handler(self._loop_exception)
        listening = loop.run_until_complete(asyncio.start_server(self._connection, sock=self._sock, limit=16384))
        try:
            loop.run_forever()
        finally:
            listening.close()
            # Connections still open end here: each handler takes its cancellation as the end of
            # its connection and returns, and the loop is closed only once they all have.
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """asyncio logs every accept() that failed for want of descriptors or memory with its
        traceback, up to 128 a wake-up (hundreds of lines a second): one line per
        ACCEPT_FAILURE_LOG_INTERVAL instead, with the count. Anything else as asyncio would."""
        exc = context.get("exception")
        if not (isinstance(exc, OSError) and exc.errno in OUT_OF_RESOURCES):
            loop.default_exception_handler(context)
            return
        self._accept_failures += 1
        now = time.monotonic()
        if now - self._accept_failure_logged >= ACCEPT_FAILURE_LOG_INTERVAL:
            logger.warning("event=metrics_accept_failed error=%s count=%d", exc, self._accept_failures)
            self._accept_failure_logged = now
            self._accept_failures = 0

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._open >= self._max_connections:
            self._supervised.servicer.stats.limits_hit["metrics_max_connections"] += 1
            writer.transport.abort()
            return
        self._open += 1
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self._timeout)
            parts = head.split(b"\r\n", 1)[0].split()
            method, path = (parts[0], parts[1].decode("latin-1")) if len(parts) >= 2 else (b"", "")
            status, body, content_type = await self._answer(method, path)
            writer.write(
                f"HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + body
            )
            await asyncio.wait_for(writer.drain(), self._timeout)
        except TimeoutError:
            self._supervised.servicer.stats.limits_hit["metrics_timeout"] += 1
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass  # too large a request, or gone: the connection is closed
        except asyncio.CancelledError:
            # The server stops (`_run`). Returned from, not raised: Python 3.11's stream server
            # logs a cancelled handler's CancelledError as an ERROR with its traceback.
            pass
        finally:
            self._open -= 1
            writer.close()

    async def _answer(self, method: bytes, path: str) -> tuple[str, bytes, str]:
        text = "text/plain; charset=utf-8"
        if method != b"GET":
            return "405 Method Not Allowed", b"GET only\n", text
        if path == "/metrics":
            return "200 OK", generate_latest(self.registry), CONTENT_TYPE_LATEST
        if path == "/healthz":
            loop = asyncio.get_running_loop()
            alive = await loop.run_in_executor(self._probe, self._supervised.alive)
            return (
                ("200 OK", b"ok\n", text) if alive else ("503 Service Unavailable", b"front loop not answering\n", text)
            )
        if path == "/readyz":
            ready = self._supervised.ready
            return ("200 OK", b"ready\n", text) if ready else ("503 Service Unavailable", b"not ready\n", text)
        return "404 Not Found", b"not found\n", text
