"""The admin commands of `pacsys-supervisor`: check-config, probe, status and explain.

    pacsys-supervisor check-config FILE        validate a config file completely; exit 0 or 2
    pacsys-supervisor probe [--addr HOST:PORT] [--service NAME] [--timeout S] [--wait] [--pid PID]
                                               grpc.health.v1 Check: exit 0 SERVING,
                                               1 not serving (or not process PID), 2 unreachable
    pacsys-supervisor status [--addr HOST:PORT] [--json] [--timeout S] [--token-file FILE]
                                 (probe and status: --ca FILE [--cert FILE --key FILE] [--server-name NAME] for TLS)
    pacsys-supervisor explain [--config FILE] [--identity ID] [--method Read|Set] DRF[=VALUE]...
                                               which policy decides a request, and why

They run without a service in this process: check-config reads the file, probe and status ask
a running service over gRPC, explain evaluates the policies offline (`explain.py`).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from pacsys.pool.stats import WorkerRow
from pacsys.settings import FIELDS, env_settings, read_config_file, setting_sources, settings_from
from pacsys.supervised._arguments import ArgumentParser
from pacsys.supervised.example_config import toml_value
from pacsys.supervised.policy_config import build_policies, write_gate
from pacsys.supervised.reporting import EXIT_USAGE, PROG, counted, report_error
from pacsys.supervised.startup_checks import check_files, resolve_admin_token, resolve_token, tls_files


def number_type(kind: type) -> Any:
    """An argparse `type` for int or float whose error names what was expected."""
    what = "an integer" if kind is int else "a number"

    def parse(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None

    parse.__name__ = kind.__name__
    return parse


# -- check-config --------------------------------------------------------------------------------


def _check_config_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=f"{PROG} check-config",
        description="Validate a config file completely, with the PACSYS_SUPERVISOR_* environment applied: every "
        "setting, every policy, the backend spec's syntax (without building it), the token file and the audit "
        "files' directories. Exit 0 when valid, 2 otherwise. Then list every setting and where its value came from.",
    )
    parser.add_argument("file", metavar="FILE")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the summary line")
    return parser


def check_config(argv: list[str]) -> int:
    ns = _check_config_parser().parse_args(argv)
    try:
        env = env_settings()
        file_values = read_config_file(ns.file)
        overrides = {"config": ns.file}
        settings = settings_from(file_values, overrides, env=env, source=ns.file)
        resolve_token(settings)
        resolve_admin_token(settings)
        tls = tls_files(settings)
        certificate = tls.check() if tls is not None else None  # for its serial and validity below
        check_files(settings)
        chain = write_gate(settings, build_policies(settings))  # custom policy factories run last
    except Exception as exc:  # a message, never a traceback
        return report_error(exc)
    workers = "in process" if settings.workers == 0 else counted(settings.workers, "worker")
    writes = "writes denied" if not any(p.allows_writes for p in chain) else "writes granted by policy"
    policies = counted(len(settings.policies), "policy", "policies")
    print(
        f"{ns.file}: OK (backend {settings.backend}, {workers}, {policies}, {writes})",
        flush=True,
    )
    if tls is not None and certificate is not None:
        print(
            f"{tls.cert}: serial {certificate.serial}, valid from {certificate.not_before:%Y-%m-%d %H:%M} to "
            f"{certificate.not_after:%Y-%m-%d %H:%M} UTC, key {tls.key} matches it",
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
    parser = ArgumentParser(
        prog=f"{PROG} probe",
        description="grpc.health.v1 Check. Exit 0 when SERVING, 1 when not serving, 2 when unreachable.",
    )
    parser.add_argument("--addr", default="localhost:50051", metavar="HOST:PORT", help="default: %(default)s")
    parser.add_argument(
        "--service", default="", metavar="NAME", help="service to check (default: the whole server, '')"
    )
    parser.add_argument(
        "--timeout", type=number_type(float), default=5.0, metavar="S", help="seconds to wait (default: %(default)s)"
    )
    parser.add_argument(
        "--wait",
        action="store_true",
        help="ask again until SERVING or --timeout has passed (for scripts that start it)",
    )
    parser.add_argument(
        "--pid",
        type=number_type(int),
        metavar="PID",
        help="the service must be this process (a script's own server, $!): another one answering on the port "
        "is not SERVING (exit 1), and --wait ends as soon as PID has ended",
    )
    _tls_options(parser)
    return parser


def probe(argv: list[str]) -> int:
    ns = _probe_parser().parse_args(argv)
    deadline = time.monotonic() + ns.timeout
    while True:
        code, text = _check_health(ns, max(0.1, deadline - time.monotonic()))
        if code == 0 and ns.pid is not None:
            answering = _answering(ns, max(0.1, deadline - time.monotonic()))
            if answering != f"process {ns.pid}":
                code, text = 1, f"{ns.addr}: not process {ns.pid}: {answering} answers there (the port is taken)"
        remaining = deadline - time.monotonic()
        if code == 0 or not ns.wait or remaining <= 0:
            break
        if ns.pid is not None and not _running(ns.pid):
            text += f"; process {ns.pid} has ended (its own error above says why)"
            break
        time.sleep(min(0.2, remaining))  # a retry interval: nothing to wait on in a process not started
    print(text, flush=True)
    return code


def _answering(ns: argparse.Namespace, timeout: float) -> str:
    """Which process serves ns.addr, as its status view says ("process 1234"), or what else answers."""
    import json

    import grpc

    from pacsys.supervised._server import ADMIN_SERVICE

    with _open_channel(ns) as channel:
        try:
            view = json.loads(channel.unary_unary(f"/{ADMIN_SERVICE}/Status")(b"", timeout=timeout))
            answering = f"process {view['pid']}"
        except grpc.RpcError as exc:
            answering = f"a server without a pacsys-supervisor status view ({exc.code().name})"
        except (ValueError, KeyError, TypeError):
            answering = "a server whose status view is not pacsys-supervisor's"
    return answering


def _running(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


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
                return 2, f"{label}: unreachable ({code.name}: {details}){_hint(ns, details)}"
            if code == grpc.StatusCode.NOT_FOUND:
                return 1, f"{label}: NOT_SERVING (unknown service)"
            name = code.name if code is not None else "error"
            return 1, f"{label}: NOT_SERVING (health check failed: {name}: {details})"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return (0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1), f"{label}: {status}"


def _status_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=f"{PROG} status", description="Workers, pids, RSS, restarts, streams.")
    parser.add_argument("--addr", default="localhost:50051", metavar="HOST:PORT", help="default: %(default)s")
    parser.add_argument("--json", action="store_true", help="print the raw JSON view")
    parser.add_argument("--timeout", type=number_type(float), default=5.0, metavar="S", help="seconds to wait")
    parser.add_argument("--token-file", metavar="FILE", help="the admin (or service) token: needed from another host")
    _tls_options(parser)
    return parser


def subparsers() -> list[argparse.ArgumentParser]:
    """The admin commands' parsers (for the serve command's usage text)."""
    from pacsys.supervised.explain import explain_parser

    return [_check_config_parser(), _probe_parser(), _status_parser(), explain_parser()]


def status(argv: list[str]) -> int:
    ns = _status_parser().parse_args(argv)
    import json

    import grpc

    from pacsys.supervised._server import ADMIN_SERVICE
    from pacsys.token_file import TokenFileError, read_token_file

    try:
        metadata = None
        if ns.token_file:
            metadata = [("authorization", f"Bearer {read_token_file(ns.token_file)}")]
        channel = _open_channel(ns)
    except (OSError, TokenFileError) as exc:
        return report_error(exc)
    with channel:
        try:
            raw = channel.unary_unary(f"/{ADMIN_SERVICE}/Status")(b"", timeout=ns.timeout, metadata=metadata)
        except grpc.RpcError as exc:
            print(f"{ns.addr}: unreachable ({exc.code().name}: {exc.details()}){_hint(ns, exc.details())}", flush=True)
            return 2
    view = json.loads(raw)
    print(json.dumps(view, indent=2) if ns.json else render_status(view), flush=True)
    return 0


def _tls_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ca", metavar="FILE", help="CA certificate of a service that serves TLS")
    parser.add_argument("--cert", metavar="FILE", help="client certificate, for a service that does mutual TLS")
    parser.add_argument("--key", metavar="FILE", help="the client certificate's key")
    parser.add_argument(
        "--server-name",
        metavar="NAME",
        help="the name the service's certificate must hold (default: the host of --addr); for an address "
        "its certificate does not name, such as a tunnel's or 127.0.0.1",
    )


def _tls(ns: argparse.Namespace) -> bool:
    return bool(ns.ca or ns.cert or ns.key or ns.server_name)


# Why a probe found nothing, in the words of the options that fix it: (TLS asked, what gRPC said, hint).
_HINTS = (
    (False, "Socket closed", "the service may serve TLS: pass --ca FILE (and --cert, --key for mutual TLS)"),
    (True, "WRONG_VERSION_NUMBER", "the service may serve plaintext: leave out --ca, --cert, --key and --server-name"),
    (
        True,
        "Hostname Verification Check failed",
        "the certificate names neither this host nor --server-name: pass --server-name NAME, a name it holds",
    ),
    (True, "CERTIFICATE_VERIFY_FAILED", "the service's certificate is not signed by the CA of --ca"),
    (True, "Socket closed", "the service may ask for a client certificate (mutual TLS): pass --cert and --key"),
)


def _hint(ns: argparse.Namespace, details: str | None) -> str:
    for tls, said, hint in _HINTS:
        if tls == _tls(ns) and said in (details or ""):
            return f"; hint: {hint}"
    return ""


def _open_channel(ns: argparse.Namespace) -> Any:
    """A channel to ns.addr: TLS when --ca, --cert, --key or --server-name is given (OSError for a file)."""
    import grpc

    if not _tls(ns):
        return grpc.insecure_channel(ns.addr)

    def read(path: str | None) -> bytes | None:
        if path is None:
            return None
        with open(path, "rb") as f:
            return f.read()

    credentials = grpc.ssl_channel_credentials(read(ns.ca), read(ns.key), read(ns.cert))
    options = [("grpc.ssl_target_name_override", ns.server_name)] if ns.server_name else []
    return grpc.secure_channel(ns.addr, credentials, options=options)


def render_status(view: dict[str, Any]) -> str:
    """The status view as an operator reads it: totals, the streams most behind, then the workers."""
    requests = view.get("requests", {})
    lines = [
        f"{view['address']}  pid {view['pid']}  up {view['uptime']:.0f}s  {'READY' if view['ready'] else 'NOT READY'}"
        f"  backend {view['backend']}",
        f"streams {view['active_streams']}  readings delivered {view['readings_delivered']}"
        f"  dropped {view['readings_dropped']}  queued {view.get('queued_bytes', 0)} bytes  requests "
        + (", ".join(f"{k}={v}" for k, v in sorted(requests.items())) or "none"),
    ]
    streams = view.get("streams") or []
    if streams:
        lines.append(f"open streams, most behind first ({len(streams)} of {view['active_streams']}):")
        header = ("peer", "drfs", "age_s", "delivered", "dropped", "queued", "queued_bytes")
        lines += _table(header, [tuple(str(s.get(k, "")) for k in header) for s in streams])
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
            str(w.slot),
            w.state.value,
            str(w.pid or "-"),
            str(w.devices),
            str(w.subscriptions),
            str(w.in_flight),
            f"{w.rss_bytes / 2**20:.1f}" if w.rss_bytes is not None else "-",
            f"{w.cpu_seconds:.1f}" if w.cpu_seconds is not None else "-",
            str(w.restarts),
            " ".join(x for x in (w.last_exit, w.last_exit_detail) if x) or "-",
            f"{w.next_start_in:.1f}s" if w.next_start_in is not None else "-",
            f"{w.next_backoff:g}s",
            str(w.restart_budget_left),
        )
        for w in msgspec.convert(workers, list[WorkerRow])
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


# -- explain ---------------------------------------------------------------------------------------


def explain(argv: list[str]) -> int:
    from pacsys.supervised.explain import main as explain_main  # its own imports, only when asked

    return explain_main(argv)


# The admin commands, by the first word of the command line.
COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "check-config": check_config,
    "probe": probe,
    "status": status,
    "explain": explain,
}
