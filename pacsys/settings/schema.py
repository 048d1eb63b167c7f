"""The schema of every setting of `pacsys-supervisor`: the `Settings` struct, no I/O.

`Settings` is a frozen msgspec Struct. Each field carries its type and bounds (checked by
msgspec), its default, a one-line help text and where it shows (`setting(...)`, a
`msgspec.Meta` whose `extra` holds the section, the flag, the example ...). Building one
checks every field and the rules between them, and raises `ConfigError` naming the key:
``Settings(port=70000)`` -> ``'port' must be an integer from 0 to 65535, got 70000``.
Everything else derives from it: the command line options (`pacsys.supervised.cli`), the
file, the environment and their layering (`pacsys.settings.sources`), and the commented
example file (`pacsys.supervised.example_config`).

How to add a setting: declare one field in its section below, its metadata beside it,

    name: Annotated[int, setting("One line of help.", section="Limits", ge=1)] = 100

(`Annotated[str, setting(...)] | None = None` for one that may be unset; `flag=False` keeps
it off the command line and the environment, `in_file=False` out of the file). A rule
between settings goes in `Settings.__post_init__`. Then regenerate the example file:
``python -m pacsys.supervised.example_config > ops/supervisor.example.toml``.
"""

from __future__ import annotations

import ipaddress
import typing
from typing import Annotated, Any, Literal

import msgspec

from pacsys.backends.spec import FORMS, check_backend_spec
from pacsys.settings.field import ConfigError, Field, field_of, flag_name, range_text, setting

__all__ = ["FIELDS", "POLICY_TYPES", "ConfigError", "Field", "Settings", "flag_name", "range_text", "setting"]


# -- checks used in the field metadata ---------------------------------------------------------


def _check_host(host: str) -> str | None:
    if not host:
        return "must not be empty"
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        return f"needs an IPv6 address in brackets, e.g. [::1], got {host!r}"
    return None


def _check_patterns(patterns: tuple[str, ...]) -> str | None:
    return "must not contain empty patterns" if any(not p.strip() for p in patterns) else None


def _check_networks(networks: tuple[str, ...]) -> str | None:
    # Strict: "10.0.0.5/24" is refused rather than read as the whole 10.0.0.0/24.
    for text in networks:
        try:
            ipaddress.ip_network(text.strip().strip("[]"))
        except ValueError as exc:
            return f"must hold IP addresses or networks (e.g. 10.0.0.5 or 10.0.0.0/24), got {text!r}: {exc}"
    return None


# The [[policies]] table types, by name; `pacsys.supervised.policy_config` builds each (a test
# keeps the two lists equal). The schema checks only a table's structure and type name.
POLICY_TYPES = ("read_only", "device_access", "write_grant", "rate_limit", "value_range", "slew_rate", "custom")


def _check_policy_tables(tables: tuple[dict[str, Any], ...]) -> None:
    for i, table in enumerate(tables):
        kind = table.get("type")
        if kind is None:
            raise ConfigError.of(f"policies[{i}]", f"needs a 'type': one of {', '.join(POLICY_TYPES)}")
        if kind not in POLICY_TYPES:
            raise ConfigError.of(f"policies[{i}]", f"has unknown type {kind!r}: use one of {', '.join(POLICY_TYPES)}")


LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


# -- the settings ------------------------------------------------------------------------------


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """The configuration of one `pacsys-supervisor` process (checked on construction)."""

    # One field per setting, in sections (the example file's and --help's). Formatted by hand:
    # fmt: off
    # server
    config: Annotated[str, setting(
        "The TOML config file (re-read on SIGHUP).", section="Server", in_file=False, metavar="FILE"
    )] | None = None
    host: Annotated[str, setting(
        "Address to listen on ([::] is every address, IPv4 included).", section="Server", check=_check_host
    )] = "[::]"
    port: Annotated[int, setting(
        "Port of the DAQ service, health and reflection (0 picks a free one).", section="Server", ge=0, le=65535
    )] = 50051
    metrics_port: Annotated[int, setting(
        "Port of the HTTP /metrics, /healthz and /readyz endpoint (unset: none; 0 picks a free one).",
        section="Server", ge=0, le=65535, example=9109,
    )] | None = None
    metrics_max_connections: Annotated[int, setting(
        "Most connections the metrics port holds at once (a newcomer closes the one silent longest).",
        section="Server", ge=1,
    )] = 64
    metrics_max_connections_per_address: Annotated[int, setting(
        "Most connections the metrics port holds from one host address (a newcomer closes its oldest silent one).",
        section="Server", ge=1,
    )] = 8
    metrics_timeout: Annotated[float, setting(
        "Seconds a metrics connection has to send its request and take the answer.", section="Server", gt=0
    )] = 5.0
    max_message_bytes: Annotated[int, setting(
        "Largest request message accepted, in bytes.", section="Server", ge=1024, le=2**31 - 1
    )] = 4 * 1024 * 1024
    accept_loops: Annotated[int, setting(
        "gRPC servers sharing the service port in the front (SO_REUSEPORT; connections are spread over them), each "
        "taking new calls one at a time: more take new calls faster when the front is saturated.",
        section="Server", ge=1, le=64,
    )] = 16
    shutdown_grace: Annotated[float, setting(
        "Seconds one-shot calls get to finish on SIGTERM/SIGINT before they are cancelled.", section="Server", ge=0
    )] = 5.0
    drain_delay: Annotated[float, setting(
        "Seconds to keep serving after reporting NOT_SERVING on SIGTERM/SIGINT, before the drain (load balancers).",
        section="Server", ge=0, le=3600,
    )] = 0.0
    reuse_port: Annotated[bool, setting(
        "Share port (and plaintext_port) with other pacsys-supervisor processes of this user that set it too "
        "(SO_REUSEPORT): the kernel spreads new connections over them; one that drains leaves the port at once and "
        "serves its connections until each was asked to reconnect (connection_max_age x 1.1 + 1 s, or drain_delay "
        "if longer). Off: a port in use fails the start.",
        section="Server",
    )] = False
    connection_max_age: Annotated[float, setting(
        "Seconds after which a client connection is asked to reconnect (HTTP/2 GOAWAY, give or take 10%): its calls "
        "and streams finish on it, new calls take a new connection. Spreads clients over instances sharing a port "
        "and moves them off one that drains. Unset: never, or 10 with reuse_port.",
        section="Server", gt=0, le=86400, example=10.0,
    )] | None = None
    plaintext_port: Annotated[int, setting(
        "Port of a second listener without TLS beside the TLS one (needs tls_cert), with the same services, for "
        "clients that speak plaintext only; a bearer token is refused there unless allow_token_plaintext "
        "(unset: none; 0 picks a free one).",
        section="Server", ge=0, le=65535, example=50052,
    )] | None = None

    # backend and workers
    backend: Annotated[str, setting(
        f"Backend: {FORMS} (keyword arguments for the factory; a value is read as JSON when it is JSON, "
        "else as text).",
        section="Backend and workers", check=check_backend_spec, metavar="SPEC",
    )] = "sim"
    workers: Annotated[int, setting(
        "Worker processes, each with its own backend (0 runs the backend in the front process).",
        section="Backend and workers", ge=0, le=1024,
    )] = 2
    worker_python: Annotated[str, setting(
        "Interpreter the workers run under, e.g. another venv's bin/python where the pacsys release is installed "
        "(unset: the front's own). It needs msgspec; the backend must then be a module:factory spec.",
        section="Backend and workers", example="/opt/pacsys-release/bin/python", metavar="PATH",
    )] | None = None
    threads_per_worker: Annotated[int, setting(
        "Threads for the calls of a sync backend, per worker (or in the front process).",
        section="Backend and workers", ge=1, le=4096,
    )] = 16
    event_loop: Annotated[Literal["auto", "uvloop", "asyncio"], setting(
        "Event loop of the front and the workers: auto (uvloop when installed), uvloop or asyncio.",
        section="Backend and workers", normalize=str.lower,
    )] = "auto"
    min_workers_ready: Annotated[int, setting(
        "Workers that must be ready before the service reports SERVING.", section="Backend and workers", ge=1
    )] = 1
    ready_timeout: Annotated[float, setting(
        "Seconds to wait at startup for min_workers_ready workers.", section="Backend and workers", gt=0
    )] = 30.0
    subscription_linger: Annotated[float, setting(
        "Seconds an upstream subscription outlives its last client (so a reconnect reuses it).",
        section="Backend and workers", ge=0,
    )] = 2.0

    # security
    token: Annotated[str, setting(
        "Bearer token clients must present (prefer token_file: a file is not on the command line).",
        section="Security", example="change-me", metavar="TOKEN",
    )] | None = None
    token_file: Annotated[str, setting(
        "File holding the bearer token (surrounding whitespace is stripped).",
        section="Security", example="/etc/pacsys/token", metavar="FILE",
    )] | None = None
    allow_writes: Annotated[tuple[str, ...], setting(
        "Device glob patterns clients may write; writes are denied unless granted here or by a policy.",
        section="Security", check=_check_patterns, example=["Z:ACLTS*"], metavar="PATTERN",
    )] = ()
    admin_token_file: Annotated[str, setting(
        "File holding the token of the Admin/Status RPC (unset: the bearer token); without a token it answers local"
        " clients only.",
        section="Security", example="/etc/pacsys/admin.token", metavar="FILE",
    )] | None = None
    allow_token_plaintext: Annotated[bool, setting(
        "Accept a bearer token over a connection without TLS (unset: only when host is a loopback address).",
        section="Security", example=False,
    )] | None = None
    trusted_proxies: Annotated[tuple[str, ...], setting(
        "Addresses or networks of proxies whose x-forwarded-for header is believed: a call from one of them is "
        "the client the header's last address names (per-client limits, grants, the status view, the audit). "
        "Empty: the header is ignored.",
        section="Security", check=_check_networks, example=["10.0.0.5", "192.168.7.0/24"], metavar="NETWORK",
    )] = ()
    tls_cert: Annotated[str, setting(
        "PEM certificate chain of the service: serve TLS (re-read on SIGHUP; needs tls_key).",
        section="Security", example="/etc/pacsys/tls/server.crt", metavar="FILE",
    )] | None = None
    tls_key: Annotated[str, setting(
        "PEM private key of tls_cert (re-read on SIGHUP).",
        section="Security", example="/etc/pacsys/tls/server.key", metavar="FILE",
    )] | None = None
    tls_client_ca: Annotated[str, setting(
        "PEM CA certificates of client certificates: mutual TLS, every client needs a certificate they signed, and "
        "its subject is the client's identity (needs tls_cert).",
        section="Security", example="/etc/pacsys/tls/clients-ca.crt", metavar="FILE",
    )] | None = None

    # logging
    log_level: Annotated[LogLevel, setting(
        "Log level: DEBUG, INFO, WARNING, ERROR or CRITICAL.", section="Logging", normalize=str.upper
    )] = "INFO"
    log_format: Annotated[Literal["kv", "json"], setting(
        "Log line format: kv (key=value) or json (one object per line).", section="Logging", normalize=str.lower
    )] = "kv"
    worker_log_level: Annotated[LogLevel, setting(
        "Log level of the worker processes: DEBUG, INFO, WARNING, ERROR or CRITICAL.",
        section="Logging", normalize=str.upper,
    )] = "WARNING"
    log_requests: Annotated[bool, setting(
        "Log every request at INFO (costs throughput).", section="Logging"
    )] = False
    refusal_log_interval: Annotated[float, setting(
        "Seconds between log lines for one client's refusals of one kind (the others are counted).",
        section="Logging", ge=0,
    )] = 10.0
    grpc_log_interval: Annotated[float, setting(
        "Seconds between gRPC core's log lines from one line of its code, and between other native stderr "
        "lines (the others are counted).",
        section="Logging", ge=0,
    )] = 10.0
    log_value_chars: Annotated[int, setting(
        "Longest value (a DRF, a peer, an error text) written into a log line, in characters; longer ones are cut.",
        section="Logging", ge=16,
    )] = 256

    # limits
    max_drfs_per_request: Annotated[int, setting(
        "Most DRFs in one Read request.", section="Limits", ge=1
    )] = 1000
    max_settings_per_request: Annotated[int, setting(
        "Most settings in one Set request.", section="Limits", ge=1
    )] = 100
    max_drf_length: Annotated[int, setting(
        "Longest DRF (or setting device) accepted, in characters.", section="Limits", ge=16
    )] = 512
    max_streams: Annotated[int, setting(
        "Most streaming Reads open at once.", section="Limits", ge=1
    )] = 10000
    max_streams_per_peer: Annotated[int, setting(
        "Most streams open at once from one client (identity or host).", section="Limits", ge=1
    )] = 1000
    max_health_watches: Annotated[int, setting(
        "Most grpc.health.v1.Health/Watch streams open at once (apart from max_streams: they cannot take its place).",
        section="Limits", ge=1,
    )] = 1000
    max_health_watches_per_peer: Annotated[int, setting(
        "Most Health/Watch streams open at once from one client (identity or host).", section="Limits", ge=1
    )] = 16
    max_calls_per_peer: Annotated[int, setting(
        "Most one-shot Reads and Sets in flight from one client.", section="Limits", ge=1
    )] = 100
    max_rate_hz: Annotated[float, setting(
        "Fastest periodic rate a DRF may ask for, in Hz (1440 Hz: ACNET's fastest data rate).", section="Limits", gt=0
    )] = 1440.0
    max_stream_rate: Annotated[float, setting(
        "Readings per second one stream may ask for (an event DRF counts 15/s); delivery is paced to it.",
        section="Limits", gt=0,
    )] = 5000.0
    max_peer_rate: Annotated[float, setting(
        "Readings per second all streams of one client may ask for and receive.", section="Limits", gt=0
    )] = 10000.0
    stream_buffer: Annotated[int, setting(
        "Readings queued per client stream before its oldest are dropped.", section="Limits", ge=1
    )] = 1000
    max_queued_bytes_per_peer: Annotated[int, setting(
        "Bytes of readings queued for one client's streams (identity or host); past it, its streams "
        "whose replies have gone unread for stalled_stream_seconds are ended (RESOURCE_EXHAUSTED).",
        section="Limits", ge=65536,
    )] = 32 * 2**20
    max_queued_bytes: Annotated[int, setting(
        "Bytes of readings queued for all client streams; past it, the clients holding the most lose, "
        "down to their share, their streams that have not caught up for stalled_stream_seconds.",
        section="Limits", ge=65536,
    )] = 512 * 2**20
    stalled_stream_seconds: Annotated[float, setting(
        "Seconds a stream's replies may go unread (or, for max_queued_bytes, the stream stay behind) "
        "before the queued-bytes budgets may end it.",
        section="Limits", ge=1,
    )] = 5.0

    # connections (the service port's HTTP/2 transport)
    max_connections: Annotated[int, setting(
        "Most connections to the service port at once; more are accepted and closed at once "
        "(0: the open-file limit minus a reserve for workers, audit, TLS and the metrics port).",
        section="Connections", ge=0,
    )] = 0
    max_connections_per_address: Annotated[int, setting(
        "Most connections from one client address; the newest beyond it are cut within a second (0: no limit).",
        section="Connections", ge=0,
    )] = 1000
    connections_per_address_exempt: Annotated[tuple[str, ...], setting(
        "Addresses or networks (CIDR) that max_connections_per_address does not apply to: your load balancers, "
        "which carry every client's connections from one address.",
        section="Connections", check=_check_networks, example=["10.0.0.5", "10.1.0.0/24"], metavar="ADDRESS",
    )] = ()
    connection_idle_timeout: Annotated[float, setting(
        "Seconds a connection without calls stays open; then it is closed (GOAWAY: clients reconnect on their "
        "next call; 0: never).",
        section="Connections", ge=0,
    )] = 300.0
    handshake_timeout: Annotated[float, setting(
        "Seconds a new connection has to finish its TLS handshake and HTTP/2 preface before it is closed.",
        section="Connections", gt=0,
    )] = 10.0
    max_concurrent_streams: Annotated[int, setting(
        "Most calls open at once on one connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS; a client queues "
        "the others); also gRPC's defence against streams reset as soon as they are opened.",
        section="Connections", ge=1,
    )] = 1000
    memory_release_bytes: Annotated[int, setting(
        "Bytes the front's memory may hold beyond what it uses before they are given back to the system "
        "(glibc's malloc_trim, looked at every 5 s): what a flood of connections or frames left behind (0: never).",
        section="Connections", ge=0,
    )] = 64 * 2**20

    # supervision
    ping_interval: Annotated[float, setting(
        "Seconds between pings of each worker's event loop.", section="Supervision", gt=0
    )] = 1.0
    hang_timeout: Annotated[float, setting(
        "Seconds without a ping answer after which a worker is killed and replaced.", section="Supervision", gt=0
    )] = 5.0
    restart_backoff_initial: Annotated[float, setting(
        "Seconds before a worker is started again after it ended (doubles while it keeps ending early).",
        section="Supervision", gt=0,
    )] = 0.1
    restart_backoff_max: Annotated[float, setting(
        "Longest wait before restarting a worker.", section="Supervision", gt=0
    )] = 5.0
    restart_stable_uptime: Annotated[float, setting(
        "A worker that served this many seconds before it ended is restarted after restart_backoff_initial and its "
        "exit does not count towards restart_intensity; one that ended sooner is a crash-loop suspect.",
        section="Supervision", gt=0,
    )] = 1.0
    restart_intensity: Annotated[int, setting(
        "Early exits (crash-loop suspects) allowed per worker slot within restart_period ...",
        section="Supervision", ge=0,
    )] = 5
    restart_period: Annotated[float, setting(
        "... seconds; one more cools the slot down (while another slot serves).", section="Supervision", gt=0
    )] = 60.0
    restart_cooldown_initial: Annotated[float, setting(
        "Seconds a slot cools down the first time; doubles on each repeated cool-down.", section="Supervision", gt=0
    )] = 10.0
    restart_cooldown_max: Annotated[float, setting(
        "Longest cool-down of a slot before it tries again.", section="Supervision", gt=0
    )] = 300.0
    worker_wait: Annotated[float, setting(
        "Seconds a Read or Set waits for a worker when none serves (never past the client's deadline); then "
        "UNAVAILABLE.",
        section="Supervision", ge=0,
    )] = 5.0
    unready_limit: Annotated[float, setting(
        "Seconds the pool may stay not ready (fewer than min_workers_ready workers serving) before liveness turns "
        "NOT_SERVING and the systemd watchdog stops, so that the service is restarted as a whole.",
        section="Supervision", gt=0,
    )] = 120.0
    unready_exit: Annotated[bool, setting(
        "After unready_limit not ready, drain and exit with status 4 instead of only reporting it (escalation to "
        "systemd or Kubernetes).",
        section="Supervision",
    )] = False

    # recycling
    recycle_rss_mb: Annotated[int, setting(
        "Replace a worker whose RSS passes this many MiB (0: off).", section="Recycling", ge=0
    )] = 0
    recycle_requests: Annotated[int, setting(
        "Replace a worker after this many requests (0: off).", section="Recycling", ge=0
    )] = 0
    recycle_jitter: Annotated[float, setting(
        "Random fraction added to the recycle limits so workers do not recycle together.",
        section="Recycling", ge=0, le=1,
    )] = 0.1

    # audit
    audit_path: Annotated[str, setting(
        "JSON-lines audit log of every request and decision (unset: no audit log).",
        section="Audit", example="/var/log/pacsys/audit.jsonl", metavar="FILE",
    )] | None = None
    audit_proto_path: Annotated[str, setting(
        "Binary capture of the raw request messages (needs audit_path).",
        section="Audit", example="/var/log/pacsys/audit.bin", metavar="FILE",
    )] | None = None
    audit_log_responses: Annotated[bool, setting(
        "Also record replies in the audit log.", section="Audit"
    )] = False
    audit_flush_interval: Annotated[int, setting(
        "Audit entries between flushes (1 flushes every entry; a Set's entry is always flushed).",
        section="Audit", ge=1,
    )] = 1
    allow_unaudited_writes: Annotated[bool, setting(
        "Make writes even while the audit log cannot record them (else they are refused with UNAVAILABLE).",
        section="Audit",
    )] = False
    audit_drf_chars: Annotated[int, setting(
        "Characters of a Read's DRF list written into its audit entry; the DRFs after them are recorded as "
        "their count and SHA-256 (drfs_left_out). A Set's entry is always whole.",
        section="Audit", ge=0,
    )] = 4096
    audit_client_bytes_per_second: Annotated[float, setting(
        "Audit bytes a second one client (identity or host) may add with Reads, refused requests and "
        "denials of Sets that needed no token; past it, and past audit_client_burst_bytes, its entries are "
        "summarised (counted, digested, one summary line per audit_summary_interval). 0: no limit. "
        "Sets that pass the token are always recorded in full.",
        section="Audit", ge=0,
    )] = 32768.0
    audit_client_burst_bytes: Annotated[int, setting(
        "Audit bytes one client may add at once above audit_client_bytes_per_second (an entry larger than "
        "this, with its binary capture frame, is always summarised).",
        section="Audit", ge=1024,
    )] = 32768
    audit_summary_interval: Annotated[float, setting(
        "Seconds a client's summarised requests are gathered before their summary line is written.",
        section="Audit", gt=0, le=3600,
    )] = 1.0
    audit_max_bytes: Annotated[int, setting(
        "Size at which the service rotates its audit files itself (audit.jsonl -> audit.jsonl.1 -> ..., the "
        "binary capture with it); 0: never, rotation is left to logrotate (SIGUSR1).",
        section="Audit", ge=0, example=268435456,
    )] = 0
    audit_keep: Annotated[int, setting(
        "Rotated files audit_max_bytes keeps (audit.jsonl.1 newest ... audit.jsonl.N); older ones are deleted.",
        section="Audit", ge=1, le=1000,
    )] = 10
    audit_min_free_bytes: Annotated[int, setting(
        "Free space on the audit files' filesystem below which a WARNING is logged (once a minute) and "
        "pacsys_audit_low_space is 1 (0: no warning).",
        section="Audit", ge=0,
    )] = 1 << 30
    audit_reserve_bytes: Annotated[int, setting(
        "Free space kept for Sets: below it, Reads and refused requests are only summarised "
        "(pacsys_audit_low_space 2); Sets are recorded in full until the disk is full (at most "
        "audit_min_free_bytes).",
        section="Audit", ge=0,
    )] = 256 << 20

    # policies
    policies: Annotated[tuple[dict[str, Any], ...], setting(
        "Policies, in order: [[policies]] tables (see below).",
        section="Policies", flag=False, check=_check_policy_tables,
    )] = ()
    # fmt: on

    def __post_init__(self) -> None:
        for f in FIELDS.values():
            value = getattr(self, f.name)
            checked = f.check(value)
            if checked is not value:
                msgspec.structs.force_setattr(self, f.name, checked)
        if self.token is not None and self.token_file is not None:
            raise ConfigError.of("token_file", "cannot be combined with 'token': give one of them")
        if self.workers > 0 and self.min_workers_ready > self.workers:
            raise ConfigError.of(
                "min_workers_ready", f"({self.min_workers_ready}) must not exceed 'workers' ({self.workers})"
            )
        if self.max_queued_bytes_per_peer > self.max_queued_bytes:
            raise ConfigError.of(
                "max_queued_bytes_per_peer",
                f"({self.max_queued_bytes_per_peer}) must not exceed 'max_queued_bytes' ({self.max_queued_bytes})",
            )
        if self.restart_cooldown_max < self.restart_cooldown_initial:
            raise ConfigError.of(
                "restart_cooldown_max",
                f"({self.restart_cooldown_max:g}) must not be below 'restart_cooldown_initial' "
                f"({self.restart_cooldown_initial:g})",
            )
        if self.worker_python is not None and self.workers == 0:
            raise ConfigError.of("worker_python", "needs workers >= 1 (with workers = 0 the front hosts the backend)")
        if self.restart_backoff_max < self.restart_backoff_initial:
            raise ConfigError.of(
                "restart_backoff_max",
                f"({self.restart_backoff_max:g}) must not be below 'restart_backoff_initial' "
                f"({self.restart_backoff_initial:g})",
            )
        if self.metrics_port and self.metrics_port == self.port:
            raise ConfigError.of("metrics_port", f"({self.metrics_port}) must differ from 'port'")
        if self.audit_proto_path is not None and self.audit_path is None:
            raise ConfigError.of("audit_proto_path", "needs 'audit_path' as well")
        if self.audit_reserve_bytes > self.audit_min_free_bytes:
            raise ConfigError.of(
                "audit_reserve_bytes",
                f"({self.audit_reserve_bytes}) must not exceed 'audit_min_free_bytes' ({self.audit_min_free_bytes}): "
                "the warning comes first",
            )
        if 0 < self.audit_max_bytes < 4096:
            raise ConfigError.of("audit_max_bytes", f"must be 0 (off) or at least 4096, got {self.audit_max_bytes}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError.of(
                "tls_key" if self.tls_key is None else "tls_cert", "needs 'tls_cert' and 'tls_key' both"
            )
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError.of("tls_client_ca", "needs 'tls_cert' and 'tls_key' (mutual TLS is TLS first)")
        if self.plaintext_port is not None:
            if self.tls_cert is None:
                raise ConfigError.of(
                    "plaintext_port",
                    "needs 'tls_cert' and 'tls_key': without TLS, 'port' is a plaintext listener already",
                )
            if self.tls_client_ca is not None:
                raise ConfigError.of(
                    "plaintext_port",
                    "cannot be combined with 'tls_client_ca': mutual TLS means that every client has a certificate",
                )
            if self.plaintext_port and self.plaintext_port in (self.port, self.metrics_port):
                other = "port" if self.plaintext_port == self.port else "metrics_port"
                raise ConfigError.of("plaintext_port", f"({self.plaintext_port}) must differ from {other!r}")

    def replace(self, **changes: Any) -> Settings:
        """A copy with `changes` (checked as a new one is)."""
        return msgspec.structs.replace(self, **changes)


_HINTS = typing.get_type_hints(Settings, include_extras=True)
FIELDS: dict[str, Field] = {info.name: field_of(info, _HINTS[info.name]) for info in msgspec.structs.fields(Settings)}
