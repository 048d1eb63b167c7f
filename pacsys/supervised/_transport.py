"""What the service port's HTTP/2 transport accepts: the gRPC server options, and the
connection limits with the open-file limit they are derived from.

Every option here was checked against grpcio 1.85's C-core (the version pinned); the
measurements behind the choices are in docs/design.md ("Hostile clients"). What gRPC does
when one of these bites happens inside C-core and is not reported to Python: streams over
`max_concurrent_streams` are refused with RST_STREAM(REFUSED_STREAM), idle connections get
a GOAWAY, slow handshakes and connections over `max_connections` are closed. The connection
guard (`_connection_guard`) counts the one it can see: passes that find the port full.
"""

from __future__ import annotations

import dataclasses
import logging
import resource
from dataclasses import dataclass
from typing import Any

from pacsys.settings import Settings

__all__ = ["KEEPALIVE_OPTIONS", "TransportLimits", "open_files_limits", "raise_open_files_limit", "server_options"]

logger = logging.getLogger("pacsys.supervised")

DEFAULTS = Settings()

# Client keepalive pings. The pacsys release's client pings every 300 s while a call is open;
# this repository's grpc:// backend every 30 s, also with no call open. gRPC's default server
# policy answers pings more often than every 5 minutes without data with GOAWAY
# "too_many_pings" after a few strikes; this one accepts a ping every 10 s or slower, with or
# without calls, and never counts strikes.
# Strikes stay off (max_ping_strikes 0) for a second reason: in grpcio 1.85 the strike path is
# the expensive one. After its GOAWAY the transport keeps reading and acknowledging the pings
# already sent, at a cost that grows with the square of their number: one burst of 100,000
# pings (1.7 MB) cost the server 4.2 s of CPU with strikes 2 and 0.01 s with strikes 0. A ping
# flood is the balancer's to stop (ops/README.md, "Hostile clients").
KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
]

# Descriptors kept for everything but client connections: the interpreter and gRPC's own
# (epoll, wake-up pipes, the listeners), the audit files, a TLS reload's file reads, log
# files; then a few per worker (its pipes and process handle), and the metrics port's
# connections.
RESERVED_FILES = 256
RESERVED_FILES_PER_WORKER = 16
MIN_CONNECTIONS = 16  # however low the open-file limit, the port still takes a few clients


@dataclass(frozen=True)
class TransportLimits:
    """The service port's connection and HTTP/2 limits; the defaults are the settings' of the
    same names (`config.Settings`), `from_settings` takes a service's. `reserved_files`: the
    descriptors `max_connections` 0 keeps for everything but client connections."""

    max_connections: int = DEFAULTS.max_connections
    max_connections_per_address: int = DEFAULTS.max_connections_per_address
    connections_per_address_exempt: tuple[str, ...] = DEFAULTS.connections_per_address_exempt
    connection_idle_timeout: float = DEFAULTS.connection_idle_timeout
    handshake_timeout: float = DEFAULTS.handshake_timeout
    max_concurrent_streams: int = DEFAULTS.max_concurrent_streams
    memory_release_bytes: int = DEFAULTS.memory_release_bytes
    reserved_files: int = (
        RESERVED_FILES + RESERVED_FILES_PER_WORKER * DEFAULTS.workers + DEFAULTS.metrics_max_connections
    )

    @classmethod
    def from_settings(cls, settings: Settings) -> TransportLimits:
        """The limits of a service run with `settings`."""
        names = [f.name for f in dataclasses.fields(cls) if f.name != "reserved_files"]
        metrics = settings.metrics_max_connections + 1 if settings.metrics_port is not None else 0
        return cls(
            **{name: getattr(settings, name) for name in names},
            reserved_files=RESERVED_FILES + RESERVED_FILES_PER_WORKER * settings.workers + metrics,
        )

    def connection_cap(self) -> int:
        """`max_connections`, or what the open-file limit leaves after the reserve; never more than that."""
        soft, _hard = open_files_limits()
        if soft == resource.RLIM_INFINITY:
            return self.max_connections or 2**31 - 1
        fits = max(MIN_CONNECTIONS, soft - self.reserved_files)
        if self.max_connections and self.max_connections > fits:
            logger.warning(
                "event=max_connections_lowered configured=%d open_files=%d reserved=%d max_connections=%d "
                'hint="raise the open-file limit (LimitNOFILE) to allow more"',
                self.max_connections,
                soft,
                self.reserved_files,
                fits,
            )
            return fits
        return self.max_connections or fits


def server_options(
    limits: TransportLimits,
    max_connections: int,
    max_message_bytes: int,
    *,
    reuse_port: bool = False,
    connection_max_age: float | None = None,
) -> list[tuple[str, Any]]:
    """The grpc.aio server options of the service port."""
    options: list[tuple[str, Any]] = [
        *KEEPALIVE_OPTIONS,
        ("grpc.max_receive_message_length", max_message_bytes),
        # Off: a port in use fails the start. On: processes of one user that set it share the
        # port, the kernel spreading new connections over them (`reuse_port`).
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        # Per connection. It also arms gRPC's defence against rapid reset (CVE-2023-44487):
        # `grpc.http.overload_protection` (on by default) refuses new streams while the
        # connection's streams still being torn down reach this number; without a limit
        # gRPC sends no SETTINGS_MAX_CONCURRENT_STREAMS and has no defence (measured: one
        # resetting connection made 97% of another client's calls fail, none with 1000).
        ("grpc.max_concurrent_streams", limits.max_concurrent_streams),
        # A TCP connection that never finishes its TLS handshake or HTTP/2 preface holds a
        # descriptor this long (gRPC's default: 120 s).
        ("grpc.server_handshake_timeout_ms", round(limits.handshake_timeout * 1000)),
        # Beyond it gRPC accepts a connection and closes it at once: the process keeps its
        # descriptors (and /readyz, the audit, the workers keep working) whatever arrives.
        ("grpc.max_allowed_incoming_connections", max_connections),
    ]
    if limits.connection_idle_timeout > 0:
        # GOAWAY to a connection without a call for that long (pings do not count); gRPC
        # clients reconnect on their next call.
        options.append(("grpc.max_connection_idle_ms", round(limits.connection_idle_timeout * 1000)))
    if connection_max_age is not None:
        # GOAWAY once a connection is this old (gRPC adds +-10%): new calls take a new
        # connection, calls and streams in progress finish on this one (no grace limit is set,
        # gRPC's default is none: a stream carried on for 8 s over connections 1 s old).
        options.append(("grpc.max_connection_age_ms", round(connection_max_age * 1000)))
    return options


def open_files_limits() -> tuple[int, int]:
    """This process's open-file limits (RLIMIT_NOFILE): (soft, hard)."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def raise_open_files_limit() -> None:
    """Raise this process's soft open-file limit to its hard limit, as servers do at start (the
    server logs both with its connection limits). Process-wide, so the command calls it, not
    the library."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            logger.warning("event=open_files_limit_not_raised soft=%d hard=%d error=%s", soft, hard, exc)
