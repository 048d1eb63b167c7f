"""The running service: built from the settings, served, and steered by signals.

The main thread waits for signals and hands each to the method named after it, as uvicorn's
supervisor does (SIGHUP to `handle_hup`):

    SIGINT, SIGTERM   drain and stop, exit 0 (a second one exits at once)
    SIGHUP            re-read the config file; on success swap the policy chain atomically,
                      on failure log why at ERROR and keep the old chain
    SIGUSR1           reopen the audit files (after logrotate moved them)
    SIGTTIN, SIGTTOU  add or remove a worker (when the backend is a worker pool)

This module is the only place in `pacsys` that imports `workers.pool`, lazily, when workers > 0.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import inspect
import logging
import os
import queue
import signal
import threading
from types import FrameType
from typing import Any

from pacsys.supervised import _systemd as systemd
from pacsys.supervised.config import (
    FIELDS,
    ConfigError,
    Settings,
    limits,
    read_config_file,
    resolve_admin_token,
    resolve_token,
    settings_from,
    tls_files,
)
from pacsys.supervised.policy_config import build_policies, write_gate
from pacsys.supervised.reporting import (
    EXIT_START_FAILED,
    EXIT_UNREADY,
    PROG,
    configure_service_logging,
    json_logging,
    report_error,
)

logger = logging.getLogger("pacsys.supervised")

# The signals the service handles, each by its handle_<name> method.
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
        self.backend: Any = None
        self.audit: Any = None
        self.server: Any = None
        self.metrics: Any = None
        self.signals: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.stopping = False

    # -- building --------------------------------------------------------------------------

    def _build_backend(self) -> Any:
        s = self.settings
        if s.workers == 0:
            from pacsys.backends.spec import build_backend

            return build_backend(s.backend)
        try:
            from workers.pool import WorkerPool
        except ImportError as exc:
            raise RuntimeError(f"the worker pool is not available ({exc}); use --workers 0") from exc
        return WorkerPool(s)

    def run(self) -> int:
        from pacsys.supervised._audit import AuditLog
        from pacsys.supervised._server import SupervisedServer, tune_gc_for_serving

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
                self.audit = AuditLog(s.audit_path, s.audit_proto_path, s.audit_log_responses, s.audit_flush_interval)
        except (OSError, ValueError) as exc:
            return report_error(f"cannot open the audit log: {exc}", EXIT_START_FAILED)
        previous = self._install_signal_handlers()
        try:
            try:
                self.backend = self._build_backend()
                self.server = SupervisedServer(
                    self.backend,
                    port=s.port,
                    host=s.host,
                    policies=chain,
                    token=token,
                    audit_log=self.audit,
                    limits=limits(s),
                    max_message_bytes=s.max_message_bytes,
                    backend_threads=s.threads_per_worker,
                    shutdown_grace=s.shutdown_grace,
                    drain_delay=s.drain_delay,
                    log_requests=s.log_requests,
                    close_backend=True,
                    event_loop=s.event_loop,
                    allow_unaudited_writes=s.allow_unaudited_writes,
                    allow_token_plaintext=s.allow_token_plaintext,
                    admin_token=admin_token,
                    tls=tls,
                )
                if s.metrics_port is not None:
                    # Up before the workers: /readyz answers "not ready" while they start.
                    from pacsys.supervised.metrics import MetricsServer

                    self.metrics = MetricsServer(
                        self.server,
                        s.metrics_port,
                        host=_metrics_host(s.host),
                        max_connections=s.metrics_max_connections,
                        timeout=s.metrics_timeout,
                    )
                    self.metrics.start()
                self.server.start(timeout=s.ready_timeout + 30.0)
            except Exception as exc:  # BackendSpecError, WorkerStartupError, OSError (ports in use), ...
                logger.debug("startup failed", exc_info=True)
                self._cleanup_after_failed_start()
                return report_error(exc, EXIT_START_FAILED)
            tune_gc_for_serving()
            banner = f"{PROG}: serving DAQ on {s.host}:{self.server.port} ({self._describe()})"
            if json_logging():
                logger.info(banner)  # no arguments: our own text, not escaped
            else:
                print(banner, flush=True)
            systemd.notify(f"READY=1\nSTATUS=serving on port {self.server.port}\nMAINPID={os.getpid()}")
            watchdog_stop = threading.Event()
            systemd.start_watchdog(self.server.alive, watchdog_stop)
            try:
                return self._wait()
            finally:
                watchdog_stop.set()
        finally:
            if self.metrics is not None:
                self.metrics.stop()
            if self.audit is not None:
                self.audit.close()
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _describe(self) -> str:
        s = self.settings
        if s.workers == 0:
            text = f"backend {s.backend}, in process"
        else:
            ready = getattr(self.backend, "ready_count", None)
            if ready is None:
                text = f"backend {s.backend}, {s.workers} workers"
            else:
                text = f"backend {s.backend}, {ready} worker{'' if ready == 1 else 's'} ready"
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
            logger.debug("closing the backend after a failed start", exc_info=True)

    # -- signals ---------------------------------------------------------------------------

    def _install_signal_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            logger.warning("not in the main thread: signals are not handled")
            return {}
        previous: dict[int, Any] = {}
        for name in SIGNALS:
            signum = getattr(signal, f"SIG{name}", None)
            if signum is not None:
                previous[signum] = signal.signal(signum, self._on_signal)
        return previous

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        # Runs in the main thread between bytecodes: only queue it (SimpleQueue.put is reentrant).
        if signum in (signal.SIGINT, signal.SIGTERM) and self.stopping:
            # A second termination signal while draining: give up on a graceful stop.
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
        self.signals.put(signum)

    def _wait(self) -> int:
        """The main thread's loop: handle queued signals until the server stops."""
        while True:
            try:
                signum = self.signals.get(timeout=0.5)
            except queue.Empty:
                if self.server.wait(0):
                    return report_error("the server stopped unexpectedly (see the log)", EXIT_START_FAILED)
                if self.settings.unready_exit and not self.server.backend_alive():
                    # Erlang's escalation: this process cannot recover by itself; let the
                    # service manager restart all of it.
                    logger.error(
                        "event=unready_exit unready_limit=%g exit_status=%d",
                        self.settings.unready_limit,
                        EXIT_UNREADY,
                    )
                    self.stopping = True
                    systemd.notify("STOPPING=1")
                    self.server.stop()
                    return EXIT_UNREADY
                continue
            # As uvicorn's supervisor does: SIGHUP is handled by handle_hup, and so on.
            handler = getattr(self, f"handle_{signal.Signals(signum).name[3:].lower()}")
            status = handler()
            if status is not None:
                return status

    # -- SIGINT, SIGTERM -------------------------------------------------------------------

    def handle_int(self) -> int:
        return self._shut_down("SIGINT")

    def handle_term(self) -> int:
        return self._shut_down("SIGTERM")

    def _shut_down(self, signame: str) -> int:
        """Drain and stop; the exit status is 0."""
        self.stopping = True
        logger.info("%s: shutting down (grace %g s)", signame, self.settings.shutdown_grace)
        systemd.notify("STOPPING=1")
        self.server.stop()
        return 0

    # -- SIGHUP ----------------------------------------------------------------------------

    def handle_hup(self) -> None:
        self.reload()

    def reload(self) -> bool:
        """Re-read the config file; swap the policy chain when all of it is valid."""
        old = self.settings
        path = old.config
        if path is None:
            logger.warning("SIGHUP: no config file to reload (start with --config FILE)")
            return False
        try:
            new = settings_from(read_config_file(path), self.overrides, env=self.env, source=path)
            token = resolve_token(new)
            admin_token = resolve_admin_token(new)
            chain = write_gate(new, build_policies(new))
            if self.server.tls is not None:
                self.server.tls.reload()  # a renewed certificate (same paths) serves the next handshakes
        except Exception as exc:  # a reload never ends the process, whatever the file holds
            text = str(exc) if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {exc}"
            logger.error("config reload failed, keeping the old policies: %s", text)
            return False
        self.server.set_policies(chain)
        self.server.servicer.set_token(token)  # a rotated token file takes effect here too
        self.server.admin_token = admin_token
        if (new.log_level, new.log_format, new.log_value_chars) != (
            old.log_level,
            old.log_format,
            old.log_value_chars,
        ):
            configure_service_logging(new)
        self.server.servicer.log_requests = new.log_requests
        self.settings = dataclasses.replace(old, **{k: getattr(new, k) for k in RELOADABLE})
        pending = [k for k in FIELDS if k not in RELOADABLE and getattr(new, k) != getattr(old, k)]
        if pending:
            logger.warning("config reload: changes to %s take effect at the next restart", ", ".join(pending))
        logger.info("config reloaded: %d policies (%s)", len(chain), ", ".join(p.name for p in chain) or "none")
        return True

    # -- SIGUSR1 ---------------------------------------------------------------------------

    def handle_usr1(self) -> None:
        self.reopen()

    def reopen(self) -> None:
        """Reopen the audit files by their names: logrotate has moved the old ones away."""
        if self.audit is None:
            logger.info("SIGUSR1: no audit log to reopen")
            return
        self.audit.reopen()
        logger.info("SIGUSR1: audit files reopened")

    # -- SIGTTIN / SIGTTOU -----------------------------------------------------------------

    def handle_ttin(self) -> None:
        self.scale(up=True, signame="SIGTTIN")

    def handle_ttou(self) -> None:
        self.scale(up=False, signame="SIGTTOU")

    def scale(self, up: bool, signame: str = "") -> None:
        what = "add_worker" if up else "remove_worker"
        method = getattr(self.backend, what, None)
        loop = self.server.loop
        if method is None or loop is None:
            logger.warning("%s: cannot %s: the backend is not a worker pool", signame, what)
            return
        logger.info("%s: %s", signame, what)
        if inspect.iscoroutinefunction(method):
            future = asyncio.run_coroutine_threadsafe(method(), loop)
            future.add_done_callback(lambda f: self._scaled(what, f))
        else:
            loop.call_soon_threadsafe(method)

    def _scaled(self, what: str, future: concurrent.futures.Future[Any]) -> None:
        if future.cancelled():
            logger.warning("%s cancelled", what)
        elif future.exception() is not None:
            logger.error("%s failed: %s", what, future.exception())
        else:
            logger.info("%s done: %s workers ready", what, getattr(self.backend, "ready_count", "?"))


def _metrics_host(host: str) -> str:
    """The metrics server's address for the gRPC `host` setting ([::] binds IPv6 and IPv4)."""
    return "127.0.0.1" if host == "localhost" else host.strip("[]")


async def _awaited(awaitable: Any) -> Any:
    return await awaitable
