"""Prometheus metrics and HTTP probes on one port: /metrics, /healthz, /readyz.

Nothing is counted twice: the servicer and the pool keep their own counters, and a
collector reads them when Prometheus scrapes. Only request latency is observed on the
hot path (one histogram observation per request). The registry is the server's own (two
servers in one process must not share series), so the front's process_* and python_gc_*
collectors and pacsys_build_info are registered on it explicitly.

An IPv6 host (``::``) is bound dual-stack: the port answers on IPv4 as well.
"""

from __future__ import annotations

import platform
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from prometheus_client import GC_COLLECTOR, PROCESS_COLLECTOR, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from pacsys._logging import counts as log_counts

if TYPE_CHECKING:
    from pacsys.supervised._server import SupervisedServer

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _Collector:
    def __init__(self, server: SupervisedServer):
        self._server = server

    def collect(self) -> Iterator[Any]:
        servicer = self._server.servicer
        stats = servicer.stats
        requests = CounterMetricFamily("pacsys_requests", "Requests by RPC and decision", labels=["rpc", "decision"])
        for (rpc, decision), n in list(stats.requests.items()):
            requests.add_metric([rpc, decision], n)
        yield requests
        denials = CounterMetricFamily("pacsys_policy_denials", "Requests denied, by policy", labels=["policy"])
        for policy, n in list(stats.denials_by_policy.items()):
            denials.add_metric([policy], n)
        yield denials
        limits = CounterMetricFamily("pacsys_limits_hit", "Requests refused by a limit", labels=["limit"])
        for limit, n in list(stats.limits_hit.items()):
            limits.add_metric([limit], n)
        yield limits
        yield GaugeMetricFamily("pacsys_active_streams", "Open client streams", value=servicer.active_streams)
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
        subscriptions = getattr(backend, "subscription_count", None)
        if subscriptions is not None:
            yield GaugeMetricFamily("pacsys_backend_subscriptions", "Backend subscriptions held", value=subscriptions)
        worker_states = getattr(backend, "worker_states", None)
        if worker_states is not None:
            yield from _worker_metrics(worker_states(), getattr(backend, "stats", None))


def _worker_metrics(rows: list[dict[str, Any]], pool_stats: Any) -> Iterator[Any]:
    gauges = {
        "up": GaugeMetricFamily("pacsys_worker_up", "1 when the worker is ready", labels=["slot"]),
        "pid": GaugeMetricFamily("pacsys_worker_pid", "Process id of the worker", labels=["slot"]),
        "rss": GaugeMetricFamily("pacsys_worker_rss_bytes", "Resident memory of the worker", labels=["slot"]),
        "heartbeat": GaugeMetricFamily(
            "pacsys_worker_heartbeat_age_seconds", "Seconds since the worker's loop answered", labels=["slot"]
        ),
        "in_flight": GaugeMetricFamily("pacsys_worker_in_flight", "Requests waiting on the worker", labels=["slot"]),
        "budget": GaugeMetricFamily(
            "pacsys_worker_restart_budget_left", "Restarts left before the slot is given up", labels=["slot"]
        ),
    }
    restarts = CounterMetricFamily("pacsys_worker_restarts", "Restarts of the slot", labels=["slot"])
    cpu = CounterMetricFamily("pacsys_worker_cpu_seconds", "CPU time of the current worker process", labels=["slot"])
    for row in rows:
        slot = [str(row["slot"])]
        gauges["up"].add_metric(slot, 1 if row["state"] == "ready" else 0)
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
    yield from gauges.values()
    yield restarts
    yield cpu
    if pool_stats is None:
        return
    by_reason = CounterMetricFamily("pacsys_worker_exits", "Worker exits by reason", labels=["reason"])
    for reason, n in list(pool_stats.restarts_by_reason.items()):
        by_reason.add_metric([reason], n)
    yield by_reason
    for name, help_text in (
        ("slots_given_up", "Slots given up after too many restarts"),
        ("reads_retried", "One-shot reads retried after their worker died"),
        ("writes_outcome_unknown", "Settings answered 'worker lost; outcome unknown'"),
        ("stream_gaps", "Subscriptions interrupted by a worker's death"),
    ):
        yield CounterMetricFamily(f"pacsys_{name}", help_text, value=getattr(pool_stats, name))


def _build_info() -> Iterator[Any]:
    from pacsys.supervised.cli import version

    info = GaugeMetricFamily("pacsys_build_info", "Always 1: the running version", labels=["version", "python"])
    info.add_metric([version(), platform.python_version()], 1)
    yield info


class _BuildInfo:
    def __init__(self) -> None:
        self._families = list(_build_info())  # fixed for the life of the process

    def collect(self) -> Iterator[Any]:
        yield from self._families


class _DualStackServer(ThreadingHTTPServer):
    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        # Linux defaults to dual-stack, but net.ipv6.bindv6only (and other systems) may not.
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


class MetricsServer:
    """Serves /metrics, /healthz (the front's loop answers) and /readyz (SERVING) over HTTP.

    `host` is an address to bind: IPv4 (``0.0.0.0``), or IPv6 with or without brackets
    (``::`` listens on both families).
    """

    def __init__(self, server: SupervisedServer, port: int, host: str = "0.0.0.0"):
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
        registry, supervised = self.registry, server

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if self.path == "/metrics":
                    self._reply(200, generate_latest(registry), CONTENT_TYPE_LATEST)
                elif self.path == "/healthz":
                    alive = supervised.loop_alive()
                    self._reply(200 if alive else 503, b"ok\n" if alive else b"front loop not answering\n")
                elif self.path == "/readyz":
                    ready = supervised.ready
                    self._reply(200 if ready else 503, b"ready\n" if ready else b"not ready\n")
                else:
                    self._reply(404, b"not found\n")

            def _reply(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass  # probes every few seconds would flood the log

        host = host.strip("[]")
        http_server = _DualStackServer if ":" in host else ThreadingHTTPServer
        self._http = http_server((host, port), Handler)
        self._http.daemon_threads = True
        self.port = self._http.server_address[1]
        self._thread = threading.Thread(target=self._http.serve_forever, name="pacsys-metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._http.shutdown()
        self._http.server_close()
