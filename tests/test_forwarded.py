"""The client a trusted proxy forwards (pacsys/supervised/_forwarded.py), without a server.

Through real haproxy: tests/test_trusted_proxies.py.
"""

import pytest

from pacsys.supervised._forwarded import ForwardedError, TrustedProxies

PROXIES = TrustedProxies(["127.0.0.2", "10.1.0.0/16", "fd00::/64"])


@pytest.mark.parametrize(
    ("peer", "trusted"),
    [
        ("ipv4:127.0.0.2:40000", True),
        ("ipv4:127.0.0.1:40000", False),
        ("ipv4:10.1.200.3:1", True),
        ("ipv4:10.2.0.1:1", False),
        ("ipv6:%5Bfd00::7%5D:5000", True),  # gRPC percent-encodes the brackets
        ("ipv6:%5B::ffff:127.0.0.2%5D:5000", True),  # an IPv4 client of a [::] listener
        ("ipv6:%5Bfd01::7%5D:5000", False),
        ("unix:/run/pacsys.sock", False),
    ],
)
def test_a_proxy_is_trusted_by_its_address(peer, trusted):
    assert PROXIES.trusts(peer) is trusted


def test_the_last_address_of_the_last_header_names_the_client():
    proxy = "ipv4:127.0.0.2:40000"
    assert PROXIES.client(proxy, [("x-forwarded-for", "203.0.113.7")]) == ("ipv4:203.0.113.7:0", "ipv4:203.0.113.7")
    # What the client sent comes first; the nearest proxy's address last.
    chained = [("x-forwarded-for", "198.51.100.1, 203.0.113.7"), ("authorization", "Bearer t")]
    assert PROXIES.client(proxy, chained) == ("ipv4:203.0.113.7:0", "ipv4:203.0.113.7")
    two_lines = [("x-forwarded-for", "198.51.100.1"), ("x-forwarded-for", "203.0.113.8")]
    assert PROXIES.client(proxy, two_lines) == ("ipv4:203.0.113.8:0", "ipv4:203.0.113.8")
    assert PROXIES.client(proxy, [("x-forwarded-for", "2001:db8::1")]) == ("ipv6:[2001:db8::1]:0", "ipv6:[2001:db8::1]")
    assert PROXIES.client(proxy, [("x-forwarded-for", "[2001:db8::1]")])[1] == "ipv6:[2001:db8::1]"
    assert PROXIES.client(proxy, [("x-forwarded-for", "::ffff:192.0.2.5")])[1] == "ipv4:192.0.2.5"


def test_a_call_not_from_a_trusted_proxy_or_without_the_header_is_its_own_client():
    header = [("x-forwarded-for", "203.0.113.7")]
    assert PROXIES.client("ipv4:127.0.0.1:40000", header) is None  # a direct client's header is ignored
    assert PROXIES.client("ipv4:127.0.0.2:40000", [("authorization", "Bearer t")]) is None  # the proxy's host
    assert TrustedProxies([]).client("ipv4:127.0.0.2:40000", header) is None


@pytest.mark.parametrize("value", ["", "unknown", "203.0.113.7, ", "203.0.113.7:5000", "x" * 5000])
def test_a_trusted_proxys_header_that_does_not_end_with_an_address_is_refused(value):
    with pytest.raises(ForwardedError, match="x-forwarded-for from a trusted proxy must end with the client's address"):
        PROXIES.client("ipv4:127.0.0.2:40000", [("x-forwarded-for", value)])
    if len(value) > 100:
        with pytest.raises(ForwardedError) as refused:
            PROXIES.client("ipv4:127.0.0.2:40000", [("x-forwarded-for", value)])
        assert len(str(refused.value)) < 200  # an excerpt, not the header


def test_an_entry_that_is_not_an_address_or_a_network_is_an_error():
    with pytest.raises(ValueError):
        TrustedProxies(["proxy.example"])
