"""A per-address connection limit on the service port, which gRPC does not have.

grpcio accepts connections itself and gives Python no say over one (grpc/grpc#12737: a
per-address limit was asked for and never built; `grpc.max_allowed_incoming_connections` is
global). So the limit is kept from the outside, after the fact: a thread looks at the
process's own TCP connections on the service port every `interval` seconds, groups them by
the client's address, and for an address holding more than `max_per_address` it shuts down
the newest ones (`shutdown(SHUT_RDWR)`, never `close`: the descriptor stays gRPC's, and gRPC
sees its connection end and closes it as it would any connection the client dropped; the
client sees UNAVAILABLE and may reconnect, to be cut again while it is over the limit).

It costs nothing while the process holds few descriptors: a pass first asks the kernel how
many descriptors are open (one `stat` of /proc/self/fd on Linux >= 6.2, a directory listing
before) and looks no further while that is at most the limit, since no address can then be
over it. Above that a pass asks the kernel for the sockets on the service port with their
inodes (netlink socket diagnostics, as `ss` does) and, only when an address is over the
limit, reads /proc/self/fd (which descriptor holds which inode). A socket is shut down only
after `fstat` of a duplicate of its descriptor shows the inode the scan found, so a
descriptor number that gRPC closed and reused meanwhile is never touched.

The service ports are the TLS one and the plaintext one beside it (`plaintext_port`). With
`reuse_port` other processes hold connections on the same ports, which the kernel lists
too: a pass then keeps only the sockets this process holds (their inodes among its
descriptors), so that each instance counts and cuts its own.

Each pass also lets `_memory.HeapWatch` look at the heap (every few seconds), so that what a
flood left freed but resident (connections gone, frames buffered) goes back to the system.

Linux only; elsewhere it does nothing and says so once.
"""

from __future__ import annotations

import collections
import errno
import ipaddress
import logging
import math
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from pacsys.supervised import _memory

__all__ = ["ConnectionGuard", "open_descriptors", "parse_networks"]

logger = logging.getLogger("pacsys.supervised")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# Netlink's socket diagnostics (what `ss` uses; Linux >= 3.3; see sock_diag(7) and
# linux/inet_diag.h): the kernel lists the sockets of this network namespace whose local port
# is the service port, in the states that hold an accepted socket: ESTABLISHED, and CLOSE_WAIT
# (the client has closed, gRPC not yet). /proc/net/tcp says the same but formats every socket
# of the namespace as text: 10 to 20 times slower on a busy host (measured: 111 ms to read
# 38k lines, 12 ms for this dump).
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
INET_DIAG_REQ_BYTECODE = 1
INET_DIAG_BC_S_GE, INET_DIAG_BC_S_LE = 2, 3
TCP_ESTABLISHED, TCP_CLOSE_WAIT = 1, 8
_HEADER = struct.Struct("=IHHII")  # struct nlmsghdr
_DIAG_MSG_INODE = 68  # offset of idiag_inode in struct inet_diag_msg
_DIAG_MSG_DST = 24  # offset of id.idiag_dst
BUSIEST = 5  # addresses shown in the status view


def parse_networks(texts: Iterable[str]) -> tuple[Network, ...]:
    """Addresses or networks (``10.0.0.5``, ``10.0.0.0/24``, ``::1``) as networks; ValueError names a bad one."""
    networks = []
    for text in texts:
        try:
            networks.append(ipaddress.ip_network(text.strip().strip("[]")))  # strict: not 10.0.0.5/24
        except ValueError as exc:
            raise ValueError(
                f"{text!r} is not an IP address or network (e.g. 10.0.0.5 or 10.0.0.0/24): {exc}"
            ) from None
    return tuple(networks)


def open_descriptors() -> int:
    """How many descriptors this process holds."""
    try:
        size = os.stat("/proc/self/fd").st_size  # the count itself on Linux >= 6.2, 0 before
        return size if size > 0 else len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


@dataclass(frozen=True)
class _Socket:
    inode: int
    address: Address


def _request(family: int, port: int) -> bytes:
    """A dump request for the TCP sockets of `family` whose local port is `port`."""
    # The filter: local port >= port, then <= port; a failed test jumps past the end (reject).
    code = b"".join(
        (
            struct.pack("=BBH", INET_DIAG_BC_S_GE, 8, 20),
            struct.pack("=BBH", 0, 0, port),
            struct.pack("=BBH", INET_DIAG_BC_S_LE, 8, 12),
            struct.pack("=BBH", 0, 0, port),
        )
    )
    states = (1 << TCP_ESTABLISHED) | (1 << TCP_CLOSE_WAIT)
    body = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, states) + bytes(48)  # an empty inet_diag_sockid
    body += struct.pack("=HH", 4 + len(code), INET_DIAG_REQ_BYTECODE) + code
    return _HEADER.pack(_HEADER.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + body


def sock_diag() -> socket.socket:
    """A netlink socket for `sockets_on_port`."""
    return socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)


def sockets_on_port(netlink: socket.socket, port: int) -> Iterator[_Socket]:
    """The accepted TCP sockets of this network namespace whose local port is `port`."""
    for family in (socket.AF_INET, socket.AF_INET6):
        netlink.send(_request(family, port))
        yield from _replies(netlink)


def _replies(netlink: socket.socket) -> Iterator[_Socket]:
    while True:
        data = netlink.recv(1 << 20)
        for kind, body in _messages(data):
            if kind == NLMSG_DONE:
                return
            if kind == NLMSG_ERROR:
                error = -struct.unpack_from("=i", body)[0]
                if error in (errno.ENOENT, errno.EAFNOSUPPORT):
                    return  # no IPv6 in this kernel
                raise OSError(error, f"sock_diag: {os.strerror(error)}")
            yield _Socket(struct.unpack_from("=I", body, _DIAG_MSG_INODE)[0], _address(body))


def _messages(data: bytes) -> Iterator[tuple[int, memoryview]]:
    view = memoryview(data)
    pos = 0
    while pos + _HEADER.size <= len(data):
        length, kind, _flags, _seq, _pid = _HEADER.unpack_from(data, pos)
        yield kind, view[pos + _HEADER.size : pos + length]
        pos += (length + 3) & ~3


def _address(diag_msg: memoryview) -> Address:
    """The remote address of a struct inet_diag_msg."""
    if diag_msg[0] == socket.AF_INET:
        return ipaddress.IPv4Address(bytes(diag_msg[_DIAG_MSG_DST : _DIAG_MSG_DST + 4]))
    address = ipaddress.IPv6Address(bytes(diag_msg[_DIAG_MSG_DST : _DIAG_MSG_DST + 16]))
    return address.ipv4_mapped or address  # an IPv4 client of a dual-stack port is its IPv4 address


def _descriptors_by_inode(wanted: set[int]) -> dict[int, int]:
    """For each socket inode in `wanted` that this process holds, its descriptor."""
    found: dict[int, int] = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inode = int(target[8:-1])
            if inode in wanted:
                found[inode] = int(name)
    return found


def _shut_down(fd: int, inode: int) -> bool:
    """Shut down the socket `fd` when it still is socket `inode`; the descriptor stays open."""
    try:
        dup = os.dup(fd)
    except OSError:
        return False  # closed meanwhile
    try:
        if os.fstat(dup).st_ino != inode:
            return False  # the number was reused for another file
        sock = socket.socket(fileno=dup)
    except OSError:
        os.close(dup)
        return False
    try:
        sock.shutdown(socket.SHUT_RDWR)
        return True
    except OSError:
        return False  # already gone
    finally:
        sock.close()  # the duplicate only


class ConnectionGuard:
    """Keeps each client address to `max_per_address` connections on `ports` (see the module).

    `shared`: other processes listen on the same ports (`reuse_port`): a pass then counts only
    the sockets this process holds (one more read of /proc/self/fd per pass that scans).

    `on_cut(address, count)` is called from the guard's thread for every address it cut
    connections of in a pass; `on_full()` for every pass that found `max_connections`
    connections on the port (gRPC then refuses new ones, which it does not report).
    `memory_release_bytes`: the heap a flood left is given back past that many bytes (0: never).
    One line per address per `log_interval` seconds says how many were cut since the last.
    """

    def __init__(
        self,
        ports: Sequence[int],
        max_per_address: int,
        *,
        shared: bool = False,
        exempt: Iterable[Network] = (),
        max_connections: int = 0,
        memory_release_bytes: int = 0,
        interval: float = 0.5,
        log_interval: float = 10.0,
        on_cut: Callable[[str, int], None] | None = None,
        on_full: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.ports = tuple(ports)
        self.shared = shared
        self.max_per_address = max_per_address
        self.exempt = tuple(exempt)
        self.max_connections = max_connections
        self.interval = interval
        self.log_interval = log_interval
        self._on_cut = on_cut
        self._on_full = on_full
        self._clock = clock
        self.cut_total = 0
        self._unlogged: dict[str, int] = {}  # address -> cut since its last line
        self._logged_at: dict[str, float] = {}
        self._last_scan: dict[str, object] | None = None
        self._seen: set[int] = set()  # the socket inodes of the last pass
        # Opened once and kept: a pass still works when the process is out of descriptors.
        self._netlink: socket.socket | None = None
        # Gives back the heap a flood left (looked at every few passes).
        self._heap = _memory.HeapWatch(self._clock, memory_release_bytes)
        self._failures = 0  # passes failed since the last line about them
        self._failure_logged = -math.inf
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.max_per_address > 0 or self.max_connections > 0

    @property
    def _threshold(self) -> int:
        """Descriptors at or below which no address can be over the limit, nor the port full."""
        limits = [n for n in (self.max_per_address, self.max_connections) if n > 0]
        return min(limits) if limits else 2**62

    def start(self) -> None:
        if not self.enabled:
            return
        try:
            if not os.path.isdir("/proc/self/fd"):
                raise OSError("no /proc/self/fd")
            self._netlink = sock_diag()
        except (OSError, AttributeError) as exc:  # not Linux (no AF_NETLINK), or netlink refused
            logger.warning("event=connection_guard_off max_connections_per_address=not_enforced error=%s", exc)
            return
        self._thread = threading.Thread(target=self._run, name="pacsys-connection-guard", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._netlink is not None:
            self._netlink.close()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception as exc:  # out of descriptors (a dup), ...: the next pass tries again
                self._failed(exc)

    def _failed(self, exc: Exception) -> None:
        """A pass that failed: one line per log_interval, counting them."""
        if self._netlink is not None:
            self._netlink.close()  # a dump cut short may have left replies in it: a new one
            self._netlink = None
        self._failures += 1
        now = self._clock()
        if now - self._failure_logged >= self.log_interval:
            logger.warning("event=connection_guard_failed error=%r count=%d", exc, self._failures)
            self._failure_logged = now
            self._failures = 0

    def check(self) -> int:
        """One pass: the connections cut."""
        cut = 0
        descriptors = open_descriptors()
        self._heap.check()
        if descriptors > self._threshold:
            if self._netlink is None:
                self._netlink = sock_diag()
            by_address: dict[Address, list[int]] = collections.defaultdict(list)
            for port in self.ports:
                for s in sockets_on_port(self._netlink, port):
                    by_address[s.address].append(s.inode)
            if self.shared:
                by_address = self._held(by_address)
            total = sum(len(inodes) for inodes in by_address.values())
            self._last_scan = {
                "at": time.time(),
                "connections": total,
                "busiest": [
                    [str(a), len(i)] for a, i in sorted(by_address.items(), key=lambda kv: -len(kv[1]))[:BUSIEST]
                ],
            }
            if self.max_connections and total >= self.max_connections and self._on_full is not None:
                self._on_full()
            if self.max_per_address > 0:
                cut = self._cut_excess(by_address)
            self._seen = {inode for inodes in by_address.values() for inode in inodes}
        else:
            self._seen = set()
        self._log_cuts()
        return cut

    @staticmethod
    def _held(by_address: dict[Address, list[int]]) -> dict[Address, list[int]]:
        """Only the sockets this process holds (another process on the port has its own)."""
        mine = _descriptors_by_inode({inode for inodes in by_address.values() for inode in inodes})
        held: dict[Address, list[int]] = collections.defaultdict(list)
        for address, inodes in by_address.items():
            for inode in inodes:
                if inode in mine:
                    held[address].append(inode)
        return held

    def _cut_excess(self, by_address: dict[Address, list[int]]) -> int:
        excess: dict[Address, list[int]] = {}
        for address, inodes in by_address.items():
            if len(inodes) > self.max_per_address and not any(address in net for net in self.exempt):
                # Newest last: those seen in the last pass are older than those it did not see;
                # among each, a higher inode is mostly a newer socket (the kernel hands inode
                # numbers out in per-CPU batches, so not strictly).
                oldest_first = sorted(inodes, key=lambda i: (i not in self._seen, i))
                excess[address] = oldest_first[self.max_per_address :]
        if not excess:
            return 0
        fds = _descriptors_by_inode({inode for inodes in excess.values() for inode in inodes})
        cut = 0
        for address, inodes in excess.items():
            n = sum(_shut_down(fds[inode], inode) for inode in inodes if inode in fds)
            if n:
                cut += n
                peer = str(address)
                self._unlogged[peer] = self._unlogged.get(peer, 0) + n
                if self._on_cut is not None:
                    self._on_cut(peer, n)
        self.cut_total += cut
        return cut

    def _log_cuts(self) -> None:
        """One line per address per log_interval, counting the connections cut since its last."""
        now = self._clock()
        for peer, count in list(self._unlogged.items()):
            if now - self._logged_at.get(peer, -1e18) >= self.log_interval:
                logger.warning(
                    "event=connections_cut peer=%s count=%d limit=max_connections_per_address max=%d",
                    peer,
                    count,
                    self.max_per_address,
                )
                self._logged_at[peer] = now
                del self._unlogged[peer]
        if len(self._logged_at) > 10_000:  # bounded: forget addresses not logged for an interval
            self._logged_at = {p: t for p, t in self._logged_at.items() if now - t < self.log_interval}

    def snapshot(self) -> dict[str, object]:
        """For the status view: the limit, the connections cut so far, and the last scan's
        busiest addresses (a scan runs only while the process holds many descriptors)."""
        return {
            "max_per_address": self.max_per_address,
            "cut": self.cut_total,
            "last_scan": self._last_scan,
        }
