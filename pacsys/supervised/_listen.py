"""Why a port cannot be listened on, in the service's words.

gRPC reports a port it cannot bind with a line of its own on stderr (outside the service's
log format, not JSON under ``log_format = "json"``) and "Failed to bind ... set
GRPC_VERBOSITY=debug", which does not say that the port is taken. So the service port is
tried here first, as gRPC will bind it (SO_REUSEADDR, no SO_REUSEPORT; an IPv6 address
takes IPv4 too; a name is served when any of its addresses binds): a port that cannot be had
is reported before gRPC is asked, naming the address and the reason. The metrics port's
errors are worded the same way.
"""

from __future__ import annotations

import errno
import socket

__all__ = ["bind_problem", "reason"]


def reason(exc: OSError, port: int) -> str:
    """An operator's words for a failed bind."""
    if exc.errno == errno.EADDRINUSE:
        return (
            f"port {port} is in use: another process listens there "
            f"(`ss -ltnp 'sport = :{port}'` shows which); stop it or choose another port"
        )
    if exc.errno == errno.EACCES:
        return f"permission denied: port {port} is below 1024 and needs root or CAP_NET_BIND_SERVICE"
    if exc.errno == errno.EADDRNOTAVAIL:
        return "the address is not one of this host's"
    return exc.strerror or str(exc)


def bind_problem(host: str, port: int) -> str | None:
    """Why gRPC could not listen on `host:port` (a port in use, ...), or None when it can."""
    if port == 0:
        return None  # any free port
    try:
        addresses = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"cannot resolve {host!r}: {exc.strerror}"
    problems = []
    for family, kind, proto, _, address in addresses:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6 and hasattr(socket, "IPV6_V6ONLY"):
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                probe.bind(address)
        except OSError as exc:
            if exc.errno not in _KNOWN:
                return None  # something gRPC may work around (no IPv6 here, ...): let it try
            problems.append(reason(exc, port))
        else:
            return None  # one address that binds is enough for gRPC
    return problems[0] if problems else None


_KNOWN = (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL)
