"""The client behind a proxy: the address a trusted proxy forwards in `x-forwarded-for`.

A proxy in HTTP mode (haproxy, `ops/haproxy.cfg`) makes its own connections to the instances,
so every call through it comes from the proxy's address: one client for the per-client
limits, a local one for the status view when the proxy runs on the same host, one host for
host grants and the audit. The proxy names the client in the header `x-forwarded-for`
(haproxy: `option forwardfor`), which anyone can send; it is believed only from the
addresses of the `trusted_proxies` setting, and only its last address, the one the nearest
proxy added (a client's own header comes before it, when the proxy keeps it).

A call from a trusted proxy that carries the header is the client it names: its peer is that
address with port 0 (the proxy does not pass the client's port), its identity that address,
whatever certificate the proxy presented (the proxy's subject says nothing of the client; a
client's certificate ends at the proxy). A call from a trusted proxy without the header is the
proxy's host itself (a program on that host calling directly), and a header whose last
element is not an address is refused (INVALID_ARGUMENT, `ForwardedError`), never taken for
the proxy's own call. From any other address the header is not looked at.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Sequence

from pacsys.supervised._connection_guard import parse_networks
from pacsys.supervised._peers import peer_host

__all__ = ["HEADER", "ForwardedError", "TrustedProxies"]

HEADER = "x-forwarded-for"
SHOWN_CHARS = 64  # of a header that is not an address, in the refusal's details


class ForwardedError(ValueError):
    """A trusted proxy's `x-forwarded-for` that does not end with an address."""


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _address(text: str) -> IPAddress:
    """An IP address (IPv4-mapped IPv6 as IPv4); ValueError when `text` is none."""
    address = ipaddress.ip_address(text.strip().strip("[]"))
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@functools.lru_cache(maxsize=4096)
def _forwarded_peer(element: str) -> str:
    """`203.0.113.7` -> ``ipv4:203.0.113.7:0``; `2001:db8::1` -> ``ipv6:[2001:db8::1]:0``."""
    try:
        address = _address(element)
    except ValueError:
        shown = element if len(element) <= SHOWN_CHARS else element[:SHOWN_CHARS] + "..."
        raise ForwardedError(
            f"{HEADER} from a trusted proxy must end with the client's address, got {shown!r}"
        ) from None
    if address.version == 4:
        return f"ipv4:{address}:0"
    return f"ipv6:[{address}]:0"


class TrustedProxies:
    """The proxies of `trusted_proxies` (addresses or networks) and the clients they forward.

    Raises ValueError for an entry that is not an address or a network.
    """

    def __init__(self, networks: Iterable[str]):
        self.networks = parse_networks(networks)
        # Per host address, not per peer string: a proxy's connections differ by their port only.
        self._trusts = functools.lru_cache(maxsize=4096)(self._trusts_host)

    def _trusts_host(self, host: str) -> bool:
        try:
            address = _address(host.split(":", 1)[-1])
        except ValueError:
            return False  # unix:, or anything else that is not an IP address
        return any(address in network for network in self.networks)

    def trusts(self, peer: str) -> bool:
        """True when `peer` (gRPC's ``ipv4:10.0.0.5:51234``) is one of the trusted proxies."""
        return self._trusts(peer_host(peer))

    def client(self, peer: str, metadata: Sequence[tuple[str, str | bytes]]) -> tuple[str, str] | None:
        """(peer, identity) of the client a trusted proxy forwards (``ipv4:203.0.113.7:0``,
        ``ipv4:203.0.113.7``), or None when the call is not from a trusted proxy or carries no
        `x-forwarded-for`; ForwardedError when the header does not end with an address."""
        if not self.trusts(peer):
            return None
        forwarded = None
        for key, value in metadata:
            if key == HEADER:
                forwarded = value  # the last one: what the nearest proxy added
        if forwarded is None:
            return None
        text = forwarded.decode("latin-1") if isinstance(forwarded, bytes) else forwarded
        forwarded_peer = _forwarded_peer(text.rsplit(",", 1)[-1].strip())
        return forwarded_peer, peer_host(forwarded_peer)

    def __repr__(self) -> str:
        return f"TrustedProxies({[str(n) for n in self.networks]!r})"
