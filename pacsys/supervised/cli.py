"""The `pacsys-supervisor` command: the composition root of the service.

    pacsys-supervisor [serve options]          serve DAQ (the default; `serve` may be given)
    pacsys-supervisor check-config FILE        validate a config file completely; exit 0 or 2
    pacsys-supervisor probe [--addr HOST:PORT] [--service NAME] [--timeout S] [--wait]
                                               grpc.health.v1 Check: exit 0 SERVING,
                                               1 not serving, 2 unreachable
    pacsys-supervisor status [--addr HOST:PORT] [--json] [--timeout S] [--token-file FILE]
                                 (probe and status: --ca FILE [--cert FILE --key FILE] for TLS)
    pacsys-supervisor explain [--config FILE] [--identity ID] --method Read|Set DRF[=VALUE]...
                                               which policy decides a request, and why
    pacsys-supervisor --version

The serve options are derived from `pacsys.supervised.config.Settings` (one option per
setting whose metadata has ``flag``, and one ``PACSYS_SUPERVISOR_<SETTING>`` environment
variable each); the command line wins over the environment, which wins over the config file.
Exit status: 0 after a clean stop, 2 for a usage or configuration error, 3 for a start that
failed (port in use, audit log not writable, backend that cannot be built, workers not
ready). Serving, the main thread waits for signals:

    SIGINT, SIGTERM   drain and stop, exit 0 (a second one exits at once)
    SIGHUP            re-read the config file; on success swap the policy chain atomically,
                      on failure log why at ERROR and keep the old chain
    SIGUSR1           reopen the audit files (after logrotate moved them)
    SIGTTIN, SIGTTOU  add or remove a worker (when the backend is a worker pool)

This module is the only place in `pacsys` that imports `workers`, lazily, when workers > 0.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import dataclasses
import importlib.metadata
import inspect
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any

from pacsys.supervised import _systemd as systemd
from pacsys.supervised.config import (
    FIELDS,
    ConfigError,
    Settings,
    check_files,
    env_name,
    env_settings,
    field_kind,
    flag_name,
    limits,
    read_config_file,
    resolve_admin_token,
    resolve_token,
    setting_sources,
    settings_from,
    tls_files,
    toml_value,
)
from pacsys.supervised.policy_config import build_policies, write_gate
from workers.logformat import configure_logging, journal_prefix

logger = logging.getLogger("pacsys.supervised")

PROG = "pacsys-supervisor"
DISTRIBUTION = "pacsys-supervisor"
SUBCOMMANDS = ("check-config", "probe", "status", "explain")

EXIT_USAGE = 2  # bad options, a bad config file or environment variable: fix it, do not retry
EXIT_START_FAILED = 3  # a good configuration that could not start here: port, files, backend, workers
EXIT_UNREADY = 4  # unready_exit: the pool was not ready for unready_limit seconds; restart the service

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


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args and args[0] == "check-config":
            return _check_config(args[1:])
        if args and args[0] == "probe":
            return _probe(args[1:])
        if args and args[0] == "status":
            return _status(args[1:])
        if args and args[0] == "explain":
            from pacsys.supervised.explain import main as explain

            return explain(args[1:])
        if args and args[0] == "serve":
            args = args[1:]
        return _serve(args)
    except SystemExit as exc:  # argparse: --help, --version, or a usage error (already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE


def version() -> str:
    """The installed distribution's version (from its metadata)."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _error(exc: BaseException | str, code: int = EXIT_USAGE) -> int:
    if isinstance(exc, str):
        text = exc
    elif isinstance(exc, ValueError | OSError | TimeoutError | RuntimeError) and str(exc):
        text = str(exc)
    else:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if _json_logging:
        logger.error("%s: error: %s", PROG, text)  # with --log-format json, every line is JSON
    else:
        print(f"{journal_prefix(logging.ERROR)}{PROG}: error: {text}", file=sys.stderr, flush=True)
    return code


_json_logging = False


def _configure_logging(settings: Settings) -> None:
    """The front's log format, exported for the workers (they inherit the environment)."""
    global _json_logging
    configure_logging(settings.log_level, settings.log_format, max_value_chars=settings.log_value_chars)
    _json_logging = settings.log_format == "json"
    # Whatever else Python would print on stderr becomes a log record too: warnings, and the
    # traceback of an exception nothing caught (in the main thread or another one).
    logging.captureWarnings(True)
    sys.excepthook = lambda kind, exc, tb: logger.critical("uncaught exception", exc_info=(kind, exc, tb))
    threading.excepthook = lambda a: logger.error(
        "uncaught exception in thread %s",
        a.thread.name if a.thread else "?",
        exc_info=(a.exc_type, a.exc_value or a.exc_type(), a.exc_traceback),
    )
    for name in ("log_format", "log_value_chars"):
        os.environ[env_name(name)] = str(getattr(settings, name))


# -- serve options, derived from Settings ---------------------------------------------------------


def _number(kind: type) -> Any:
    what = "an integer" if kind is int else "a number"

    def parse(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None

    parse.__name__ = kind.__name__
    return parse


def _default_text(f: dataclasses.Field[Any]) -> str:
    if f.default is None:
        return "unset"
    if isinstance(f.default, tuple):
        return " ".join(f.default) or "none"
    if isinstance(f.default, bool):
        return "on" if f.default else "off"
    return str(f.default)


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        usage=f"{PROG} [serve] [options]\n"
        + "\n".join(f"       {sub.format_usage()[7:].rstrip()}" for sub in _subparsers()),
        description="Serve the DAQ gRPC service with policies, audit and supervised backend workers.",
        epilog=(
            "Every option is also an environment variable, PACSYS_SUPERVISOR_<SETTING> (e.g.\n"
            "PACSYS_SUPERVISOR_WORKERS=4). The command line wins over the environment, which wins\n"
            "over the config file. Writes are denied unless --allow-writes or a policy grants them.\n\n"
            "exit status: 0 stopped cleanly, 2 usage or configuration error, 3 the start failed\n"
            "(port in use, audit log not writable, backend that cannot be built, workers not ready)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {version()}")
    groups: dict[str, Any] = {}
    exclusive: Any = None
    for f in dataclasses.fields(Settings):
        md = f.metadata
        if not md["flag"]:
            continue
        group = groups.get(md["section"])
        if group is None:
            group = groups[md["section"]] = parser.add_argument_group(md["section"].lower())
        if f.name in ("token", "token_file"):
            if exclusive is None:
                exclusive = group.add_mutually_exclusive_group()
            group = exclusive
        kind, _ = field_kind(f.name)
        help_text = f"{md['help']} (default: {_default_text(f)})".replace("%", "%%")
        names = [flag_name(f.name)] + (["-c"] if f.name == "config" else [])
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": help_text}
        if md["metavar"]:
            kwargs["metavar"] = md["metavar"]
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind is tuple:
            kwargs.update(nargs="+", action="extend")
        elif kind is int or kind is float:
            kwargs["type"] = _number(kind)
            kwargs.setdefault("metavar", "N" if kind is int else "X")
        elif md["choices"]:
            kwargs["metavar"] = "{" + ",".join(c.lower() if f.name == "log_level" else c for c in md["choices"]) + "}"
        group.add_argument(*names, **kwargs)
    return parser


def overrides_from(ns: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line, by field name."""
    return {name: getattr(ns, name) for name in FIELDS if getattr(ns, name, None) is not None}


def _serve(argv: list[str]) -> int:
    ns = serve_parser().parse_args(argv)
    overrides = overrides_from(ns)
    try:
        env = env_settings()
        config = overrides.get("config") or env.get("config")
        file_values = read_config_file(config) if config else {}
        settings = settings_from(file_values, overrides, env=env, source=config)
    except ConfigError as exc:
        return _error(exc)
    _configure_logging(settings)
    return _Service(settings, overrides, env).run()


class _Service:
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
            return _error(exc)
        try:
            if s.audit_path is not None:
                self.audit = AuditLog(s.audit_path, s.audit_proto_path, s.audit_log_responses, s.audit_flush_interval)
        except (OSError, ValueError) as exc:
            return _error(f"cannot open the audit log: {exc}", EXIT_START_FAILED)
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
                return _error(exc, EXIT_START_FAILED)
            tune_gc_for_serving()
            banner = f"{PROG}: serving DAQ on {s.host}:{self.server.port} ({self._describe()})"
            if _json_logging:
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
        for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1", "SIGTTIN", "SIGTTOU"):
            signum = getattr(signal, name, None)
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
                    return _error("the server stopped unexpectedly (see the log)", EXIT_START_FAILED)
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
            name = signal.Signals(signum).name
            if signum in (signal.SIGINT, signal.SIGTERM):
                self.stopping = True
                logger.info("%s: shutting down (grace %g s)", name, self.settings.shutdown_grace)
                systemd.notify("STOPPING=1")
                self.server.stop()
                return 0
            if signum == getattr(signal, "SIGHUP", None):
                self.reload()
            elif signum == getattr(signal, "SIGUSR1", None):
                self.reopen()
            elif signum in (getattr(signal, "SIGTTIN", None), getattr(signal, "SIGTTOU", None)):
                self.scale(up=signum == signal.SIGTTIN, signame=name)

    # -- SIGHUP ----------------------------------------------------------------------------

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
            _configure_logging(new)
        self.server.servicer.log_requests = new.log_requests
        self.settings = dataclasses.replace(old, **{k: getattr(new, k) for k in RELOADABLE})
        pending = [k for k in FIELDS if k not in RELOADABLE and getattr(new, k) != getattr(old, k)]
        if pending:
            logger.warning("config reload: changes to %s take effect at the next restart", ", ".join(pending))
        logger.info("config reloaded: %d policies (%s)", len(chain), ", ".join(p.name for p in chain) or "none")
        return True

    # -- SIGUSR1 ---------------------------------------------------------------------------

    def reopen(self) -> None:
        """Reopen the audit files by their names: logrotate has moved the old ones away."""
        if self.audit is None:
            logger.info("SIGUSR1: no audit log to reopen")
            return
        self.audit.reopen()
        logger.info("SIGUSR1: audit files reopened")

    # -- SIGTTIN / SIGTTOU -----------------------------------------------------------------

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


# -- check-config --------------------------------------------------------------------------------


def _check_config_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} check-config",
        description="Validate a config file completely, with the PACSYS_SUPERVISOR_* environment applied: every "
        "setting, every policy, the backend spec's syntax (without building it), the token file and the audit "
        "files' directories. Exit 0 when valid, 2 otherwise. Then list every setting and where its value came from.",
    )
    parser.add_argument("file", metavar="FILE")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the summary line")
    return parser


def _check_config(argv: list[str]) -> int:
    ns = _check_config_parser().parse_args(argv)
    try:
        env = env_settings()
        file_values = read_config_file(ns.file)
        overrides = {"config": ns.file}
        settings = settings_from(file_values, overrides, env=env, source=ns.file)
        resolve_token(settings)
        resolve_admin_token(settings)
        tls_files(settings)
        check_files(settings)
        chain = write_gate(settings, build_policies(settings))  # custom policy factories run last
    except Exception as exc:  # a message, never a traceback
        return _error(exc)
    workers = "in process" if settings.workers == 0 else f"{settings.workers} workers"
    writes = "writes denied" if not any(p.allows_writes for p in chain) else "writes granted by policy"
    print(
        f"{ns.file}: OK (backend {settings.backend}, {workers}, {len(settings.policies)} policies, {writes})",
        flush=True,
    )
    if not ns.quiet:
        sources = setting_sources(file_values, overrides, env)
        rows = [(name, _shown(name, getattr(settings, name)), sources[name]) for name in FIELDS]
        print("\n".join(_table(("setting", "value", "from"), rows)), flush=True)
    return 0


def _shown(name: str, value: Any) -> str:
    if value is None:
        return "unset"
    if name == "token":
        return "(hidden)"
    if name == "policies":
        return ", ".join(t.get("name", t["type"]) for t in value) or "none"
    return toml_value(value)


# -- probe and status ----------------------------------------------------------------------------


def _probe_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} probe",
        description="grpc.health.v1 Check. Exit 0 when SERVING, 1 when not serving, 2 when unreachable.",
    )
    parser.add_argument("--addr", default="localhost:50051", metavar="HOST:PORT", help="default: %(default)s")
    parser.add_argument(
        "--service", default="", metavar="NAME", help="service to check (default: the whole server, '')"
    )
    parser.add_argument(
        "--timeout", type=_number(float), default=5.0, metavar="S", help="seconds to wait (default: %(default)s)"
    )
    parser.add_argument(
        "--wait",
        action="store_true",
        help="ask again until SERVING or --timeout has passed (for scripts that start it)",
    )
    _tls_options(parser)
    return parser


def _probe(argv: list[str]) -> int:
    ns = _probe_parser().parse_args(argv)
    deadline = time.monotonic() + ns.timeout
    while True:
        code, text = _check_health(ns, max(0.1, deadline - time.monotonic()))
        remaining = deadline - time.monotonic()
        if code == 0 or not ns.wait or remaining <= 0:
            break
        time.sleep(min(0.2, remaining))  # a retry interval: nothing to wait on in a process not started
    print(text, flush=True)
    return code


def _check_health(ns: argparse.Namespace, timeout: float) -> tuple[int, str]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    label = f"{ns.addr}" + (f" ({ns.service})" if ns.service else "")
    try:
        channel = _open_channel(ns)
    except OSError as exc:
        return EXIT_USAGE, f"{label}: cannot read a TLS file: {exc}"
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=ns.service), timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return 2, f"{label}: unreachable ({code.name}: {details})"
            if code == grpc.StatusCode.NOT_FOUND:
                return 1, f"{label}: NOT_SERVING (unknown service)"
            name = code.name if code is not None else "error"
            return 1, f"{label}: NOT_SERVING (health check failed: {name}: {details})"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return (0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1), f"{label}: {status}"


def _status_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"{PROG} status", description="Workers, pids, RSS, restarts, streams.")
    parser.add_argument("--addr", default="localhost:50051", metavar="HOST:PORT", help="default: %(default)s")
    parser.add_argument("--json", action="store_true", help="print the raw JSON view")
    parser.add_argument("--timeout", type=_number(float), default=5.0, metavar="S", help="seconds to wait")
    parser.add_argument("--token-file", metavar="FILE", help="the admin (or service) token: needed from another host")
    _tls_options(parser)
    return parser


def _subparsers() -> list[argparse.ArgumentParser]:
    return [_check_config_parser(), _probe_parser(), _status_parser()]


def _status(argv: list[str]) -> int:
    ns = _status_parser().parse_args(argv)
    import json

    import grpc

    from pacsys.supervised._server import ADMIN_SERVICE

    try:
        metadata = None
        if ns.token_file:
            with open(ns.token_file, encoding="utf-8") as f:
                metadata = [("authorization", f"Bearer {f.read().strip()}")]
        channel = _open_channel(ns)
    except OSError as exc:
        return _error(exc)
    with channel:
        try:
            raw = channel.unary_unary(f"/{ADMIN_SERVICE}/Status")(b"", timeout=ns.timeout, metadata=metadata)
        except grpc.RpcError as exc:
            print(f"{ns.addr}: unreachable ({exc.code().name}: {exc.details()})", flush=True)
            return 2
    view = json.loads(raw)
    print(json.dumps(view, indent=2) if ns.json else render_status(view), flush=True)
    return 0


def _tls_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ca", metavar="FILE", help="CA certificate of a service that serves TLS")
    parser.add_argument("--cert", metavar="FILE", help="client certificate, for a service that does mutual TLS")
    parser.add_argument("--key", metavar="FILE", help="the client certificate's key")


def _open_channel(ns: argparse.Namespace) -> Any:
    """A channel to ns.addr: TLS when --ca, --cert or --key is given (OSError for a file)."""
    import grpc

    if not (ns.ca or ns.cert or ns.key):
        return grpc.insecure_channel(ns.addr)

    def read(path: str | None) -> bytes | None:
        if path is None:
            return None
        with open(path, "rb") as f:
            return f.read()

    return grpc.secure_channel(ns.addr, grpc.ssl_channel_credentials(read(ns.ca), read(ns.key), read(ns.cert)))


def render_status(view: dict[str, Any]) -> str:
    """The status view as an operator reads it: totals, the streams most behind, then the workers."""
    requests = view.get("requests", {})
    lines = [
        f"{view['address']}  pid {view['pid']}  up {view['uptime']:.0f}s  {'READY' if view['ready'] else 'NOT READY'}"
        f"  backend {view['backend']}",
        f"streams {view['active_streams']}  readings delivered {view['readings_delivered']}"
        f"  dropped {view['readings_dropped']}  requests "
        + (", ".join(f"{k}={v}" for k, v in sorted(requests.items())) or "none"),
    ]
    streams = view.get("streams") or []
    if streams:
        lines.append(f"open streams, most behind first ({len(streams)} of {view['active_streams']}):")
        header = ("peer", "drfs", "age_s", "delivered", "dropped", "queued")
        lines += _table(header, [tuple(str(s[k]) for k in header) for s in streams])
    workers = view.get("workers")
    if workers is None:
        return "\n".join(lines)
    lines.append(f"backend subscriptions {view.get('backend_subscriptions')}")
    columns = (
        "slot",
        "state",
        "pid",
        "devices",
        "subs",
        "in_flight",
        "rss_mb",
        "cpu_s",
        "restarts",
        "last_exit",
        "next_start",
        "backoff",
        "budget",
    )
    rows: list[tuple[str, ...]] = [
        (
            str(w["slot"]),
            w["state"],
            str(w["pid"] or "-"),
            str(w["devices"]),
            str(w["subscriptions"]),
            str(w["in_flight"]),
            f"{w['rss_bytes'] / 2**20:.1f}" if "rss_bytes" in w else "-",
            f"{w['cpu_seconds']:.1f}" if "cpu_seconds" in w else "-",
            str(w["restarts"]),
            " ".join(x for x in (w["last_exit"], w["last_exit_detail"]) if x) or "-",
            f"{w['next_start_in']:.1f}s" if w["next_start_in"] is not None else "-",
            f"{w['next_backoff']:g}s",
            str(w["restart_budget_left"]),
        )
        for w in workers
    ]
    lines += _table(columns, rows)
    pool = view.get("pool")
    if pool:
        exits = ", ".join(f"{k}={v}" for k, v in sorted(pool["exits_by_reason"].items())) or "none"
        recycles = ", ".join(f"{k}={v}" for k, v in sorted(pool["recycles_by_reason"].items())) or "none"
        lines.append(
            f"exits {exits}  recycles {recycles}  cool-downs {pool['cooldowns']}"
            f"  calls waited {pool['calls_waited']} (unavailable {pool['calls_unavailable']})"
        )
        lines.append(
            f"reads retried {pool['reads_retried']}  writes outcome unknown {pool['writes_outcome_unknown']}"
            f"  stream gaps {pool['stream_gaps']}"
        )
    return "\n".join(lines)


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> list[str]:
    """Left-aligned columns as wide as their widest cell."""
    everything = [header, *rows]
    widths = [max(len(r[i]) for r in everything) for i in range(len(header))]
    return ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in everything]


if __name__ == "__main__":
    sys.exit(main())
