"""Identities and identity patterns (pacsys/supervised/_identity.py), without a server.

The same cases through real mutual TLS are in tests/test_tls.py; these cover the rule's corners.
"""

import pytest

from pacsys.supervised._identity import Callers, IdentityPattern, IdentityPatternError, client_identity, parse_dn


def test_parse_dn_unescapes_values_and_keeps_multi_valued_rdns():
    assert parse_dn(r"CN=ops-x\, O=Evil,O=Test Lab") == [[("CN", "ops-x, O=Evil")], [("O", "Test Lab")]]
    assert parse_dn(r"CN=op\C3\A9-1,O=Test Lab") == [[("CN", "opé-1")], [("O", "Test Lab")]]
    assert parse_dn(r"UID=u1+CN=ops-1,O=Test Lab") == [[("UID", "u1"), ("CN", "ops-1")], [("O", "Test Lab")]]
    assert parse_dn(r"CN=\ lead , O = x") == [[("CN", " lead")], [("O", "x")]]  # spaces by hand; escaped kept
    assert parse_dn("2.5.4.3=#0c0161") == [[("2.5.4.3", "#0c0161")]]


@pytest.mark.parametrize("text", ["", "ops", "CN=a;b", 'CN=a"b', "CN=a\\", r"CN=\q", r"CN=\C3", "CN=a,,O=b"])
def test_parse_dn_refuses_what_is_not_rfc_4514(text):
    with pytest.raises(ValueError):
        parse_dn(text)


@pytest.mark.parametrize(
    ("pattern", "identity", "matches"),
    [
        ("CN=ops-*", "CN=ops-1,O=Test Lab", True),
        ("CN=ops-*", "O=Test Lab,CN=ops-1", True),  # order does not matter
        ("cn=ops-*, o=Test Lab", "CN=ops-1,O=Test Lab", True),  # types in any case, spaces by hand
        ("CN=ops-*,O=Test Lab", "CN=ops-1,O=Elsewhere", False),
        ("CN=ops-*", "CN=Ops-1,O=Test Lab", False),  # values are case-sensitive
        ("CN=ops-1", "UID=u1+CN=ops-1,O=Test Lab", True),  # an attribute of a multi-valued RDN
        # Fail closed: an escaped separator inside a value, two CNs, a subject that does not parse.
        ("CN=ops-*", r"CN=ops-x\, O=Test Lab,O=Elsewhere", False),
        (r"CN=ops-x\, O=Test Lab", r"CN=ops-x\, O=Test Lab,O=Elsewhere", True),  # spelled out
        ("CN=ops-*", r"CN=ops-x\+O=Test Lab", False),
        ("CN=ops-*", "CN=ops-1,CN=guest,O=Test Lab", False),
        ("O=Test Lab", "CN=ops-1,CN=guest,O=Test Lab", True),  # a pattern that does not name CN
        ("CN=ops-*", "CN=ops-1;O=x", False),
        ("CN=op?-1", r"CN=op\C3\A9-1", True),  # ? is one character, after decoding
        (r"CN=ops\*", "CN=ops*", True),
        (r"CN=ops\*", "CN=ops-1", False),
        # Certificate names and addresses: the whole identity, brackets literal.
        ("DNS:*.example", "DNS:ops1.example", True),
        ("URI:spiffe://example.org/ops/*", "URI:spiffe://example.org/ops/2", True),
        ("ipv6:[::1]", "ipv6:[::1]", True),
        ("ipv6:[::1]", "ipv6:1", False),
        ("ipv4:10.0.1.*", "ipv4:10.0.1.7", True),
        # Kinds never match one another.
        ("CN=*", "DNS:CN=ops-1", False),
        ("CN=*", "ipv4:10.0.0.1", False),
        ("DNS:*", "CN=DNS:x", False),
        ("*", "CN=anyone", True),
        ("*", "ipv4:10.0.0.1", True),
    ],
)
def test_identity_patterns(pattern, identity, matches):
    assert IdentityPattern(pattern).matches(identity) is matches


@pytest.mark.parametrize(("pattern", "fragment"), [("ops*", "not an identity pattern"), ("CN=a,cn=b", "CN twice")])
def test_patterns_of_no_known_form_are_refused(pattern, fragment):
    with pytest.raises(IdentityPatternError, match=fragment):
        IdentityPattern(pattern)


def test_identity_from_subject_then_san_then_address():
    subject = {"x509_subject": [b"CN=ops-1,O=Test Lab"], "peer_dns": [b"ops1.example"]}
    assert client_identity(subject, "ipv4:10.0.0.1:5") == "CN=ops-1,O=Test Lab"
    san = {"x509_subject": [b""], "peer_ip": [b"10.0.0.1"], "peer_email": [b"ops@example.org"]}
    assert client_identity(san, "ipv4:10.0.0.1:5") == "email:ops@example.org"
    san["peer_dns"] = [b"ops1.example", b"ops2.example"]
    assert client_identity(san, "ipv4:10.0.0.1:5") == "DNS:ops1.example"
    san["peer_uri"] = [b"spiffe://example.org/ops/1"]
    assert client_identity(san, "ipv4:10.0.0.1:5") == "URI:spiffe://example.org/ops/1"
    assert client_identity({"x509_subject": [b""]}, "ipv4:10.0.0.1:5") == "ipv4:10.0.0.1"  # no name at all
    assert client_identity({}, "ipv6:%5B::1%5D:40000") == "ipv6:[::1]"
    assert client_identity({}, "unix:/run/pacsys.sock") == "unix:/run/pacsys.sock"


class _Context:
    """A call's context as `Callers` reads it: its peer, and its auth context (counted)."""

    def __init__(self, peer: str, auth: dict | None = None):
        self._peer = peer
        self.auth = auth or {}
        self.asked = 0

    def peer(self) -> str:
        return self._peer

    def auth_context(self) -> dict:
        self.asked += 1
        return self.auth


def test_without_client_certificates_the_identity_is_the_address_remembered_per_peer():
    for tls in (False, True):
        callers = Callers(tls=tls, client_certificates=False)
        call = _Context("ipv6:%5B::1%5D:40000")
        assert callers.identify(call, call.peer()) == ("ipv6:[::1]", tls)
        assert callers.identify(call, call.peer()) == ("ipv6:[::1]", tls)
        assert call.asked == 0  # a fact of the port and of the peer string: nothing asked of gRPC
    callers = Callers(tls=False, client_certificates=False)
    for port in range(Callers.PEERS_KEPT + 10):
        call = _Context(f"ipv4:10.0.0.1:{port}")
        assert callers.identify(call, call.peer()) == ("ipv4:10.0.0.1", False)
    assert len(callers._hosts) <= Callers.PEERS_KEPT  # bounded whatever the clients do


def test_under_mutual_tls_each_call_is_identified_by_its_own_certificate():
    """No identity is remembered by ip:port: another client may come from the same port later."""
    callers = Callers(tls=True, client_certificates=True)
    ops = _Context("ipv4:10.0.0.1:5", {"x509_subject": [b"CN=ops-1,O=Test Lab"]})
    guest = _Context("ipv4:10.0.0.1:5", {"x509_subject": [b"CN=guest,O=Test Lab"]})
    assert callers.identify(ops, ops.peer()) == ("CN=ops-1,O=Test Lab", True)
    assert callers.identify(guest, guest.peer()) == ("CN=guest,O=Test Lab", True)
    assert (ops.asked, guest.asked) == (1, 1)  # once per call, for the identity and TLS together


def test_beside_a_plaintext_port_tls_is_asked_of_each_call_and_the_address_remembered():
    callers = Callers(tls=None, client_certificates=False)
    plain = _Context("ipv4:10.0.0.1:5", {"transport_security_type": [b"insecure"]})
    tls = _Context("ipv4:10.0.0.1:5", {"transport_security_type": [b"ssl"], "x509_subject": [b"CN=ops-1"]})
    assert callers.identify(plain, plain.peer()) == ("ipv4:10.0.0.1", False)
    assert callers.identify(tls, tls.peer()) == ("ipv4:10.0.0.1", True)  # no certificates asked there
    assert (plain.asked, tls.asked) == (1, 1)


def test_a_servicer_on_a_port_it_does_not_know_asks_each_call():
    callers = Callers()
    plain = _Context("ipv4:10.0.0.1:5", {"transport_security_type": [b"insecure"]})
    tls = _Context("ipv4:10.0.0.1:6", {"transport_security_type": [b"ssl"], "x509_subject": [b"CN=ops-1"]})
    assert callers.identify(plain, plain.peer()) == ("ipv4:10.0.0.1", False)
    assert callers.identify(tls, tls.peer()) == ("CN=ops-1", True)
