"""Who a client is, and what each client may hold at once.

A client is known by its identity: the subject of its TLS client certificate when it
presented one, else its address without the port (a new connection from the same host is
the same client). Per identity the gateway counts open streams, one-shot calls in flight,
and the readings per second its open streams asked for; each has a limit, so one client
cannot take what the others need.

Delivery is paced per stream and per client by token buckets (`Bucket`): a stream that
receives more than its budget waits, its own buffer fills and drops its own oldest
readings, and the event loop serves everyone else meanwhile.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import unquote

__all__ = ["Bucket", "PeerLimit", "Peers", "is_loopback", "peer_host"]


def peer_host(peer: str) -> str:
    """``ipv4:10.0.0.5:51234`` -> ``ipv4:10.0.0.5``; ``ipv6:%5B::1%5D:5`` -> ``ipv6:[::1]``
    (gRPC percent-encodes the brackets); others unchanged."""
    if peer.startswith(("ipv4:", "ipv6:")):
        return unquote(peer.rsplit(":", 1)[0])
    return peer


def is_loopback(peer: str) -> bool:
    """True for a peer on this host: a loopback address or a Unix socket."""
    if peer.startswith("unix:"):
        return True
    host = peer_host(peer).split(":", 1)[-1].strip("[]")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


class Bucket:
    """A token bucket: `rate` tokens a second, holding at most one second's worth."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self._clock = clock
        self._tokens = rate
        self._at = clock()

    def take(self, n: int) -> float:
        """Take `n` tokens; the seconds the taker must wait to stay within the rate (0: none)."""
        now = self._clock()
        self._tokens = min(self.rate, self._tokens + (now - self._at) * self.rate)
        self._at = now
        self._tokens -= n
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


class PeerLimit(Exception):
    """A per-client limit bit: `limit` names the setting, the message says what happened."""

    def __init__(self, limit: str, message: str):
        super().__init__(message)
        self.limit = limit


@dataclass
class _Peer:
    streams: int = 0
    calls: int = 0
    rate: float = 0.0  # readings per second its open streams asked for
    bucket: Bucket | None = None


@dataclass
class Peers:
    """Per-identity counts and limits. Used from the server's event loop only (no lock)."""

    max_streams: int
    max_streams_per_peer: int
    max_calls_per_peer: int
    max_peer_rate: float
    streams: int = 0  # every open streaming Read
    _table: dict[str, _Peer] = field(default_factory=dict)

    def open_stream(self, who: str, rate: float = 0.0) -> None:
        """Count a new stream of `who` asking for `rate` readings/s; PeerLimit when over a limit."""
        peer = self._table.setdefault(who, _Peer())
        try:
            if self.streams >= self.max_streams:
                raise PeerLimit("max_streams", f"too many open streams (the limit is {self.max_streams})")
            if peer.streams >= self.max_streams_per_peer:
                raise PeerLimit(
                    "max_streams_per_peer",
                    f"too many open streams from {who} (the limit is {self.max_streams_per_peer})",
                )
            if rate and peer.rate + rate > self.max_peer_rate:
                raise PeerLimit(
                    "max_peer_rate",
                    f"{who}'s streams would ask for {peer.rate + rate:.0f} readings/s "
                    f"(the limit is {self.max_peer_rate:g} per client)",
                )
        except PeerLimit:
            self._forget_if_idle(who, peer)
            raise
        peer.streams += 1
        peer.rate += rate
        self.streams += 1

    def close_stream(self, who: str, rate: float = 0.0) -> None:
        peer = self._table.get(who)
        self.streams -= 1
        if peer is not None:
            peer.streams -= 1
            peer.rate = max(0.0, peer.rate - rate)
            self._forget_if_idle(who, peer)

    def begin_call(self, who: str) -> None:
        """Count a one-shot call in flight; PeerLimit when `who` has too many."""
        peer = self._table.setdefault(who, _Peer())
        if peer.calls >= self.max_calls_per_peer:
            self._forget_if_idle(who, peer)
            raise PeerLimit(
                "max_calls_per_peer", f"too many calls in flight from {who} (the limit is {self.max_calls_per_peer})"
            )
        peer.calls += 1

    def end_call(self, who: str) -> None:
        peer = self._table.get(who)
        if peer is not None:
            peer.calls -= 1
            self._forget_if_idle(who, peer)

    def bucket(self, who: str) -> Bucket:
        """The shared delivery budget of `who`'s streams (while it has any)."""
        peer = self._table.setdefault(who, _Peer())
        if peer.bucket is None:
            peer.bucket = Bucket(self.max_peer_rate)
        return peer.bucket

    def _forget_if_idle(self, who: str, peer: _Peer) -> None:
        if peer.streams <= 0 and peer.calls <= 0:
            self._table.pop(who, None)
