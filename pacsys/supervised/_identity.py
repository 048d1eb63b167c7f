"""Who a client is (its identity), and the identity patterns that write grants match.

An identity is one of three kinds of text, told apart by how it starts:

- a certificate subject, as gRPC reports it under mutual TLS: RFC 4514, the most specific
  RDN first, bytes beyond ASCII as ``\\XX`` pairs (``CN=ops-1,O=Fermilab``);
- for a certificate whose subject is empty, one name of its subject alternative name, the
  first of these kinds that it has, in this order: ``URI:`` (a SPIFFE ID, say), ``DNS:``,
  ``email:``, ``IP:`` (``DNS:ops1.example``); within a kind, the certificate's first;
- else the client's address without its port: ``ipv4:10.0.0.5``, ``ipv6:[::1]``,
  ``unix:/run/pacsys.sock`` (gRPC writes the brackets as ``%5B``/``%5D``: decoded here).

A subject never starts with one of those ``kind:`` prefixes (an RFC 4514 attribute type
holds no ``:``), so the kinds cannot be taken for one another.

Patterns (`IdentityPattern`) follow the same kinds. A subject pattern is itself a DN whose
values may hold ``*`` (any characters) and ``?`` (one): it is matched against the parsed
attributes of the subject, never against its text, so an escaped ``\\,`` in a value cannot
pass for a separator. See `IdentityPattern` for the rule.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from pacsys.supervised._peers import peer_host

if TYPE_CHECKING:
    import grpc

__all__ = [
    "SAN_KINDS",
    "Callers",
    "IdentityPattern",
    "IdentityPatternError",
    "client_identity",
    "parse_dn",
]

ADDRESS_KINDS = ("ipv4:", "ipv6:", "unix:")
# gRPC's auth context property of each SAN kind, in the order an identity is taken from them.
SAN_KINDS = (("URI:", "peer_uri"), ("DNS:", "peer_dns"), ("email:", "peer_email"), ("IP:", "peer_ip"))
_SAN_PREFIXES = tuple(prefix for prefix, _ in SAN_KINDS)

# The characters RFC 4514 escapes in a value, and those a wildcard never stands for: a value
# that holds one (or a control character) matches only a pattern that spells it out.
_ESCAPABLE = frozenset(',+"\\<>;=# ')
_MUST_ESCAPE = frozenset('"<>;')
_WILDCARD_EXCLUDES = r',+"\\<>;=\x00-\x1f\x7f'
_ATTRIBUTE_TYPE = re.compile(r"\s*([A-Za-z][A-Za-z0-9-]*|[0-9]+(?:\.[0-9]+)*)\s*=")


class Callers:
    """Who each call comes from and whether it came over TLS, asking gRPC as little per call as
    the ports allow.

    Whether calls come over TLS is a fact of the port (`tls`; None: asked of each call, as on a
    server with a plaintext port beside its TLS one), and so is whether its clients present
    certificates (`client_certificates`: mutual TLS; None: not known). Without client
    certificates an identity is the peer's address, a pure function of the peer string:
    remembered per peer (at most `PEERS_KEPT`, then forgotten at once). Under mutual TLS the
    auth context is asked once per call and nothing is remembered: grpc.aio shows no
    connection, and a client port used again by another client must not inherit a
    certificate's identity. `Callers()`, for a servicer mounted on a server it does not know,
    asks each call for both.
    """

    PEERS_KEPT = 4096

    def __init__(self, tls: bool | None = None, client_certificates: bool | None = None):
        self.tls = tls
        self.client_certificates = client_certificates
        self._hosts: dict[str, str] = {}

    def identify(self, context: grpc.aio.ServicerContext, peer: str) -> tuple[str, bool]:
        """The identity of the call's client (`peer` is `context.peer()`), and whether it came over TLS."""
        tls = self.tls
        if tls is None or self.client_certificates is not False:
            auth = context.auth_context() or {}
            if tls is None:
                tls = auth.get("transport_security_type") == [b"ssl"]
            if self.client_certificates is not False:
                return client_identity(auth, peer), tls
        host = self._hosts.get(peer)
        if host is None:
            if len(self._hosts) >= self.PEERS_KEPT:
                self._hosts.clear()
            host = self._hosts[peer] = peer_host(peer)
        return host, tls


def client_identity(auth: Mapping[str, Sequence[bytes]], peer: str) -> str:
    """The identity from gRPC's auth context (certificate properties) and its peer string."""
    for key in ("x509_subject", "x509_common_name"):
        values = auth.get(key)
        if values and values[0]:
            return values[0].decode("utf-8", "replace")
    for prefix, key in SAN_KINDS:
        values = auth.get(key)
        if values and values[0]:
            return prefix + values[0].decode("utf-8", "replace")
    return peer_host(peer)


def parse_dn(text: str) -> list[list[tuple[str, str]]]:
    """An RFC 4514 distinguished name as its RDNs, each a list of (type, value) pairs.

    Values come unescaped (``\\,`` -> ``,``; ``\\C3\\A9`` -> ``é``); a value in ``#hex`` form
    is kept as written. Spaces around separators are skipped (as people write DNs by hand).
    Raises ValueError naming what is wrong.
    """
    return [[(kind, _unescape(tokens, text)) for kind, tokens in rdn] for rdn in _split_dn(text)]


# One character of a value: an escaped pair of hex digits, an escaped character, or a plain one.
_VALUE_TOKEN = re.compile(r"\\[0-9A-Fa-f]{2}|\\.|[^\\]", re.DOTALL)


def _split_dn(text: str) -> list[list[tuple[str, list[str]]]]:
    """The RDNs of `text`, each value still escaped, as its tokens (see _VALUE_TOKEN)."""
    rdns: list[list[tuple[str, list[str]]]] = []
    rdn: list[tuple[str, list[str]]] = []
    pos = 0
    while True:
        match = _ATTRIBUTE_TYPE.match(text, pos)
        if match is None:
            raise ValueError(f"expected an attribute type and '=' at character {pos} of {text!r}")
        tokens: list[str] = []
        pos = match.end()
        while pos < len(text) and text[pos] not in ",+":
            token = _VALUE_TOKEN.match(text, pos)
            if token is None:
                raise ValueError(f"a lone '\\' ends {text!r}")
            tokens.append(token.group())
            pos = token.end()
        while tokens and tokens[0] == " ":
            del tokens[0]
        while tokens and tokens[-1] == " ":
            del tokens[-1]
        rdn.append((match.group(1), tokens))
        if pos == len(text):
            rdns.append(rdn)
            return rdns
        if text[pos] == ",":
            rdns.append(rdn)
            rdn = []
        pos += 1  # past ',' or '+'


def _unescape(tokens: Sequence[str], text: str) -> str:
    out = bytearray()
    for token in tokens:
        if len(token) == 3:
            out.append(int(token[1:], 16))
        elif len(token) == 2:
            if token[1] not in _ESCAPABLE and token[1] not in "*?":  # \* and \? for patterns
                raise ValueError(f"bad escape {token!r} in {text!r}")
            out += token[1].encode()
        elif token in _MUST_ESCAPE:
            raise ValueError(f"{token!r} must be escaped in {text!r}")
        else:
            out += token.encode()
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"a value of {text!r} is not UTF-8") from None


@functools.lru_cache(maxsize=1024)
def _subject_attributes(subject: str) -> dict[str, list[str]] | None:
    """A subject's values by attribute type (upper-cased), or None when it does not parse."""
    try:
        rdns = parse_dn(subject)
    except ValueError:
        return None
    attributes: dict[str, list[str]] = {}
    for rdn in rdns:
        for kind, value in rdn:
            attributes.setdefault(kind.upper(), []).append(value)
    return attributes


def _glob(pattern: str) -> re.Pattern[str]:
    """`*` (any characters) and `?` (one) as wildcards, everything else literal (brackets too)."""
    parts = [".*" if part == "*" else "." if part == "?" else re.escape(part) for part in re.split(r"([*?])", pattern)]
    return re.compile("".join(parts), re.DOTALL)


def _value_glob(tokens: Sequence[str], text: str) -> re.Pattern[str]:
    """A subject pattern's value: unescaped `*` and `?` are wildcards that never stand for a
    character RFC 4514 escapes or a control character; the rest is literal, unescaped."""
    parts: list[str] = []
    literal: list[str] = []
    for token in [*tokens, ""]:
        if token in ("*", "?", ""):
            parts.append(re.escape(_unescape(literal, text)))
            literal = []
            if token:
                parts.append(f"[^{_WILDCARD_EXCLUDES}]" + ("*" if token == "*" else ""))
        else:
            literal.append(token)
    return re.compile("".join(parts))


class IdentityPatternError(ValueError):
    """An identity pattern that is none of the forms `IdentityPattern` takes."""


class IdentityPattern:
    """One pattern of a write grant's `identities`; `matches(identity)` says whether it applies.

    - ``*`` alone matches every identity.
    - An address or SAN pattern (``ipv4:10.0.1.*``, ``ipv6:[fd00::*]``, ``unix:*``,
      ``DNS:*.ops.example``, ``URI:spiffe://example/ops/*``, ``email:*@example.org``,
      ``IP:10.0.0.?``) is matched against the whole identity: ``*`` stands for any characters,
      ``?`` for one, everything else for itself (brackets too). Case-sensitive.
    - Anything else is a subject pattern: a DN (``CN=ops-*``, ``CN=ops-*,O=Fermilab``) whose
      values may hold ``*`` and ``?`` (``\\*`` is a star). It matches a certificate subject
      when, for every attribute type it names, the subject has exactly one attribute of that
      type and that value matches (types case-insensitive, values case-sensitive; the order
      of attributes does not matter, and types it does not name are not looked at). Fail
      closed: a subject with two CNs matches no pattern that names CN; a wildcard never
      stands for ``, + " \\ < > ; =`` or a control character, so a value made to look like
      more attributes (``CN=ops-1\\, O=Fermilab``) matches only a pattern that spells it out;
      a subject that does not parse matches no subject pattern.

    Raises IdentityPatternError for a pattern of none of these forms, or a subject pattern
    that is not a DN or names a type twice.
    """

    def __init__(self, text: str):
        self.text = text
        self._anything = text == "*"
        self._whole: re.Pattern[str] | None = None
        self._attributes: dict[str, re.Pattern[str]] = {}
        if self._anything:
            return
        if text.startswith(ADDRESS_KINDS + _SAN_PREFIXES):
            self._whole = _glob(text)
            return
        try:
            rdns = _split_dn(text)
            globs = [[(kind, _value_glob(tokens, text)) for kind, tokens in rdn] for rdn in rdns]
        except ValueError as exc:
            raise IdentityPatternError(
                f"{text!r} is not an identity pattern: a subject (CN=ops-*), a certificate name "
                f"({', '.join(p + '...' for p in _SAN_PREFIXES)}), an address "
                f"(ipv4:10.0.1.*, ipv6:[::1], unix:...) or '*' ({exc})"
            ) from None
        for rdn in globs:
            for kind, value in rdn:
                if kind.upper() in self._attributes:
                    raise IdentityPatternError(f"{text!r} names {kind.upper()} twice: no subject could match it")
                self._attributes[kind.upper()] = value

    def matches(self, identity: str) -> bool:
        if self._anything:
            return True
        if self._whole is not None:
            return self._whole.fullmatch(identity) is not None
        if identity.startswith(ADDRESS_KINDS + _SAN_PREFIXES):
            return False  # a subject pattern applies to subjects only
        attributes = _subject_attributes(identity)
        if attributes is None:
            return False
        for kind, value in self._attributes.items():
            values = attributes.get(kind, ())
            if len(values) != 1 or value.fullmatch(values[0]) is None:
                return False
        return True

    def __repr__(self) -> str:
        return f"IdentityPattern({self.text!r})"
