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
import functools
import logging
import math
import platform
import socket
import struct
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import GC_COLLECTOR, PROCESS_COLLECTOR, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from pacsys.pool.supervision import SERVING, EndReason, SlotState
from pacsys.supervised._listen import reason as bind_reason
from pacsys.supervised._managed import CountsSubscriptions
from pacsys.supervised.stderr_relay import counts as stderr_counts
from workers.logformat import counts as log_counts

SLOT_STATES = tuple(state.value for state in SlotState if state is not SlotState.RETIRED)

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
    "max_queued_bytes_per_peer",
    "max_queued_bytes",
    "metrics_max_connections",
    "metrics_max_connections_per_address",
    "metrics_timeout",
)

if TYPE_CHECKING:
    from pacsys.pool.stats import PoolStats, WorkerRow
    from pacsys.supervised._audit import AuditLog
    from pacsys.supervised._server import SupervisedServer

logger = logging.getLogger(__name__)

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
            yield from _audit_metrics(servicer.audit)
        yield CounterMetricFamily(
            "pacsys_readings_delivered", "Readings delivered to client streams", value=stats.readings_delivered
        )
        yield CounterMetricFamily(
            "pacsys_readings_dropped", "Readings dropped for slow clients", value=servicer.dropped_now()
        )
        yield GaugeMetricFamily(
            "pacsys_queued_bytes",
            "Bytes of readings queued for client streams (estimated; see max_queued_bytes)",
            value=servicer.queued_bytes_now(),
        )
        yield GaugeMetricFamily(
            "pacsys_ready", "1 while the service reports SERVING", value=1 if self._server.ready else 0
        )
        yield CounterMetricFamily(
            "pacsys_log_values_cut", "Log values cut at log_value_chars characters", value=log_counts.values_cut
        )
        yield CounterMetricFamily(
            "pacsys_stderr_lines_not_logged",
            "Lines of gRPC core (and other native stderr lines) left out by grpc_log_interval",
            value=stderr_counts.not_logged,
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


def _audit_metrics(audit: AuditLog) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "pacsys_audit_healthy",
        "1 while the audit log records (writes are refused while it cannot)",
        value=1 if audit.healthy else 0,
    )
    stats = audit.stats
    yield CounterMetricFamily(
        "pacsys_audit_written_bytes", "Bytes written to the audit log and its capture", value=stats.written_bytes
    )
    summarised = CounterMetricFamily(
        "pacsys_audit_summarised",
        "Requests recorded only in a summary line, by the setting that bit "
        "(audit_client_bytes_per_second, audit_reserve_bytes)",
        labels=["reason"],
    )
    for reason, n in list(stats.summarised.items()):
        summarised.add_metric([reason], n)
    yield summarised
    yield CounterMetricFamily(
        "pacsys_audit_summarised_bytes",
        "Bytes of audit entries and frames not written, recorded in summaries instead",
        value=stats.summarised_bytes,
    )
    yield CounterMetricFamily(
        "pacsys_audit_drf_lists_cut",
        "Audit entries whose DRF list was cut at audit_drf_chars (count and digest of the rest)",
        value=stats.drf_lists_cut,
    )
    yield CounterMetricFamily(
        "pacsys_audit_rotations", "Rotations of the audit files at audit_max_bytes", value=stats.rotations
    )
    if audit.disk_free_bytes is not None:
        yield GaugeMetricFamily(
            "pacsys_audit_disk_free_bytes",
            "Free bytes on the audit files' filesystem",
            value=audit.disk_free_bytes,
        )
    yield GaugeMetricFamily(
        "pacsys_audit_low_space",
        "0: free space above audit_min_free_bytes; 1: below it; 2: below audit_reserve_bytes "
        "(Reads and refusals only summarised, Sets in full)",
        value=audit.low_space,
    )


def _worker_metrics(rows: list[WorkerRow], pool_stats: PoolStats) -> Iterator[Metric]:
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
        if row.state is SlotState.RETIRED:
            continue  # a retired slot leaves no series behind
        slot = [str(row.slot)]
        gauges["up"].add_metric(slot, 1 if row.state in SERVING else 0)
        for name in SLOT_STATES:
            state.add_metric([slot[0], name], 1 if row.state.value == name else 0)
        if row.pid is not None:
            gauges["pid"].add_metric(slot, row.pid)
        if row.rss_bytes is not None:
            gauges["rss"].add_metric(slot, row.rss_bytes)
        if row.cpu_seconds is not None:
            cpu.add_metric(slot, row.cpu_seconds)
        if row.heartbeat_age is not None:
            gauges["heartbeat"].add_metric(slot, row.heartbeat_age)
        gauges["in_flight"].add_metric(slot, row.in_flight)
        gauges["budget"].add_metric(slot, row.restart_budget_left)
        restarts.add_metric(slot, row.restarts)
        cooldowns.add_metric(slot, row.cooldowns)
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
            [reason for reason in EndReason if reason.is_exit],
        ),
        (
            "pacsys_worker_recycles",
            "Workers replaced gracefully, by reason",
            pool_stats.recycles_by_reason,
            [reason for reason in EndReason if reason.is_recycle],
        ),
    ):
        family = CounterMetricFamily(name, help_text, labels=["reason"])
        yield _counted(family, counts, [(str(reason),) for reason in sorted(reasons)])
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


# Silent connections wait in the kernel's queue at no cost to us (TCP_DEFER_ACCEPT): let it
# hold many. The kernel caps it at net.core.somaxconn (4096 by default since Linux 5.4).
LISTEN_BACKLOG = 4096


class _AcceptFailures:
    def __init__(self) -> None:
        self.count = 0

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "pacsys_metrics_accept_failures",
            "Connections the metrics port failed to accept (out of descriptors or memory)",
            value=self.count,
        )


MAX_REQUEST_BYTES = 16384  # a request line and its headers; a larger request is closed unanswered
ACCEPT_BATCH = 16  # connections accepted per wake-up of the listening socket, then the others' turn
ACCEPT_RETRY_DELAY = 0.1  # seconds without accepting after accept() failed (out of descriptors)
ACCEPT_FAILURE_LOG_INTERVAL = 60.0  # at most one log line per this many seconds about failed accepts


@dataclass(eq=False)
class _Connection:
    sock: socket.socket
    address: str  # the client's host address: the unit of the per-address cap
    answering: bool = False  # its request is complete: it is being answered
    task: asyncio.Task[None] | None = None


class MetricsServer:
    """Serves /metrics, /healthz (liveness) and /readyz (SERVING) over HTTP.

    `host` is an address to bind: IPv4 (``0.0.0.0``), or IPv6 with or without brackets
    (``::`` listens on both families).

    One thread runs an event loop of its own (not the front's: a slow scrape must not delay a
    reply). No load of connections can keep a probe out (docs/design.md, "The metrics
    port"): a connection's request is read as it is accepted, so a probe, which sends its
    request at once, is being answered from its first moment; and at `max_connections` in
    all, or `max_connections_per_address` from one host address, a newcomer is let in and
    the connection of that scope that has waited longest without a complete request is
    closed instead (only when none is waiting, the oldest being answered). Evictions are
    counted as `metrics_max_connections` and `metrics_max_connections_per_address` in
    `pacsys_limits_hit`. Each connection has `timeout` seconds to send its request and take
    the answer (else it is closed and counted as `metrics_timeout`). Concurrent /healthz
    requests share one liveness check.
    """

    def __init__(
        self,
        server: SupervisedServer,
        port: int,
        host: str = "0.0.0.0",
        *,
        max_connections: int = 64,
        max_connections_per_address: int = 8,
        timeout: float = 5.0,
    ):
        self.registry = CollectorRegistry()
        self.registry.register(_Collector(server))  # type: ignore[arg-type]
        self.registry.register(_BuildInfo())  # type: ignore[arg-type]
        self._accept_failed_total = _AcceptFailures()
        self.registry.register(self._accept_failed_total)  # type: ignore[arg-type]
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
        self._limits_hit = server.servicer.stats.limits_hit
        self._max_connections = max_connections
        self._max_per_address = max_connections_per_address
        self._timeout = timeout
        # Open connections, oldest first (dicts keep insertion order), in all and per address.
        self._connections: dict[_Connection, None] = {}
        self._by_address: dict[str, dict[_Connection, None]] = {}
        self._alive_check: asyncio.Future[bool] | None = None
        self._accept_failures = 0  # since the last line about them
        self._accept_failure_logged = -math.inf
        host = host.strip("[]")
        try:
            if ":" in host:  # IPv6; "::" takes IPv4 clients as well where the system allows it
                self._sock = socket.create_server(
                    (host, port),
                    family=socket.AF_INET6,
                    backlog=LISTEN_BACKLOG,
                    dualstack_ipv6=socket.has_dualstack_ipv6(),
                )
            else:
                self._sock = socket.create_server((host, port), family=socket.AF_INET, backlog=LISTEN_BACKLOG)
        except OSError as exc:
            raise OSError(f"cannot listen on {host}:{port} (metrics_port): {bind_reason(exc, port)}") from None
        if hasattr(socket, "TCP_DEFER_ACCEPT"):  # Linux
            # A connection is handed over once its request has arrived: a silent one waits in the
            # kernel (no descriptor, no slot) for up to `timeout` seconds first.
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, max(1, math.ceil(timeout)))
        self._sock.setblocking(False)
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
        loop.add_reader(self._sock, self._accept)
        try:
            loop.run_forever()
        finally:
            loop.remove_reader(self._sock)
            # Connections still open end here: each task is cancelled, its socket closed as it
            # ends, and the loop is closed only once they all have.
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

    # -- connections --------------------------------------------------------------------------

    def _accept(self) -> None:
        """Accepts what the listening socket holds (a batch at a time), reading each request."""
        for _ in range(ACCEPT_BATCH):
            try:
                sock, peer = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors or memory: the client waits in the backlog
                self._accept_failed(exc)
                return
            sock.setblocking(False)
            try:
                # A probe's request has usually arrived with its connection: read it now, so
                # that the connection is being answered, never the one evicted for a silent one.
                head = sock.recv(MAX_REQUEST_BYTES)
            except (BlockingIOError, InterruptedError):
                head = b""
            except OSError:
                sock.close()  # reset already
                continue
            connection = _Connection(sock, peer[0])
            self._make_room(connection.address)
            self._connections[connection] = None
            self._by_address.setdefault(connection.address, {})[connection] = None
            connection.task = self._loop.create_task(self._serve(connection, head))
            connection.task.add_done_callback(functools.partial(self._closed, connection))

    def _make_room(self, address: str) -> None:
        """Evicts a connection where a newcomer from `address` would exceed a cap."""
        same_address = self._by_address.get(address)
        if same_address is not None and len(same_address) >= self._max_per_address:
            self._evict(same_address)
            self._limits_hit["metrics_max_connections_per_address"] += 1
        if len(self._connections) >= self._max_connections:
            self._evict(self._connections)
            self._limits_hit["metrics_max_connections"] += 1

    def _evict(self, scope: dict[_Connection, None]) -> None:
        """Resets the connection of `scope` silent longest (else the oldest being answered)."""
        victim = next((c for c in scope if not c.answering), None) or next(iter(scope))
        self._forget(victim)
        # A reset, not a close: nothing is left to send, and no TIME_WAIT is kept for it.
        victim.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        assert victim.task is not None
        victim.task.cancel()  # its done callback closes the socket

    def _forget(self, connection: _Connection) -> None:
        self._connections.pop(connection, None)
        same_address = self._by_address.get(connection.address)
        if same_address is not None:
            same_address.pop(connection, None)
            if not same_address:
                del self._by_address[connection.address]

    def _close(self, connection: _Connection) -> None:
        self._forget(connection)
        connection.sock.close()

    def _closed(self, connection: _Connection, task: asyncio.Task[None]) -> None:
        self._close(connection)  # however its task ended: answered, gone, timed out, evicted

    def _accept_failed(self, exc: OSError) -> None:
        """Counts a failed accept, pauses accepting a moment, and says so at a bounded rate."""
        self._accept_failed_total.count += 1
        self._accept_failures += 1
        now = time.monotonic()
        if now - self._accept_failure_logged >= ACCEPT_FAILURE_LOG_INTERVAL:
            logger.warning("event=metrics_accept_failed error=%s count=%d", exc, self._accept_failures)
            self._accept_failure_logged = now
            self._accept_failures = 0
        self._loop.remove_reader(self._sock)
        self._loop.call_later(ACCEPT_RETRY_DELAY, self._loop.add_reader, self._sock, self._accept)

    async def _serve(self, connection: _Connection, head: bytes) -> None:
        loop = self._loop
        try:
            async with asyncio.timeout(self._timeout):
                while b"\r\n\r\n" not in head:
                    if len(head) >= MAX_REQUEST_BYTES:
                        return  # too large a request: closed unanswered
                    more = await loop.sock_recv(connection.sock, MAX_REQUEST_BYTES)
                    if not more:
                        return  # gone
                    head += more
                connection.answering = True
                parts = head.split(b"\r\n", 1)[0].split()
                method, path = (parts[0], parts[1].decode("latin-1")) if len(parts) >= 2 else (b"", "")
                status, body, content_type = await self._answer(method, path)
                await loop.sock_sendall(
                    connection.sock,
                    f"HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                    "Connection: close\r\n\r\n".encode()
                    + body,
                )
        except TimeoutError:
            self._limits_hit["metrics_timeout"] += 1
        except ConnectionError:
            pass  # gone

    async def _answer(self, method: bytes, path: str) -> tuple[str, bytes, str]:
        text = "text/plain; charset=utf-8"
        if method != b"GET":
            return "405 Method Not Allowed", b"GET only\n", text
        if path == "/metrics":
            return "200 OK", generate_latest(self.registry), CONTENT_TYPE_LATEST
        if path == "/healthz":
            alive = await self._alive()
            return (
                ("200 OK", b"ok\n", text) if alive else ("503 Service Unavailable", b"front loop not answering\n", text)
            )
        if path == "/readyz":
            ready = self._supervised.ready
            return ("200 OK", b"ready\n", text) if ready else ("503 Service Unavailable", b"not ready\n", text)
        return "404 Not Found", b"not found\n", text

    async def _alive(self) -> bool:
        """Liveness, one check at a time: requests that arrive while one runs share its answer."""
        if self._alive_check is None or self._alive_check.done():
            self._alive_check = self._loop.run_in_executor(self._probe, self._supervised.alive)
        # Shielded: a connection closed while it waits must not cancel the others' answer.
        return await asyncio.shield(self._alive_check)
