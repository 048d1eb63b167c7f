"""Every setting of `pacsys-supervisor`, in one place.

`Settings` is a frozen dataclass; each field carries its default, a one-line help text and
its constraints in the field's metadata. Everything else is derived from it: the command
line options (`pacsys.supervised.cli`), the validation of the TOML file, and the commented
example file (`render_example()`, whose output is `ops/supervisor.example.toml`).

The TOML file is flat: its top-level keys are field names. Policies are an array of tables,
run in file order (the first denial wins)::

    port = 50051
    workers = 4
    allow_writes = ["Z:ACLTST*"]

    [[policies]]
    type = "rate_limit"
    max_requests = 100
    window_seconds = 60

Every setting that has a command line option can also come from the environment, as
``PACSYS_SUPERVISOR_<SETTING>`` (``PACSYS_SUPERVISOR_WORKERS=4``). The command line wins over
the environment, which wins over the file. Errors raise `ConfigError` naming the key and
where it came from: ``config.toml: unknown key 'wokers'``, ``PACSYS_SUPERVISOR_PORT must be ...``.

Regenerate the example file with ``python -m pacsys.supervised.example_config > ops/supervisor.example.toml``.

The [[policies]] tables are built into policies by `pacsys.supervised.policy_config`
(`build_policies`, `write_gate`); this module checks only their structure.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import tomllib
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pacsys.supervised._connection_guard import parse_networks
from pacsys.supervised._tls import TLSFiles
from pacsys.supervised.config_error import ConfigError, range_text
from pacsys.supervised.policy_config import EXAMPLE_POLICIES, POLICY_TYPES
from pacsys.token_file import TokenFileError, read_token_file
from workers.backend_spec import FactorySpecError, parse_factory

__all__ = [
    "ConfigError",
    "Settings",
    "check_backend_spec",
    "check_files",
    "env_name",
    "env_settings",
    "setting_sources",
    "load_config",
    "read_config_file",
    "render_example",
    "resolve_admin_token",
    "resolve_token",
    "settings_from",
    "tls_files",
    "toml_value",
]


# -- checks used in the field metadata ---------------------------------------------------------

_SPEC_FORMS = "sim, sim:PATH, fake, grpc://HOST:PORT or module:factory[?key=value&...]"


def check_backend_spec(spec: str) -> str | None:
    """What is wrong with the syntax of a backend spec (nothing is imported or built), or None.

    The text reads after the key: ``'backend' must be sim, sim:PATH, ...``.
    """
    if spec in ("sim", "fake"):
        return None
    if spec.startswith("sim:"):
        return None if spec[4:] else "must name a devices file after 'sim:', got 'sim:'"
    if spec.startswith("grpc://"):
        # The builder's own parser: host, port and ?query keys, without connecting.
        from pacsys.backends.spec import BackendSpecError, _grpc_parts

        try:
            _grpc_parts(spec)
        except BackendSpecError as exc:
            return f"is invalid: {exc}"
        return None
    try:
        if parse_factory(spec) is not None:
            return None
    except FactorySpecError as exc:
        return f"is invalid: {exc}"
    return f"must be {_SPEC_FORMS}, got {spec!r}"


def _check_host(host: str) -> str | None:
    if not host:
        return "must not be empty"
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        return f"needs an IPv6 address in brackets, e.g. [::1], got {host!r}"
    return None


def _check_patterns(patterns: tuple[str, ...]) -> str | None:
    return "must not contain empty patterns" if any(not p.strip() for p in patterns) else None


def _check_networks(networks: tuple[str, ...]) -> str | None:
    try:
        parse_networks(networks)
    except ValueError as exc:
        return f"must hold IP addresses or networks: {exc}"
    return None


# -- the settings ------------------------------------------------------------------------------


def _setting(
    default: Any,
    help: str,
    *,
    section: str,
    flag: bool = True,
    in_file: bool = True,
    min: float | None = None,
    max: float | None = None,
    gt: float | None = None,
    choices: tuple[str, ...] | None = None,
    normalize: Callable[[str], str] | None = None,
    check: Callable[[Any], str | None] | None = None,
    example: Any = None,
    metavar: str | None = None,
) -> Any:
    metadata = {
        "help": help,
        "section": section,
        "flag": flag,
        "in_file": in_file,
        "min": min,
        "max": max,
        "gt": gt,
        "choices": choices,
        "normalize": normalize,
        "check": check,
        "example": example,
        "metavar": metavar,
    }
    return field(default=default, metadata=metadata)


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclass(frozen=True)
class Settings:
    """The configuration of one `pacsys-supervisor` process (validated on construction)."""

    # server
    config: str | None = _setting(
        None, "The TOML config file (re-read on SIGHUP).", section="Server", in_file=False, metavar="FILE"
    )
    host: str = _setting(
        "[::]", "Address to listen on ([::] is every address, IPv4 included).", section="Server", check=_check_host
    )
    port: int = _setting(
        50051,
        "Port of the DAQ service, health and reflection (0 picks a free one).",
        section="Server",
        min=0,
        max=65535,
    )
    metrics_port: int | None = _setting(
        None,
        "Port of the HTTP /metrics, /healthz and /readyz endpoint (unset: none; 0 picks a free one).",
        section="Server",
        min=0,
        max=65535,
        example=9109,
    )
    metrics_max_connections: int = _setting(
        64, "Most connections the metrics port serves at once (more are closed at once).", section="Server", min=1
    )
    metrics_timeout: float = _setting(
        5.0, "Seconds a metrics connection has to send its request and take the answer.", section="Server", gt=0
    )
    max_message_bytes: int = _setting(
        4 * 1024 * 1024, "Largest request message accepted, in bytes.", section="Server", min=1024, max=2**31 - 1
    )
    shutdown_grace: float = _setting(
        5.0,
        "Seconds one-shot calls get to finish on SIGTERM/SIGINT before they are cancelled.",
        section="Server",
        min=0,
    )
    drain_delay: float = _setting(
        0.0,
        "Seconds to keep serving after reporting NOT_SERVING on SIGTERM/SIGINT, before the drain (load balancers).",
        section="Server",
        min=0,
        max=3600,
    )

    # backend and workers
    backend: str = _setting(
        "sim",
        "Backend: sim, sim:PATH, fake, grpc://HOST:PORT or module:factory[?key=value&...] "
        "(keyword arguments for the factory; a value is read as JSON when it is JSON, else as text).",
        section="Backend and workers",
        check=check_backend_spec,
        metavar="SPEC",
    )
    workers: int = _setting(
        2,
        "Worker processes, each with its own backend (0 runs the backend in the front process).",
        section="Backend and workers",
        min=0,
        max=1024,
    )
    worker_python: str | None = _setting(
        None,
        "Interpreter the workers run under, e.g. another venv's bin/python where the pacsys release is "
        "installed (unset: the front's own). It needs msgspec; the backend must then be a module:factory spec.",
        section="Backend and workers",
        example="/opt/pacsys-release/bin/python",
        metavar="PATH",
    )
    threads_per_worker: int = _setting(
        16,
        "Threads for the calls of a sync backend, per worker (or in the front process).",
        section="Backend and workers",
        min=1,
        max=4096,
    )
    event_loop: str = _setting(
        "auto",
        "Event loop of the front and the workers: auto (uvloop when installed), uvloop or asyncio.",
        section="Backend and workers",
        choices=("auto", "uvloop", "asyncio"),
        normalize=str.lower,
    )
    min_workers_ready: int = _setting(
        1, "Workers that must be ready before the service reports SERVING.", section="Backend and workers", min=1
    )
    ready_timeout: float = _setting(
        30.0, "Seconds to wait at startup for min_workers_ready workers.", section="Backend and workers", gt=0
    )
    subscription_linger: float = _setting(
        2.0,
        "Seconds an upstream subscription outlives its last client (so a reconnect reuses it).",
        section="Backend and workers",
        min=0,
    )

    # security
    token: str | None = _setting(
        None,
        "Bearer token clients must present (prefer token_file: a file is not on the command line).",
        section="Security",
        example="change-me",
        metavar="TOKEN",
    )
    token_file: str | None = _setting(
        None,
        "File holding the bearer token (surrounding whitespace is stripped).",
        section="Security",
        example="/etc/pacsys/token",
        metavar="FILE",
    )
    allow_writes: tuple[str, ...] = _setting(
        (),
        "Device glob patterns clients may write; writes are denied unless granted here or by a policy.",
        section="Security",
        check=_check_patterns,
        example=["Z:ACLTS*"],
        metavar="PATTERN",
    )
    admin_token_file: str | None = _setting(
        None,
        "File holding the token of the Admin/Status RPC (unset: the bearer token); "
        "without a token it answers local clients only.",
        section="Security",
        example="/etc/pacsys/admin.token",
        metavar="FILE",
    )
    allow_token_plaintext: bool | None = _setting(
        None,
        "Accept a bearer token over a connection without TLS (unset: only when host is a loopback address).",
        section="Security",
        example=False,
    )
    tls_cert: str | None = _setting(
        None,
        "PEM certificate chain of the service: serve TLS (re-read on SIGHUP; needs tls_key).",
        section="Security",
        example="/etc/pacsys/tls/server.crt",
        metavar="FILE",
    )
    tls_key: str | None = _setting(
        None,
        "PEM private key of tls_cert (re-read on SIGHUP).",
        section="Security",
        example="/etc/pacsys/tls/server.key",
        metavar="FILE",
    )
    tls_client_ca: str | None = _setting(
        None,
        "PEM CA certificates of client certificates: mutual TLS, every client needs a certificate they "
        "signed, and its subject is the client's identity (needs tls_cert).",
        section="Security",
        example="/etc/pacsys/tls/clients-ca.crt",
        metavar="FILE",
    )

    # logging
    log_level: str = _setting(
        "INFO",
        "Log level: DEBUG, INFO, WARNING, ERROR or CRITICAL.",
        section="Logging",
        choices=LOG_LEVELS,
        normalize=str.upper,
    )
    log_format: str = _setting(
        "kv",
        "Log line format: kv (key=value) or json (one object per line).",
        section="Logging",
        choices=("kv", "json"),
        normalize=str.lower,
    )
    worker_log_level: str = _setting(
        "WARNING",
        "Log level of the worker processes: DEBUG, INFO, WARNING, ERROR or CRITICAL.",
        section="Logging",
        choices=LOG_LEVELS,
        normalize=str.upper,
    )
    log_requests: bool = _setting(False, "Log every request at INFO (costs throughput).", section="Logging")
    refusal_log_interval: float = _setting(
        10.0,
        "Seconds between log lines for one client's refusals of one kind (the others are counted).",
        section="Logging",
        min=0,
    )
    log_value_chars: int = _setting(
        256,
        "Longest value (a DRF, a peer, an error text) written into a log line, in characters; longer ones are cut.",
        section="Logging",
        min=16,
    )

    # limits
    max_drfs_per_request: int = _setting(1000, "Most DRFs in one Read request.", section="Limits", min=1)
    max_settings_per_request: int = _setting(100, "Most settings in one Set request.", section="Limits", min=1)
    max_drf_length: int = _setting(
        512, "Longest DRF (or setting device) accepted, in characters.", section="Limits", min=16
    )
    max_streams: int = _setting(10_000, "Most streaming Reads open at once.", section="Limits", min=1)
    max_streams_per_peer: int = _setting(
        1000, "Most streams open at once from one client (identity or host).", section="Limits", min=1
    )
    max_health_watches: int = _setting(
        1000,
        "Most grpc.health.v1.Health/Watch streams open at once (apart from max_streams: they cannot take its place).",
        section="Limits",
        min=1,
    )
    max_health_watches_per_peer: int = _setting(
        16, "Most Health/Watch streams open at once from one client (identity or host).", section="Limits", min=1
    )
    max_calls_per_peer: int = _setting(
        100, "Most one-shot Reads and Sets in flight from one client.", section="Limits", min=1
    )
    max_rate_hz: float = _setting(
        1440.0,
        "Fastest periodic rate a DRF may ask for, in Hz (1440 Hz: ACNET's fastest data rate).",
        section="Limits",
        gt=0,
    )
    max_stream_rate: float = _setting(
        5000.0,
        "Readings per second one stream may ask for (an event DRF counts 15/s); delivery is paced to it.",
        section="Limits",
        gt=0,
    )
    max_peer_rate: float = _setting(
        10_000.0, "Readings per second all streams of one client may ask for and receive.", section="Limits", gt=0
    )
    stream_buffer: int = _setting(
        1000, "Readings queued per client stream before its oldest are dropped.", section="Limits", min=1
    )

    # connections (the service port's HTTP/2 transport)
    max_connections: int = _setting(
        0,
        "Most connections to the service port at once; more are accepted and closed at once "
        "(0: the open-file limit minus a reserve for workers, audit, TLS and the metrics port).",
        section="Connections",
        min=0,
    )
    max_connections_per_address: int = _setting(
        1000,
        "Most connections from one client address; the newest beyond it are cut within a second (0: no limit).",
        section="Connections",
        min=0,
    )
    connections_per_address_exempt: tuple[str, ...] = _setting(
        (),
        "Addresses or networks (CIDR) that max_connections_per_address does not apply to: your load balancers, "
        "which carry every client's connections from one address.",
        section="Connections",
        check=_check_networks,
        example=["10.0.0.5", "10.1.0.0/24"],
        metavar="ADDRESS",
    )
    connection_idle_timeout: float = _setting(
        300.0,
        "Seconds a connection without calls stays open; then it is closed (GOAWAY: clients reconnect on their "
        "next call; 0: never).",
        section="Connections",
        min=0,
    )
    handshake_timeout: float = _setting(
        10.0,
        "Seconds a new connection has to finish its TLS handshake and HTTP/2 preface before it is closed.",
        section="Connections",
        gt=0,
    )
    max_concurrent_streams: int = _setting(
        1000,
        "Most calls open at once on one connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS; a client queues "
        "the others); also gRPC's defence against streams reset as soon as they are opened.",
        section="Connections",
        min=1,
    )

    # supervision
    ping_interval: float = _setting(
        1.0, "Seconds between pings of each worker's event loop.", section="Supervision", gt=0
    )
    hang_timeout: float = _setting(
        5.0, "Seconds without a ping answer after which a worker is killed and replaced.", section="Supervision", gt=0
    )
    restart_backoff_initial: float = _setting(
        0.1,
        "Seconds before a worker is started again after it ended (doubles while it keeps ending early).",
        section="Supervision",
        gt=0,
    )
    restart_backoff_max: float = _setting(5.0, "Longest wait before restarting a worker.", section="Supervision", gt=0)
    restart_stable_uptime: float = _setting(
        1.0,
        "A worker that served this many seconds before it ended is restarted after restart_backoff_initial and its "
        "exit does not count towards restart_intensity; one that ended sooner is a crash-loop suspect.",
        section="Supervision",
        gt=0,
    )
    restart_intensity: int = _setting(
        5,
        "Early exits (crash-loop suspects) allowed per worker slot within restart_period ...",
        section="Supervision",
        min=0,
    )
    restart_period: float = _setting(
        60.0, "... seconds; one more cools the slot down (while another slot serves).", section="Supervision", gt=0
    )
    restart_cooldown_initial: float = _setting(
        10.0,
        "Seconds a slot cools down the first time; doubles on each repeated cool-down.",
        section="Supervision",
        gt=0,
    )
    restart_cooldown_max: float = _setting(
        300.0, "Longest cool-down of a slot before it tries again.", section="Supervision", gt=0
    )
    worker_wait: float = _setting(
        5.0,
        "Seconds a Read or Set waits for a worker when none serves (never past the client's deadline); "
        "then UNAVAILABLE.",
        section="Supervision",
        min=0,
    )
    unready_limit: float = _setting(
        120.0,
        "Seconds the pool may stay not ready (fewer than min_workers_ready workers serving) before liveness turns "
        "NOT_SERVING and the systemd watchdog stops, so that the service is restarted as a whole.",
        section="Supervision",
        gt=0,
    )
    unready_exit: bool = _setting(
        False,
        "After unready_limit not ready, drain and exit with status 4 instead of only "
        "reporting it (escalation to systemd or Kubernetes).",
        section="Supervision",
    )

    # recycling
    recycle_rss_mb: int = _setting(
        0, "Replace a worker whose RSS passes this many MiB (0: off).", section="Recycling", min=0
    )
    recycle_requests: int = _setting(
        0, "Replace a worker after this many requests (0: off).", section="Recycling", min=0
    )
    recycle_jitter: float = _setting(
        0.1,
        "Random fraction added to the recycle limits so workers do not recycle together.",
        section="Recycling",
        min=0,
        max=1,
    )

    # audit
    audit_path: str | None = _setting(
        None,
        "JSON-lines audit log of every request and decision (unset: no audit log).",
        section="Audit",
        example="/var/log/pacsys/audit.jsonl",
        metavar="FILE",
    )
    audit_proto_path: str | None = _setting(
        None,
        "Binary capture of the raw request messages (needs audit_path).",
        section="Audit",
        example="/var/log/pacsys/audit.bin",
        metavar="FILE",
    )
    audit_log_responses: bool = _setting(False, "Also record replies in the audit log.", section="Audit")
    audit_flush_interval: int = _setting(
        1,
        "Audit entries between flushes (1 flushes every entry; a Set's entry is always flushed).",
        section="Audit",
        min=1,
    )
    allow_unaudited_writes: bool = _setting(
        False,
        "Make writes even while the audit log cannot record them (else they are refused with UNAVAILABLE).",
        section="Audit",
    )

    # policies
    policies: tuple[dict[str, Any], ...] = _setting(
        (), "Policies, in order: [[policies]] tables (see below).", section="Policies", flag=False
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            try:
                value = _check_field(f, getattr(self, f.name))
            except _Bad as bad:
                raise _key_error(bad.key or f.name, bad.body) from None
            object.__setattr__(self, f.name, value)
        if self.token is not None and self.token_file is not None:
            raise _key_error("token_file", "cannot be combined with 'token': give one of them")
        if self.workers > 0 and self.min_workers_ready > self.workers:
            raise _key_error(
                "min_workers_ready", f"({self.min_workers_ready}) must not exceed 'workers' ({self.workers})"
            )
        if self.restart_cooldown_max < self.restart_cooldown_initial:
            raise _key_error(
                "restart_cooldown_max",
                f"({self.restart_cooldown_max:g}) must not be below 'restart_cooldown_initial' "
                f"({self.restart_cooldown_initial:g})",
            )
        if self.worker_python is not None and self.workers == 0:
            raise _key_error("worker_python", "needs workers >= 1 (with workers = 0 the front hosts the backend)")
        if self.restart_backoff_max < self.restart_backoff_initial:
            raise _key_error(
                "restart_backoff_max",
                f"({self.restart_backoff_max:g}) must not be below 'restart_backoff_initial' "
                f"({self.restart_backoff_initial:g})",
            )
        if self.metrics_port and self.metrics_port == self.port:
            raise _key_error("metrics_port", f"({self.metrics_port}) must differ from 'port'")
        if self.audit_proto_path is not None and self.audit_path is None:
            raise _key_error("audit_proto_path", "needs 'audit_path' as well")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise _key_error("tls_key" if self.tls_key is None else "tls_cert", "needs 'tls_cert' and 'tls_key' both")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise _key_error("tls_client_ca", "needs 'tls_cert' and 'tls_key' (mutual TLS is TLS first)")


FIELDS: dict[str, dataclasses.Field[Any]] = {f.name: f for f in dataclasses.fields(Settings)}
_HINTS = typing.get_type_hints(Settings)


def flag_name(name: str) -> str:
    """The command line option of a setting: ``threads_per_worker`` -> ``--threads-per-worker``."""
    return "--" + name.replace("_", "-")


def field_kind(name: str) -> tuple[type, bool]:
    """(base type, optional) of a setting: int, float, str, bool, tuple (a list of strings) or dict."""
    hint = _HINTS[name]
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional:
        hint = next(a for a in args if a is not type(None))
    origin = typing.get_origin(hint) or hint
    return origin, optional


class _Bad(Exception):
    def __init__(self, body: str, key: str | None = None):
        super().__init__(body)
        self.body = body
        self.key = key  # a more precise key than the field's (policies[2])


def _quoted(key: str) -> str:
    return key if "[" in key else f"'{key}'"


def _key_error(key: str, body: str) -> ConfigError:
    return ConfigError(f"{_quoted(key)} {body}", key=key, body=body)


def _check_field(f: dataclasses.Field[Any], value: Any) -> Any:
    """The value normalized, or _Bad with what is wrong (without the key)."""
    kind, optional = field_kind(f.name)
    md = f.metadata
    if value is None:
        if optional:
            return None
        raise _Bad("must be set")
    if kind is bool:
        if not isinstance(value, bool):
            raise _Bad(f"must be true or false, got {value!r}")
        return value
    if kind is int or kind is float:
        rng = range_text(md["min"], md["max"], md["gt"])
        what = "an integer" if kind is int else "a number"
        ok = isinstance(value, int) if kind is int else isinstance(value, int | float)
        if isinstance(value, bool) or not ok or (kind is float and not math.isfinite(value)):
            raise _Bad(f"must be {what}{rng}, got {value!r}")
        value = kind(value)
        if (
            (md["min"] is not None and value < md["min"])
            or (md["max"] is not None and value > md["max"])
            or (md["gt"] is not None and value <= md["gt"])
        ):
            raise _Bad(f"must be {what}{rng}, got {value!r}")
        return value
    if kind is str:
        if not isinstance(value, str):
            raise _Bad(f"must be a string, got {value!r}")
        if md["normalize"] is not None:
            value = md["normalize"](value)
        if md["choices"] is not None and value not in md["choices"]:
            raise _Bad(f"must be one of {', '.join(md['choices'])}, got {value!r}")
    elif f.name == "policies":
        value = _check_policy_list(value)
    elif kind is tuple:
        if isinstance(value, str) or not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise _Bad(f"must be a list of strings, got {value!r}")
        value = tuple(value)
    if md["check"] is not None:
        problem = md["check"](value)
        if problem is not None:
            raise _Bad(problem)
    return value


def _check_policy_list(value: Any) -> tuple[dict[str, Any], ...]:
    """The structure only ([[policies]] tables with a known type); build_policies checks the rest."""
    if not isinstance(value, list | tuple):
        raise _Bad(f"must be an array of tables ([[policies]]), got {value!r}")
    tables = []
    for i, table in enumerate(value):
        if not isinstance(table, Mapping):
            raise _Bad(f"must be a table ([[policies]]), got {table!r}", key=f"policies[{i}]")
        kind = table.get("type")
        if kind is None:
            raise _Bad(f"needs a 'type': one of {', '.join(POLICY_TYPES)}", key=f"policies[{i}]")
        if kind not in POLICY_TYPES:
            raise _Bad(f"has unknown type {kind!r}: use one of {', '.join(POLICY_TYPES)}", key=f"policies[{i}]")
        tables.append(dict(table))
    return tuple(tables)


# -- loading -----------------------------------------------------------------------------------


def read_config_file(path: str) -> dict[str, Any]:
    """The raw TOML table of a config file; ConfigError when it cannot be read or parsed."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except RecursionError:  # tomllib recurses per nesting level: an array nested 500 deep
        raise ConfigError(f"{path}: invalid TOML: nested too deeply") from None


def load_config(path: str, env: Mapping[str, Any] | None = None) -> Settings:
    """Settings from a TOML file (and `env`, see `env_settings`); defaults for everything else."""
    return settings_from(read_config_file(path), {"config": path}, env=env, source=path)


def _unknown_key(key: str, where: str) -> ConfigError:
    known = [name for name, f in FIELDS.items() if f.metadata["in_file"]]
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"{where}unknown key '{key}'{hint}", key=key, body=f"unknown key{hint}")


# -- the environment -----------------------------------------------------------------------------

ENV_PREFIX = "PACSYS_SUPERVISOR_"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def env_name(name: str) -> str:
    """The environment variable of a setting: ``workers`` -> ``PACSYS_SUPERVISOR_WORKERS``."""
    return ENV_PREFIX + name.upper()


def env_settings(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The settings given as ``PACSYS_SUPERVISOR_<SETTING>`` variables, by field name, typed.

    Every setting with a command line option has one. An empty variable counts as not set; a
    list (allow_writes) is separated by commas or spaces; a boolean is 1/0, true/false, yes/no
    or on/off. An unknown ``PACSYS_SUPERVISOR_`` variable is an error (a typo would otherwise
    be ignored). Values are checked later, by `settings_from`, with the variable's name.
    """
    environ = os.environ if environ is None else environ
    by_env = {env_name(name): name for name, f in FIELDS.items() if f.metadata["flag"]}
    values: dict[str, Any] = {}
    for var, text in environ.items():
        if not var.startswith(ENV_PREFIX):
            continue
        name = by_env.get(var)
        if name is None:
            close = difflib.get_close_matches(var, by_env, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"unknown environment variable {var}{hint}", key=var)
        text = text.strip()
        if not text:
            continue
        kind, _ = field_kind(name)
        if kind is bool:
            if text.lower() not in _TRUE + _FALSE:
                raise ConfigError(f"{var} must be true or false (1/0, yes/no, on/off), got {text!r}", key=name)
            values[name] = text.lower() in _TRUE
        elif kind is int or kind is float:
            try:
                values[name] = kind(text)
            except ValueError:
                what = "an integer" if kind is int else "a number"
                raise ConfigError(f"{var} must be {what}, got {text!r}", key=name) from None
        elif kind is tuple:
            values[name] = [p for p in re.split(r"[,\s]+", text) if p]
        else:
            values[name] = text
    return values


def settings_from(
    file_values: Mapping[str, Any],
    overrides: Mapping[str, Any],
    *,
    env: Mapping[str, Any] | None = None,
    source: str | None = None,
) -> Settings:
    """Settings from the file's table, the environment's values and the command line's (which win).

    `overrides` and `env` are keyed by field name (`env` as `env_settings` returns it); a None
    value means "not given". `source` names the file in errors. A later layer's `token` drops an
    earlier layer's `token_file` and the reverse, so ``--token-file`` replaces a token set in the
    file.
    """
    where = f"{source}: " if source else ""
    for key in file_values:
        if key not in FIELDS:
            raise _unknown_key(key, where)
        if not FIELDS[key].metadata["in_file"]:
            raise ConfigError(f"{where}'{key}' cannot be set in the config file", key=key)
    env = dict(env or {})
    for key in (*overrides, *env):
        if key not in FIELDS:
            raise ConfigError(f"unknown setting '{key}'", key=key)
    given = {k: v for k, v in overrides.items() if v is not None}
    merged = dict(file_values)
    for layer in (env, given):
        if "token" in layer:
            merged.pop("token_file", None)
        if "token_file" in layer:
            merged.pop("token", None)
        merged.update(layer)

    def located(key: str, body: str) -> ConfigError:
        if key in given and FIELDS[key].metadata["flag"]:
            return ConfigError(f"{flag_name(key)} {body}", key=key, body=body)
        if key in env and key not in given:
            return ConfigError(f"{env_name(key)} {body}", key=key, body=body)
        return ConfigError(f"{where}{_quoted(key)} {body}", key=key, body=body)

    for key, value in merged.items():
        try:
            _check_field(FIELDS[key], value)
        except _Bad as bad:
            raise located(bad.key or key, bad.body) from None
    try:
        return Settings(**merged)
    except ConfigError as exc:
        if exc.key is None or exc.body is None:
            raise
        raise located(exc.key, exc.body) from None


def setting_sources(
    file_values: Mapping[str, Any], overrides: Mapping[str, Any], env: Mapping[str, Any] | None = None
) -> dict[str, str]:
    """Where each setting's value came from: command line, environment (VAR), file or default."""
    env = env or {}
    sources = {}
    for name in FIELDS:
        if overrides.get(name) is not None:
            sources[name] = "command line"
        elif name in env:
            sources[name] = f"environment ({env_name(name)})"
        elif name in file_values:
            sources[name] = "file"
        else:
            sources[name] = "default"
    # A later layer's token or token_file replaces the other one: that one is not in effect.
    rank = ("default", "file", "environment", "command line")
    layer = {name: rank.index(text.split(" (")[0]) for name, text in sources.items()}
    if layer["token"] and layer["token_file"]:
        sources["token" if layer["token"] < layer["token_file"] else "token_file"] = "default"
    return sources


def check_files(settings: Settings) -> None:
    """ConfigError when an audit file could not be opened for appending, as start-up would find.

    Checked without creating anything: the file, when it exists, must be a writable regular
    file; when it does not, its directory must exist and be writable.
    """
    for key in ("audit_path", "audit_proto_path"):
        path = getattr(settings, key)
        if path is None:
            continue
        problem = _append_problem(path)
        if problem is not None:
            raise ConfigError(f"'{key}' {path}: {problem}", key=key, body=problem)


def _append_problem(path: str) -> str | None:
    if os.path.isdir(path):
        return "is a directory"
    if os.path.exists(path):
        return None if os.access(path, os.W_OK) else "is not writable by this user"
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        return f"its directory {directory} does not exist"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"its directory {directory} is not writable by this user"
    return None


def resolve_token(settings: Settings) -> str | None:
    """The bearer token: `token`, or the stripped contents of `token_file`, or None."""
    if settings.token is not None:
        return settings.token
    return _read_token_file(settings.token_file, "token_file")


def resolve_admin_token(settings: Settings) -> str | None:
    """The Admin/Status token: the stripped contents of `admin_token_file`, or None."""
    return _read_token_file(settings.admin_token_file, "admin_token_file")


def _read_token_file(path: str | None, key: str) -> str | None:
    if path is None:
        return None
    try:
        return read_token_file(path)
    except TokenFileError as exc:
        raise ConfigError(f"'{key}' {exc}", key=key) from None


def tls_files(settings: Settings) -> TLSFiles | None:
    """The service's TLS files (None: plaintext), checked now as a pair (`_tls.TLSFiles.check`)."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    files = TLSFiles(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    files.check()  # a TLSFileError is a ConfigError naming the setting, the file and the reason
    return files


# -- the example file --------------------------------------------------------------------------


def toml_value(value: Any) -> str:
    """`value` written as TOML (the example file, and check-config's listing)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML form for {value!r}")


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def render_example() -> str:
    """The commented example config file: every setting with its help and default, and policies."""
    lines = [
        "# pacsys-supervisor configuration: every setting, with its default (commented out).",
        "#",
        "# Generated by pacsys.supervised.config.render_example(); do not edit by hand, regenerate with",
        "#   python -m pacsys.supervised.example_config > ops/supervisor.example.toml",
        "#",
        "# Use:     pacsys-supervisor --config FILE   (options on the command line override the file)",
        "# Env:     PACSYS_SUPERVISOR_<SETTING>, e.g. PACSYS_SUPERVISOR_WORKERS=4, overrides the file too",
        "#          (options override the environment). check-config FILE shows where each value came from.",
        "# Check:   pacsys-supervisor check-config FILE",
        "# Reload:  SIGHUP re-reads the file; policies, allow_writes and logging change at once,",
        "#          other settings at the next restart. A bad file is logged and the old policies stay.",
        "#",
        "# Lines '# text' are help; lines '#key = value' are settings: remove the '#' to set one.",
    ]
    section = None
    for f in dataclasses.fields(Settings):
        md = f.metadata
        if not md["in_file"] or f.name == "policies":
            continue
        if md["section"] != section:
            section = md["section"]
            lines += ["", "", f"# == {section} " + "=" * max(3, 92 - len(section))]
        lines.append("")
        lines.append(f"# {md['help']}")
        value = f.default if f.default is not None else md["example"]
        if f.default is None:
            lines.append("# (unset by default)")
        elif md["example"] is not None:
            lines.append(f"# e.g. {f.name} = {toml_value(md['example'])}")
        lines.append(f"#{f.name} = {toml_value(value)}")
    lines += [
        "",
        "",
        "# == Policies " + "=" * 84,
        "#",
        "# Each [[policies]] table is one policy; they run in file order and the first denial wins.",
        "# Writes are denied unless granted: by allow_writes above, or by a policy that approves",
        "# them (device_access with mode allow and action set or all, or a custom one).",
    ]
    for help_lines, table in EXAMPLE_POLICIES:
        lines.append("")
        lines += [f"# {h}" for h in help_lines]
        lines.append("#[[policies]]")
        lines += [f"#{_toml_key(k)} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"
