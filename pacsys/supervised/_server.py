"""SupervisedServer: the DAQ gRPC service around one backend, in a thread of its own.

The server runs a grpc.aio server on an event loop in a background thread. The
backend is an AsyncBackend awaited directly on that loop; a sync Backend is wrapped
once by `pacsys.aio.as_async` (its calls run in the adapter's thread pool). Health
(grpc.health.v1, List included) and server reflection (v1 and v1alpha) are served on
the same port.

Library default: with no policies nothing is denied, writes included. The
`pacsys-supervisor` command is stricter: it denies writes unless a policy or
`--allow-writes` grants them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import grpc
import msgspec
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pacsys.aio import AsyncBackend, SyncBackendAdapter, as_async
from pacsys.aio._loops import new_event_loop
from pacsys.backends import Backend
from pacsys.settings import Settings
from pacsys.supervised._audit import AuditLog
from pacsys.supervised._connection_guard import ConnectionGuard, parse_networks
from pacsys.supervised._forwarded import ForwardedError, TrustedProxies
from pacsys.supervised._health import HEALTH_SERVICE, HealthServicer, enable_reflection
from pacsys.supervised._identity import Callers
from pacsys.supervised._listen import bind_problem, stop_listening
from pacsys.supervised._managed import ManagedBackend
from pacsys.supervised._peers import is_loopback
from pacsys.supervised._policies import Policy
from pacsys.supervised._servicer import SERVICE_NAME, DAQServicer, ServicerLimits
from pacsys.supervised._signals import SignalLoop
from pacsys.supervised._tls import ServerTLS, TLSFiles
from pacsys.supervised._transport import TransportLimits, open_files_limits, server_options
from pacsys.supervised.gate import GateRequest, Refusal

logger = logging.getLogger("pacsys.supervised")

ADMIN_SERVICE = "pacsys.supervisor.Admin"
READINESS_POLL_SECONDS = 0.25
MAX_HEALTH_SERVICE_NAME = 256  # characters; ours are at most 16

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# The settings' defaults are the library's too: `Settings` owns every one of them.
DEFAULTS = Settings()

# With reuse_port and no connection_max_age, connections are asked to reconnect after this
# many seconds, so that a drain can move them to the other instances sharing the port.
SHARED_PORT_CONNECTION_MAX_AGE = 10.0
MAX_AGE_JITTER = 0.1  # gRPC makes each connection's age limit up to 10% longer (or shorter)
MAX_AGE_MARGIN = 1.0  # seconds for the last GOAWAY to reach its client and its calls then in flight
QUIET_SECONDS = 0.5  # then a draining instance that shares its port waits until calls stop coming in
# Connections each accept loop may hold at least (a `max_connections` too small to split this
# way runs fewer of them: gRPC caps connections per server).
MIN_CONNECTIONS_PER_ACCEPT_LOOP = 64


class SupervisedServer:
    def __init__(
        self,
        backend: Backend | AsyncBackend,
        port: int = DEFAULTS.port,
        host: str = DEFAULTS.host,
        policies: list[Policy] | None = None,
        token: str | None = None,
        audit_log: AuditLog | None = None,
        *,
        limits: ServicerLimits | None = None,
        max_message_bytes: int = DEFAULTS.max_message_bytes,
        accept_loops: int = DEFAULTS.accept_loops,
        threads_per_worker: int = DEFAULTS.threads_per_worker,
        shutdown_grace: float = DEFAULTS.shutdown_grace,
        drain_delay: float = DEFAULTS.drain_delay,
        log_requests: bool = DEFAULTS.log_requests,
        close_backend: bool = False,
        event_loop: str = DEFAULTS.event_loop,
        allow_unaudited_writes: bool = DEFAULTS.allow_unaudited_writes,
        allow_token_plaintext: bool | None = DEFAULTS.allow_token_plaintext,
        admin_token: str | None = None,
        tls: TLSFiles | None = None,
        transport: TransportLimits | None = None,
        plaintext_port: int | None = None,
        reuse_port: bool = False,
        trusted_proxies: Sequence[str] = (),
        connection_max_age: float | None = None,
    ):
        if not isinstance(backend, Backend | AsyncBackend):
            raise TypeError(
                "backend must be a pacsys.backends.Backend or a pacsys.aio.AsyncBackend instance, "
                f"got {type(backend).__name__}"
            )
        _check_port("port", port)
        if plaintext_port is not None:
            _check_port("plaintext_port", plaintext_port)
        if plaintext_port is not None and (tls is None or tls.client_ca is not None):
            raise ValueError("plaintext_port needs tls without client certificates (tls_client_ca)")
        self._user_backend = backend
        self._backend = as_async(backend, max_threads=threads_per_worker)
        # A worker pool: started before serving, its readiness and workers reported.
        self._managed = self._backend if isinstance(self._backend, ManagedBackend) else None
        self._host = host
        self._requested_port = port
        self._port: int | None = None
        self._requested_plaintext_port = plaintext_port
        self._plaintext_port: int | None = None
        self._reuse_port = reuse_port
        if connection_max_age is None and reuse_port:  # a drain moves its clients by their age
            connection_max_age = SHARED_PORT_CONNECTION_MAX_AGE
        self._connection_max_age = connection_max_age
        self._max_message_bytes = max_message_bytes
        if isinstance(accept_loops, bool) or not isinstance(accept_loops, int) or not 1 <= accept_loops <= 64:
            raise ValueError(f"accept_loops must be an integer from 1 to 64, got {accept_loops!r}")
        self._accept_loops = accept_loops
        self.accept_loops_serving = 0  # gRPC servers on the port once started (fewer than asked
        # when max_connections is too small to split between them)
        self._grace = shutdown_grace
        self._drain_delay = drain_delay
        self.stopping = False  # run() is stopping on a signal: a second one exits at once
        self._leaving = False  # stop() was asked: NOT_SERVING, but still serving during drain_delay
        self._close_backend = close_backend
        self._event_loop = event_loop
        # Read now, so that a bad certificate file fails the start, not the first handshake.
        self.tls = ServerTLS(tls) if tls is not None else None
        limits = limits or ServicerLimits()
        if self._managed is None and limits.stream_buffer is None:
            # In process the servicer owns each stream's buffer size; a worker pool owns its own.
            limits = dataclasses.replace(limits, stream_buffer=DEFAULTS.stream_buffer)
        if allow_token_plaintext is None:  # a token never crosses a network in clear by default
            allow_token_plaintext = _is_loopback_host(host)
        self.servicer = DAQServicer(
            self._backend,
            policies=policies,
            token=token,
            audit_log=audit_log,
            limits=limits,
            log_requests=log_requests,
            allow_unaudited_writes=allow_unaudited_writes,
            token_over_plaintext=allow_token_plaintext,
            callers=Callers(
                # Facts of the ports: TLS or not (unknown per call when a plaintext port is beside
                # the TLS one), client certificates or not (never on a plaintext port).
                tls=None if plaintext_port is not None else tls is not None,
                client_certificates=tls is not None and tls.client_ca is not None,
            ),
            trusted_proxies=TrustedProxies(trusted_proxies),
        )
        self.admin_token = admin_token
        self.transport = transport or TransportLimits()
        self._guard: ConnectionGuard | None = None
        self.health = _Health(self.servicer)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._stopped = threading.Event()
        self._start_error: BaseException | None = None
        self._stop_requested: asyncio.Event | None = None
        self._ready: bool | None = None
        self._alive: bool | None = None
        self._audit_healthy: bool | None = None
        self._started_at = 0.0

    # -- properties ----------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port the server listens on (the real one when 0 was asked)."""
        return self._port if self._port is not None else self._requested_port

    @property
    def plaintext_port(self) -> int | None:
        """The port of the listener without TLS beside the TLS one (None: none)."""
        return self._plaintext_port if self._plaintext_port is not None else self._requested_plaintext_port

    @property
    def host(self) -> str:
        return self._host

    @property
    def backend(self) -> AsyncBackend:
        return self._backend

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        return self._loop

    def set_policies(self, policies: list[Policy]) -> None:
        self.servicer.set_policies(policies)

    @property
    def ready(self) -> bool:
        """True while the service reports SERVING (enough workers, not draining)."""
        return bool(self._ready)

    def alive(self, timeout: float = 2.0) -> bool:
        """Liveness: the front's loop answers and the backend can still recover by itself.

        A worker pool cannot when it has not been ready for `unready_limit` seconds; then a
        restart of the whole service is the remaining remedy, and liveness says so.
        """
        return self.backend_alive() and self.loop_alive(timeout)

    @property
    def managed(self) -> ManagedBackend | None:
        """The backend as a ManagedBackend (a worker pool), or None for any other backend."""
        return self._managed

    def backend_alive(self) -> bool:
        return self._managed is None or self._managed.is_alive

    def loop_alive(self, timeout: float = 2.0) -> bool:
        """True when the server's event loop runs a callback within `timeout`."""
        loop = self._loop
        if loop is None or self._stopped.is_set():
            return False
        answered = threading.Event()
        try:
            loop.call_soon_threadsafe(answered.set)
        except RuntimeError:
            return False
        return answered.wait(timeout)

    # -- lifecycle -------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        """Start serving in a background thread; return once the port is bound and serving."""
        if self._thread is not None:
            raise RuntimeError("server already started")
        self._thread = threading.Thread(target=self._thread_main, name="pacsys-supervised", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError(f"server did not start within {timeout} s")
        if self._start_error is not None:
            self._thread.join(5)
            raise self._start_error

    def stop(self, grace: float | None = None) -> None:
        """Drain and stop: NOT_SERVING at once, one-shot calls get `grace` seconds, streams end."""
        loop = self._loop
        if loop is None or self._stopped.is_set():
            return
        if grace is not None:
            self._grace = grace
        if self._stop_requested is not None:
            loop.call_soon_threadsafe(self._stop_requested.set)
        if threading.current_thread() is not self._thread:
            self._stopped.wait()
            if self._thread is not None:
                self._thread.join(10)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server has stopped; False when `timeout` passed first."""
        return self._stopped.wait(timeout)

    def run(self) -> None:
        """Serve until SIGINT or SIGTERM (call from the main thread); a second one exits at once.

        The signals are handled as the command's are (`_signals.SignalLoop`), by `handle_int`
        and `handle_term`.
        """
        self.start()
        with SignalLoop(self, ("INT", "TERM")) as signals:
            signals.run(lambda: 0 if self.wait(0) else None)

    def handle_int(self) -> int:
        return self._stop_on_signal("SIGINT")

    def handle_term(self) -> int:
        return self._stop_on_signal("SIGTERM")

    def _stop_on_signal(self, signame: str) -> int:
        logger.info("event=shutting_down signal=%s", signame)
        self.stopping = True
        self.stop()
        return 0

    def __enter__(self) -> SupervisedServer:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # -- the server thread ---------------------------------------------------------------

    def _thread_main(self) -> None:
        loop = new_event_loop(self._event_loop)
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported to start() or logged
            if not self._started.is_set():
                self._start_error = exc
            else:
                logger.exception("event=server_loop_failed")
        finally:
            self._started.set()
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()
                self._stopped.set()

    async def _serve(self) -> None:
        self._stop_requested = asyncio.Event()
        max_connections = self.transport.connection_cap()
        servers = self._grpc_servers(max_connections)
        self._bind(servers)
        await self._open_backend()
        for server in servers:
            await server.start()
        self._guard_connections(max_connections)
        self._started_at = time.time()
        await self._update_readiness()
        loop = asyncio.get_running_loop()
        watchers = [loop.create_task(self._watch_readiness()), loop.create_task(self.servicer.watch_queues())]
        logger.info("event=serving host=%s port=%d", self._host, self._port)
        if self._plaintext_port is not None:
            logger.info("event=serving_plaintext host=%s port=%d", self._host, self._plaintext_port)
        self._started.set()
        try:
            await self._stop_requested.wait()
        finally:
            for watcher in watchers:
                watcher.cancel()
            if self._guard is not None:
                self._guard.stop()
            await self._shutdown(servers)

    def _guard_connections(self, max_connections: int) -> None:
        """The per-address connection limit (`_connection_guard`), counted on this loop."""
        limits = self.transport
        loop = asyncio.get_running_loop()
        stats = self.servicer.stats

        def count_cut(n: int) -> None:
            stats.limits_hit["max_connections_per_address"] += n

        def count_full() -> None:
            stats.limits_hit["max_connections"] += 1

        # The guard calls these in its own thread: counted on this loop.
        def cut(_peer: str, n: int) -> None:
            loop.call_soon_threadsafe(count_cut, n)

        def full() -> None:
            loop.call_soon_threadsafe(count_full)

        ports = [p for p in (self._port, self._plaintext_port) if p is not None]
        self._guard = ConnectionGuard(
            ports,
            limits.max_connections_per_address,
            shared=self._reuse_port,
            exempt=parse_networks(limits.connections_per_address_exempt),
            max_connections=max_connections,
            memory_release_bytes=limits.memory_release_bytes,
            log_interval=self.servicer.limits.refusal_log_interval,
            on_cut=cut,
            on_full=full,
        )
        self._guard.start()
        soft, hard = open_files_limits()
        logger.info(
            "event=connection_limits open_files=%d open_files_hard=%d max_connections=%d accept_loops=%d "
            "max_connections_per_address=%d exempt=%s connection_idle_timeout=%g handshake_timeout=%g "
            "max_concurrent_streams=%d",
            soft,
            hard,
            max_connections,
            self.accept_loops_serving,
            limits.max_connections_per_address,
            ",".join(limits.connections_per_address_exempt) or "none",
            limits.connection_idle_timeout,
            limits.handshake_timeout,
            limits.max_concurrent_streams,
        )

    def _backend_ready(self) -> bool:
        # A worker pool is ready while enough workers are; any other backend always is.
        return self._managed is None or self._managed.is_ready

    async def _update_readiness(self) -> None:
        alive = self.backend_alive()
        if alive != self._alive:
            self._alive = alive
            await self.health.set("liveness", SERVING if alive else NOT_SERVING)
            if alive:
                logger.info("event=liveness status=SERVING")
            else:
                logger.error("event=liveness status=NOT_SERVING reason=unready_limit")
        audit = self.servicer.audit
        if audit is not None:
            # Reads go on while the audit log cannot record; writes do not (see "audit" health).
            # Notices a deleted file (or directory), writes the client summaries due and looks at
            # the free space, without waiting for a request.
            audit.flush()
            recording = audit.healthy
            if recording != self._audit_healthy:
                if not recording:
                    logger.error("event=audit_unavailable writes=refused")
                elif self._audit_healthy is not None:
                    logger.info("event=audit_recording writes=accepted")
                self._audit_healthy = recording
                await self.health.set("audit", SERVING if recording else NOT_SERVING)
        ready = self._backend_ready() and not self._leaving and not self.servicer.draining
        if ready != self._ready:
            self._ready = ready
            status = SERVING if ready else NOT_SERVING
            for name in ("", SERVICE_NAME, "readiness"):
                await self.health.set(name, status)
            logger.info("event=health status=%s", "SERVING" if ready else "NOT_SERVING")

    async def _watch_readiness(self) -> None:
        while True:
            await asyncio.sleep(READINESS_POLL_SECONDS)
            await self._update_readiness()

    def _admin_handler(self) -> grpc.GenericRpcHandler:
        """`pacsys.supervisor.Admin/Status`: the status view as JSON (empty request).

        It names every client and what it reads, pids and memory: it answers a client on this
        host, and a remote one that presents the admin token (or, without one, the service's
        bearer token); with no token at all, local clients only. A client that a trusted proxy
        forwards is local only when the proxy and the client both are.
        """

        async def status(_request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            try:
                peer, _ = self.servicer.client_of(context)
            except ForwardedError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            # Local: the connection, and the client a proxy on this host forwards, are both here.
            if not (is_loopback(peer) and is_loopback(context.peer())):
                token = self.admin_token if self.admin_token is not None else self.servicer.token
                if token is None:
                    await context.abort(
                        grpc.StatusCode.PERMISSION_DENIED, "the status view answers local clients only (no token set)"
                    )
                refusal = self.servicer.token_refusal(context, token)
                if refusal is not None:
                    await context.abort(*refusal)
            return msgspec.json.encode(self.status())

        return grpc.method_handlers_generic_handler(
            ADMIN_SERVICE,
            {
                "Status": grpc.unary_unary_rpc_method_handler(
                    status, request_deserializer=None, response_serializer=None
                )
            },
        )

    def status(self) -> dict[str, Any]:
        """What the service is doing now: totals, and one row per worker when there is a pool
        (`WorkerRow`s, which the Admin/Status view sends as JSON objects)."""
        stats = self.servicer.stats
        result: dict[str, Any] = {
            "address": f"{self._host}:{self.port}",
            "plaintext_address": None if self.plaintext_port is None else f"{self._host}:{self.plaintext_port}",
            "pid": os.getpid(),
            "uptime": time.time() - self._started_at if self._started_at else 0.0,
            "ready": self._ready,
            "backend": type(self._user_backend).__name__,
            "active_streams": self.servicer.active_streams,
            "requests": {f"{rpc}/{decision}": n for (rpc, decision), n in stats.requests.items()},
            "readings_delivered": stats.readings_delivered,
            "readings_dropped": self.servicer.dropped_now(),
            "queued_bytes": self.servicer.queued_bytes_now(),
            "streams": self.servicer.stream_rows(),
            "limits_hit": dict(stats.limits_hit),
        }
        if self._guard is not None:
            result["connections"] = self._guard.snapshot()
        if self.servicer.audit is not None:
            audit = self.servicer.audit
            result["audit"] = {
                "healthy": audit.healthy,
                "writes_refused": stats.writes_refused_unaudited,
                "disk_free_bytes": audit.disk_free_bytes,
                "low_space": audit.low_space,
                "summarised": dict(audit.stats.summarised),
                "drf_lists_cut": audit.stats.drf_lists_cut,
                "rotations": audit.stats.rotations,
            }
        managed = self._managed
        if managed is not None:
            result["workers"] = managed.worker_states()
            result["backend_subscriptions"] = managed.subscription_count
            result["pool"] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in vars(managed.stats).items()}
        return result

    def _grpc_servers(self, max_connections: int) -> list[grpc.aio.Server]:
        """The gRPC servers of the service port(s), every service on each.

        grpc.aio takes new calls one at a time, each after a few turns of the event loop and a
        hop through its poller thread: about 30 to 40 a second once the loop is saturated.
        `accept_loops` servers share the ports (SO_REUSEPORT; the kernel spreads connections
        over their sockets), each taking new calls on its own, all on this loop and this
        servicer. The ports were free when the first bound them (`bind_problem`, without
        SO_REUSEPORT unless `reuse_port`): another process is still refused them. gRPC caps
        connections per server, so `max_connections` is split between them (fewer servers when
        it is too small to split: at least MIN_CONNECTIONS_PER_ACCEPT_LOOP each). The kernel
        spreads connections by a hash of their addresses, so one server may fill a little before
        the others: near the cap, which only a flood reaches, the port holds slightly fewer.
        """
        count = max(1, min(self._accept_loops, max_connections // MIN_CONNECTIONS_PER_ACCEPT_LOOP))
        self.accept_loops_serving = count
        options = server_options(
            self.transport,
            max_connections // count,
            self._max_message_bytes,
            reuse_port=self._reuse_port or count > 1,
            connection_max_age=self._connection_max_age,
        )
        servers = []
        for _ in range(count):
            server = grpc.aio.server(options=options)
            server.add_generic_rpc_handlers((self.servicer.rpc_handler(),))
            health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
            enable_reflection((SERVICE_NAME, HEALTH_SERVICE), server)
            server.add_generic_rpc_handlers((self._admin_handler(),))
            servers.append(server)
        return servers

    def _bind(self, servers: list[grpc.aio.Server]) -> None:
        """The service port (TLS when configured), and the plaintext one beside it if any, on
        every server (the first picks a port when 0 was asked)."""
        self._port = self._listen(servers, self._requested_port, self.tls)
        if self._requested_plaintext_port is not None:
            self._plaintext_port = self._listen(servers, self._requested_plaintext_port, None, " (plaintext_port)")

    def _listen(self, servers: list[grpc.aio.Server], port: int, tls: ServerTLS | None, which: str = "") -> int:
        problem = bind_problem(self._host, port, self._reuse_port)
        if problem is not None:  # said in our words, before gRPC logs its own line
            raise OSError(f"cannot listen on {self._host}:{port}{which}: {problem}")
        for server in servers:
            address = f"{self._host}:{port}"
            try:
                if tls is not None:
                    bound = server.add_secure_port(address, tls.credentials())
                else:
                    bound = server.add_insecure_port(address)
            except RuntimeError as exc:
                raise OSError(f"cannot listen on {address}{which}: {exc}") from None
            if bound == 0:
                raise OSError(f"cannot listen on {address}{which}")
            port = bound
        return port

    async def _until_quiet(self) -> None:
        """Until no call has come in for QUIET_SECONDS, for at most shutdown_grace seconds.

        gRPC's stop drops the calls that reached this server but that it has not yet handed
        over: a busy instance whose clients have all moved may still hold a backlog of them.
        """
        loop = asyncio.get_running_loop()
        requests = self.servicer.stats.requests
        seen, quiet_since = sum(requests.values()), loop.time()
        deadline = quiet_since + self._grace
        while loop.time() - quiet_since < QUIET_SECONDS and loop.time() < deadline:
            await asyncio.sleep(QUIET_SECONDS / 10)
            if (now := sum(requests.values())) != seen:
                seen, quiet_since = now, loop.time()

    async def _open_backend(self) -> None:
        # A worker pool is started on this loop before the server reports SERVING.
        if self._managed is not None:
            await self._managed.start()

    async def _shutdown(self, servers: list[grpc.aio.Server]) -> None:
        self._leaving = True
        await self._update_readiness()  # NOT_SERVING from this moment
        delay = self._drain_delay
        if self._reuse_port:
            # Leave the shared port now: new connections go to the other instances. The
            # connections this one has are served until each was asked to reconnect
            # (connection_max_age): their clients' next calls go there too, and stopping
            # then ends no call that a client sent (gRPC's stop drops those it has not taken).
            ports = [p for p in (self._port, self._plaintext_port) if p is not None]
            closed = stop_listening(ports)
            if closed:
                logger.info("event=port_left ports=%s listeners=%d", ",".join(map(str, ports)), closed)
            else:  # no /proc to find them by: new connections keep coming until the stop
                logger.warning("event=port_not_left ports=%s reason=listeners_not_found", ",".join(map(str, ports)))
            if self._connection_max_age is not None:
                delay = max(delay, self._connection_max_age * (1 + MAX_AGE_JITTER) + MAX_AGE_MARGIN)
        if delay > 0:
            # A load balancer sends new calls here until its health check sees NOT_SERVING:
            # keep serving them, and end streams only once their reconnects go elsewhere.
            logger.info("event=drain_delay seconds=%g", delay)
            await asyncio.sleep(delay)
        if self._reuse_port:
            await self._until_quiet()
        self.servicer.end_streams()
        await asyncio.gather(*(server.stop(self._grace) for server in servers))
        if self._close_backend:
            await self._backend.close()
        elif isinstance(self._backend, SyncBackendAdapter):
            self._backend.release_threads()
        logger.info("event=server_stopped")


def tune_gc_for_serving() -> None:
    """Tune the cyclic garbage collector for a long-running server; call once, when serving.

    What startup allocated (gRPC, protobuf, policies) moves to the permanent generation, so
    full collections stop walking it, and young collections run every 20,000 allocations
    instead of 700. A streaming front allocates several objects per reply: this saves about
    5% of its CPU (pool of 2, 200 streams at 50 Hz). Process-wide, so the command calls it,
    not the library.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


def _check_port(name: str, port: object) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"{name} must be an integer from 0 to 65535, got {port!r}")


def _is_loopback_host(host: str) -> bool:
    return host in ("localhost", "[::1]") or host.startswith("127.")


class _Health(HealthServicer):
    """Health, with Watch streams held to caps of their own.

    A Watch costs the server a stream and its memory but no backend work: it does not take a
    slot of `max_streams` (where 10,000 of them used to leave no room for a subscription),
    it counts against `max_health_watches` and, per client, `max_health_watches_per_peer`.
    A refusal is counted, logged and audited as the gate's are.
    """

    def __init__(self, servicer: DAQServicer):
        super().__init__()
        self._servicer = servicer
        self._watches = 0
        self._watches_by_peer: dict[str, int] = {}

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:  # noqa: N802 - gRPC's name
        if len(request.service) > MAX_HEALTH_SERVICE_NAME:
            # The base class keeps a condition per name watched: no client-sized keys.
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "service name too long")
        try:
            peer, who = self._servicer.client_of(context)
        except ForwardedError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        refusal = self._refusal(who)
        if refusal is not None:
            self._servicer.gate.refuse(GateRequest("Watch", peer, who, drfs=(request.service,)), refusal)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal.details)
        self._watches += 1
        self._watches_by_peer[who] = self._watches_by_peer.get(who, 0) + 1
        try:
            await super().Watch(request, context)
        finally:
            self._watches -= 1
            self._watches_by_peer[who] -= 1
            if not self._watches_by_peer[who]:
                del self._watches_by_peer[who]

    def _refusal(self, who: str) -> Refusal | None:
        limits, stats = self._servicer.limits, self._servicer.stats
        if self._watches >= limits.max_health_watches:
            stats.limits_hit["max_health_watches"] += 1
            details = f"too many Health/Watch streams (the limit is {limits.max_health_watches})"
        elif self._watches_by_peer.get(who, 0) >= limits.max_health_watches_per_peer:
            stats.limits_hit["max_health_watches_per_peer"] += 1
            details = f"too many Health/Watch streams from {who} (the limit is {limits.max_health_watches_per_peer})"
        else:
            return None
        return Refusal("RESOURCE_EXHAUSTED", details, "limit")
