"""Why a port cannot be listened on, in the service's words; and leaving a shared port.

gRPC reports a port it cannot bind with a line of its own on stderr (outside the service's
log format, not JSON under ``log_format = "json"``) and "Failed to bind ... set
GRPC_VERBOSITY=debug", which does not say that the port is taken. So the service port is
tried here first, as gRPC will bind it (SO_REUSEADDR; SO_REUSEPORT only with the
`reuse_port` setting; an IPv6 address takes IPv4 too; a name is served when any of its
addresses binds): a port that cannot be had is reported before gRPC is asked, naming the
address and the reason. The metrics port's errors are worded the same way.

With `reuse_port` a port is shared with the processes that listen there with SO_REUSEPORT
too, as the same user (the kernel's rule); any other holder makes it a port in use.

An instance that drains leaves a shared port at once (`stop_listening`): gRPC closes its
listeners only when the server stops, which also ends every call it has not yet taken, so
this process's listening sockets on its ports are shut down here (found through
/proc/self/net/tcp{,6} and /proc/self/fd, Linux). The kernel then gives new connections to
the other processes sharing the port, and this one keeps serving the connections it has.
gRPC's acceptor reports the shut-down socket once ("Closing acceptor. Failed accept4:
Invalid argument") and stops accepting; the relay of its lines expects that one.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Collection
from pathlib import Path

__all__ = ["bind_problem", "reason", "stop_listening"]


def reason(exc: OSError, port: int, reuse_port: bool = False) -> str:
    """An operator's words for a failed bind."""
    if exc.errno == errno.EADDRINUSE and reuse_port:
        return (
            f"port {port} is in use by a process that does not share it (`ss -ltnp 'sport = :{port}'` shows "
            "which): reuse_port shares a port only with processes of the same user that set it too"
        )
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


def bind_problem(host: str, port: int, reuse_port: bool = False) -> str | None:
    """Why gRPC could not listen on `host:port` (a port in use, ...), or None when it can;
    `reuse_port`: as gRPC binds with SO_REUSEPORT."""
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
                if reuse_port:
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6 and hasattr(socket, "IPV6_V6ONLY"):
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                probe.bind(address)
        except OSError as exc:
            if exc.errno not in _KNOWN:
                return None  # something gRPC may work around (no IPv6 here, ...): let it try
            problems.append(reason(exc, port, reuse_port))
        else:
            return None  # one address that binds is enough for gRPC
    return problems[0] if problems else None


_KNOWN = (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL)


def stop_listening(ports: Collection[int]) -> int:
    """Shut down this process's listening TCP sockets on `ports` (new connections go to the other
    processes sharing them); the number shut down (0 where /proc cannot tell)."""
    inodes = set()
    for table in ("tcp", "tcp6"):
        try:
            rows = Path(f"/proc/self/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            # local address (hex ADDRESS:PORT), state (0A: LISTEN), inode
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) in ports:
                inodes.add(fields[9])
    closed = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed meanwhile, or the directory's own descriptor
        if target.startswith("socket:[") and target[8:-1] in inodes:
            with socket.socket(fileno=os.dup(int(fd))) as listener:  # a duplicate: gRPC's stays open
                listener.shutdown(socket.SHUT_RD)
            closed += 1
    return closed
