"""The running service: built from the settings, served, and steered by signals.

The main thread waits for signals and hands each to the method named after it, as uvicorn's
supervisor does (SIGHUP to `handle_hup`):

    SIGINT, SIGTERM   drain and stop, exit 0 (a second one exits at once)
    SIGHUP            re-read the config file; on success swap the policy chain atomically,
                      on failure log why at ERROR and keep the old chain
    SIGUSR1           reopen the audit files (after logrotate moved them)
    SIGTTIN, SIGTTOU  add or remove a worker (when the backend is a worker pool)

This module is the only place in `pacsys` that imports `pacsys.pool` (the worker pool), lazily, when workers > 0.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import os
import threading
from typing import TYPE_CHECKING, Any

from pacsys.settings import FIELDS, ConfigError, Settings, read_config_file, settings_from
from pacsys.supervised import _systemd as systemd
from pacsys.supervised._signals import SignalLoop
from pacsys.supervised.gate import ServicerLimits
from pacsys.supervised.policy_config import build_policies, write_gate
from pacsys.supervised.reporting import (
    EXIT_START_FAILED,
    EXIT_UNREADY,
    PROG,
    configure_service_logging,
    json_logging,
    report_error,
)
from pacsys.supervised.startup_checks import resolve_admin_token, resolve_token, tls_files

if TYPE_CHECKING:
    from pacsys.aio import AsyncBackend
    from pacsys.backends import Backend
    from pacsys.supervised._audit import AuditLog
    from pacsys.supervised._managed import ManagedBackend
    from pacsys.supervised._server import SupervisedServer
    from pacsys.supervised.metrics import MetricsServer

logger = logging.getLogger("pacsys.supervised")

# The signals the service handles, each by its handle_<name> method (`_signals.SignalLoop`).
SIGNALS = ("INT", "TERM", "HUP", "USR1", "TTIN", "TTOU")

# Settings a SIGHUP applies at once; a change to any other one waits for a restart.
RELOADABLE = (
    "policies",
    "allow_writes",
    "token",
    "token_file",
    "admin_token_file",
    "log_level",
    "log_format",
    "log_requests",
    "log_value_chars",
)


class Service:
    """One serving process: build everything from the settings, serve, handle signals."""

    def __init__(self, settings: Settings, overrides: dict[str, Any], env: dict[str, Any] | None = None):
        self.settings = settings
        self.overrides = overrides
        self.env = env or {}  # read once: a reload re-reads the file, not the environment
        self.backend: Backend | AsyncBackend | None = None
        self.audit: AuditLog | None = None
        self.server: SupervisedServer | None = None
        self.metrics: MetricsServer | None = None
        self.stopping = False

    # -- building --------------------------------------------------------------------------

    def _build_backend(self) -> Backend | AsyncBackend:
        s = self.settings
        if s.workers == 0:
            from pacsys.backends.spec import build_backend

            return build_backend(s.backend)
        try:
            from pacsys.pool.pool import WorkerPool
        except ImportError as exc:
            raise RuntimeError(f"the worker pool is not available ({exc}); use --workers 0") from exc
        return WorkerPool(s)

    def run(self) -> int:
        from pacsys.supervised._audit import AuditLimits, AuditLog
        from pacsys.supervised._server import SupervisedServer, tune_gc_for_serving
        from pacsys.supervised._transport import TransportLimits, raise_open_files_limit

        s = self.settings
        try:
            token = resolve_token(s)
            admin_token = resolve_admin_token(s)
            tls = tls_files(s)
            chain = write_gate(s, build_policies(s))
        except ConfigError as exc:
            return report_error(exc)
        try:
            if s.audit_path is not None:
                self.audit = AuditLog(
                    s.audit_path,
                    s.audit_proto_path,
                    s.audit_log_responses,
                    s.audit_flush_interval,
                    limits=AuditLimits.from_settings(s),
                )
        except (OSError, ValueError) as exc:
            return report_error(f"cannot open the audit log: {exc}", EXIT_START_FAILED)
        signals = SignalLoop(self, SIGNALS)
        signals.install()  # before the backend starts: a signal meanwhile waits in the queue
        raise_open_files_limit()  # the connection cap is derived from it
        try:
            try:
                self.backend = self._build_backend()
                self.server = server = SupervisedServer(
                    self.backend,
                    port=s.port,
                    host=s.host,
                    policies=chain,
                    token=token,
                    audit_log=self.audit,
                    limits=ServicerLimits.from_settings(s),
                    max_message_bytes=s.max_message_bytes,
                    accept_loops=s.accept_loops,
                    threads_per_worker=s.threads_per_worker,
                    shutdown_grace=s.shutdown_grace,
                    drain_delay=s.drain_delay,
                    log_requests=s.log_requests,
                    close_backend=True,
                    event_loop=s.event_loop,
                    allow_unaudited_writes=s.allow_unaudited_writes,
                    allow_token_plaintext=s.allow_token_plaintext,
                    admin_token=admin_token,
                    tls=tls,
                    transport=TransportLimits.from_settings(s),
                    plaintext_port=s.plaintext_port,
                    reuse_port=s.reuse_port,
                    trusted_proxies=s.trusted_proxies,
                    connection_max_age=s.connection_max_age,
                )
                if s.metrics_port is not None:
                    # Up before the workers: /readyz answers "not ready" while they start.
                    from pacsys.supervised.metrics import MetricsServer

                    self.metrics = MetricsServer(
                        server,
                        s.metrics_port,
                        host=_metrics_host(s.host),
                        max_connections=s.metrics_max_connections,
                        max_connections_per_address=s.metrics_max_connections_per_address,
                        timeout=s.metrics_timeout,
                    )
                    self.metrics.start()
                server.start(timeout=s.ready_timeout + 30.0)
            except Exception as exc:  # BackendSpecError, WorkerStartupError, OSError (ports in use), ...
                logger.debug("event=start_failed", exc_info=True)
                self._cleanup_after_failed_start()
                return report_error(exc, EXIT_START_FAILED)
            tune_gc_for_serving()
            banner = f"{PROG}: serving DAQ on {s.host}:{server.port} ({self._describe()})"
            if json_logging():
                # The line a person or a script reads on stdout, whole; with JSON logs, an event.
                logger.info("event=banner text=%s", banner)
            else:
                print(banner, flush=True)
            systemd.notify(f"READY=1\nSTATUS=serving on port {server.port}\nMAINPID={os.getpid()}")
            watchdog_stop = threading.Event()
            systemd.start_watchdog(server.alive, watchdog_stop)
            try:
                return signals.run(self._idle)
            finally:
                watchdog_stop.set()
        finally:
            if self.metrics is not None:
                self.metrics.stop()
            if self.audit is not None:
                self.audit.close()
            signals.restore()

    def _describe(self) -> str:
        s = self.settings
        if s.workers == 0:
            text = f"backend {s.backend}, in process"
        else:
            managed = self._managed()
            if managed is None:
                text = f"backend {s.backend}, {s.workers} workers"
            else:
                ready = managed.ready_count
                text = f"backend {s.backend}, {ready} worker{'' if ready == 1 else 's'} ready"
        server = self.server
        if server is not None and server.plaintext_port is not None:
            text += f", plaintext on port {server.plaintext_port}"
        if self.metrics is not None:
            text += f", metrics on port {self.metrics.port}"
        return text

    def _cleanup_after_failed_start(self) -> None:
        # A pool that fails to start closes itself; an in-process backend is closed here.
        backend, self.backend = self.backend, None
        if backend is None or self.settings.workers > 0:
            return
        try:
            result = backend.close()
            if inspect.isawaitable(result):
                asyncio.run(asyncio.wait_for(_awaited(result), 5.0))
        except Exception:
            logger.debug("event=backend_close_failed after=failed_start", exc_info=True)

    # -- signals ---------------------------------------------------------------------------

    def _idle(self) -> int | None:
        """Between signals: an exit status when the service must end by itself, else None."""
        server = self._running()
        if server.wait(0):
            return report_error("the server stopped unexpectedly (see the log)", EXIT_START_FAILED)
        if self.settings.unready_exit and not server.backend_alive():
            # Erlang's escalation: this process cannot recover by itself; let the
            # service manager restart all of it.
            logger.error(
                "event=unready_exit unready_limit=%g exit_status=%d",
                self.settings.unready_limit,
                EXIT_UNREADY,
            )
            self.stopping = True
            systemd.notify("STOPPING=1")
            server.stop()
            return EXIT_UNREADY
        return None

    # -- SIGINT, SIGTERM -------------------------------------------------------------------

    def handle_int(self) -> int:
        return self._shut_down("SIGINT")

    def handle_term(self) -> int:
        return self._shut_down("SIGTERM")

    def _shut_down(self, signame: str) -> int:
        """Drain and stop; the exit status is 0."""
        self.stopping = True
        logger.info("event=shutting_down signal=%s shutdown_grace=%g", signame, self.settings.shutdown_grace)
        systemd.notify("STOPPING=1")
        self._running().stop()
        return 0

    # -- SIGHUP ----------------------------------------------------------------------------

    def handle_hup(self) -> None:
        self.reload()

    def reload(self) -> bool:
        """Re-read the config file; swap the policy chain when all of it is valid."""
        server = self._running()
        old = self.settings
        path = old.config
        if path is None:
            logger.warning('event=config_reload_skipped reason=no_config_file hint="start with --config FILE"')
            return False
        try:
            new = settings_from(read_config_file(path), self.overrides, env=self.env, source=path)
            token = resolve_token(new)
            admin_token = resolve_admin_token(new)
            chain = write_gate(new, build_policies(new))
            if server.tls is not None:
                server.tls.reload()  # a renewed certificate (same paths) serves the next handshakes
        except Exception as exc:  # a reload never ends the process, whatever the file holds
            text = str(exc) if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {exc}"
            logger.error("event=config_reload_failed kept=running_config error=%s", text)
            return False
        server.set_policies(chain)
        server.servicer.set_token(token)  # a rotated token file takes effect here too
        server.admin_token = admin_token
        if (new.log_level, new.log_format, new.log_value_chars) != (
            old.log_level,
            old.log_format,
            old.log_value_chars,
        ):
            configure_service_logging(new)
        server.servicer.log_requests = new.log_requests
        self.settings = old.replace(**{k: getattr(new, k) for k in RELOADABLE})
        pending = [k for k in FIELDS if k not in RELOADABLE and getattr(new, k) != getattr(old, k)]
        if pending:
            logger.warning("event=config_changes_need_restart settings=%s", ",".join(pending))
        logger.info("event=config_reloaded policies=%d names=%s", len(chain), ",".join(p.name for p in chain))
        return True

    # -- SIGUSR1 ---------------------------------------------------------------------------

    def handle_usr1(self) -> None:
        self.reopen()

    def reopen(self) -> None:
        """Reopen the audit files by their names: logrotate has moved the old ones away."""
        if self.audit is None:
            logger.info("event=audit_reopen_skipped reason=no_audit_log")
            return
        if self.audit.reopen():
            logger.info("event=audit_reopened")
        else:
            logger.error("event=audit_reopen_failed retry=next_entry")

    # -- SIGTTIN / SIGTTOU -----------------------------------------------------------------

    def handle_ttin(self) -> None:
        self.scale(up=True, signame="SIGTTIN")

    def handle_ttou(self) -> None:
        self.scale(up=False, signame="SIGTTOU")

    def scale(self, up: bool, signame: str = "") -> None:
        what = "add_worker" if up else "remove_worker"
        managed = self._managed()
        loop = self._running().loop
        if managed is None or loop is None:
            logger.warning("event=scale_refused signal=%s action=%s reason=not_a_worker_pool", signame, what)
            return
        logger.info("event=scale_requested signal=%s action=%s", signame, what)
        future = asyncio.run_coroutine_threadsafe(managed.add_worker() if up else managed.remove_worker(), loop)
        future.add_done_callback(lambda f: self._scaled(what, managed, f))

    def _scaled(self, what: str, managed: ManagedBackend, future: concurrent.futures.Future[None]) -> None:
        if future.cancelled():
            logger.warning("event=scale_cancelled action=%s", what)
        elif future.exception() is not None:
            logger.error("event=scale_failed action=%s error=%s", what, future.exception())
        else:
            ready = managed.ready_count
            logger.info("event=scale_done action=%s workers_ready=%d", what, ready)

    # -- the parts, once built -------------------------------------------------------------

    def _running(self) -> SupervisedServer:
        """The server; signals are handled only once it runs."""
        if self.server is None:
            raise RuntimeError("the service is not running")
        return self.server

    def _managed(self) -> ManagedBackend | None:
        """The backend as a worker pool (its workers, scaling), or None."""
        return self.server.managed if self.server is not None else None


def _metrics_host(host: str) -> str:
    """The metrics server's address for the gRPC `host` setting ([::] binds IPv6 and IPv4)."""
    return "127.0.0.1" if host == "localhost" else host.strip("[]")


async def _awaited(awaitable: Any) -> Any:
    return await awaitable
