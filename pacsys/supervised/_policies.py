"""Policies: the checks the gateway runs on every Read and Set before it calls the backend.

A policy looks at a :class:`RequestContext` and returns a :class:`PolicyDecision`: deny (with a
reason), allow, or allow with a modified context that later policies and the backend call see.
:func:`evaluate_policies` runs a chain of them; the first denial wins.

Per-slot approval
-----------------
Every DRF in a request is a slot, and ``RequestContext.allowed`` holds the indices of approved
slots. The caller builds the context with all slots approved for a Read and none approved for a
Set. Approving policies (``DeviceAccessPolicy(mode="allow")`` covering Set, or any policy whose
``allows_writes`` is true) add indices as the chain runs.

The rule lives in :func:`evaluate_policies` (not in a separate step the server could forget):
after the whole chain has allowed the request, if at least one policy in the chain has
``allows_writes`` true, any slot still unapproved turns the result into a denial that names the
first such device ("Device M:OUTTMP not approved for Set"; its ``policy`` is ``"approval"``).

When no policy in the chain gates writes, and in particular for an empty chain, no slot rule
applies and nothing is denied for lack of approval: the library default of the first
in-process server (which had no slot approval at all) that ``SupervisedServer(backend)`` keeps. Later pacsys
releases deny every unapproved Set slot even with an empty chain and use ``allows_writes`` only
to word the denial. So the ``pacsys-supervisor`` command, which must deny writes nothing grants,
needs a write-gating policy in its chain: an allow-mode ``DeviceAccessPolicy`` for
``--allow-writes``, or ``ReadOnlyPolicy`` when nothing grants writes.

Matching and speed
------------------
Policies match canonical, upper-cased device names (``RequestContext.device_name``: from the
parse the gate made, else ``pacsys.drf_utils.guess_device_name``).
Globs are case-insensitive fnmatch patterns and regexes are full matches, also case-insensitive.
``check()`` runs on the gateway's hot path, so patterns are compiled once and the result for
each device name is cached in a small bounded dict. Stateful policies take a lock; a policy
object can be shared by all server threads.

Current values and write outcomes
---------------------------------
Two hooks let a policy judge a Set against the device rather than against the request alone
(the machine-protection policies, ``ValueRangePolicy`` and ``SlewRatePolicy``, live in
``_machine_protection``). ``needs_current(ctx)`` names the settings whose current values it
needs; the gateway reads them through the backend before the chain runs and hands them in as
``ctx.current`` (a setting it could not read is there with its error; one it did not read is
missing: judge that as unknown, and deny). ``on_written(ctx, outcomes)`` is called once the
backend has answered, with which settings it accepted, so that history moves only with what
reached the device.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol

from pacsys.supervised._identity import IdentityPattern
from pacsys.supervised._machine_protection import SlewLimit, SlewRatePolicy, ValueRangePolicy
from pacsys.supervised._policy_base import (
    _ALLOW,
    CurrentValue,
    Policy,
    PolicyDecision,
    RequestContext,
    _approve_matching,
    _Patterns,
    evaluate_policies,
)

# The interface and the machine-protection policies are re-exported: this module is where the
# pacsys release keeps every policy name, and its users import them from here.
__all__ = [
    "CurrentValue",
    "DeviceAccessPolicy",
    "Policy",
    "PolicyDecision",
    "RateLimitPolicy",
    "ReadOnlyPolicy",
    "RequestContext",
    "SlewLimit",
    "SlewRatePolicy",
    "ValueRangePolicy",
    "WriteGrantPolicy",
    "evaluate_policies",
    "write_gate",
]


class ReadOnlyPolicy(Policy):
    """Denies every Set."""

    def check(self, ctx: RequestContext) -> PolicyDecision:
        if ctx.rpc_method == "Set":
            return PolicyDecision(allowed=False, reason="Write operations disabled")
        return _ALLOW


class DeviceAccessPolicy(Policy):
    """Approve or deny devices by name pattern.

    Args:
        patterns: Device name patterns, e.g. ``["M:*", "G:AMANDA"]``.
        mode: ``"allow"`` approves the slots of matching devices and leaves the others alone;
            ``"deny"`` denies a request that names any matching device.
        action: The RPCs the policy applies to: ``"all"``, ``"read"`` or ``"set"``.
        syntax: ``"glob"`` (fnmatch) or ``"regex"`` (full match); both case-insensitive.

    ``mode="allow"`` with ``action="read"`` is rejected: Read slots start approved, so it could
    never change anything.
    """

    def __init__(self, patterns: Sequence[str], mode: str = "allow", action: str = "all", syntax: str = "glob"):
        if isinstance(patterns, str) or not patterns:
            raise ValueError("patterns must be a non-empty list of strings")
        if mode not in ("allow", "deny"):
            raise ValueError(f"mode must be 'allow' or 'deny', got {mode!r}")
        if action not in ("all", "read", "set"):
            raise ValueError(f"action must be 'all', 'read' or 'set', got {action!r}")
        if mode == "allow" and action == "read":
            raise ValueError("mode='allow' with action='read' has no effect: reads are approved by default")
        self._patterns = _Patterns(patterns, syntax)
        self._mode = mode
        self._methods = {"all": ("Read", "Set"), "read": ("Read",), "set": ("Set",)}[action]

    @property
    def allows_writes(self) -> bool:
        return self._mode == "allow" and "Set" in self._methods

    def check(self, ctx: RequestContext) -> PolicyDecision:
        if ctx.rpc_method not in self._methods:
            return _ALLOW
        if self._mode == "deny":
            for drf in ctx.drfs:
                name = ctx.device_name(drf)
                if self._patterns.matching(name):
                    return PolicyDecision(allowed=False, reason=f"Device {name} is denied")
            return _ALLOW
        return _approve_matching(ctx, self._patterns)


class WriteGrantPolicy(Policy):
    """Grant writes to some devices for some clients: the EPICS gateways' UAG/HAG rules, per identity.

    Args:
        identities: Patterns on the client's identity (``RequestContext.identity``): a subject
            pattern matched attribute by attribute against its TLS client certificate's
            subject (``"CN=ops-*"``), a certificate name (``"DNS:*.ops.example"``), an address
            without the port (``"ipv4:10.0.1.*"``, ``"ipv6:[::1]"``) or ``"*"``; the rule is
            `pacsys.supervised._identity.IdentityPattern`'s.
        patterns: Device name patterns (case-insensitive globs) those clients may write.

    A Set from a matching client has the slots of matching devices approved; anyone else's
    request is left alone (another policy may grant it, or the approval rule denies it).
    """

    def __init__(self, identities: Sequence[str], patterns: Sequence[str]):
        if isinstance(identities, str) or not identities or not all(isinstance(i, str) and i for i in identities):
            raise ValueError("identities must be a non-empty list of identity patterns")
        if isinstance(patterns, str) or not patterns:
            raise ValueError("patterns must be a non-empty list of strings")
        self._identities = [IdentityPattern(i) for i in identities]
        self._patterns = _Patterns(patterns)

    @property
    def allows_writes(self) -> bool:
        return True

    def matches(self, identity: str) -> bool:
        return any(pattern.matches(identity) for pattern in self._identities)

    def check(self, ctx: RequestContext) -> PolicyDecision:
        if ctx.rpc_method != "Set" or not self.matches(ctx.identity):
            return _ALLOW
        return _approve_matching(ctx, self._patterns)


def _client_key(peer: str) -> str:
    """The client's address without its port, so opening a new connection does not reset limits."""
    if peer.startswith(("ipv4:", "ipv6:")):
        return peer.rsplit(":", 1)[0]
    return peer


class RateLimitPolicy(Policy):
    """At most ``max_requests`` requests per client within any ``window_seconds``.

    Clients are told apart by address without the port. Denied requests do not count. Clients
    idle for a whole window are forgotten, so many short-lived clients cost no memory.

    Args:
        max_requests: Requests allowed per window.
        window_seconds: Length of the sliding window.
        clock: Monotonic time source in seconds (tests inject a fake one).
    """

    def __init__(self, max_requests: int, window_seconds: float = 60.0, *, clock: Callable[[], float] = time.monotonic):
        if max_requests <= 0:
            raise ValueError(f"max_requests must be positive, got {max_requests}")
        if window_seconds <= 0:
            raise ValueError(f"window_seconds must be positive, got {window_seconds}")
        self._max = max_requests
        self._window = window_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._hits: dict[str, deque[float]] = {}
        self._next_sweep = clock() + window_seconds

    def check(self, ctx: RequestContext) -> PolicyDecision:
        key = _client_key(ctx.peer)
        now = self._clock()
        cutoff = now - self._window
        with self._lock:
            if now >= self._next_sweep:
                # At most one O(clients) sweep per window: cheap, and bounds memory.
                self._hits = {k: q for k, q in self._hits.items() if q[-1] > cutoff}
                self._next_sweep = now + self._window
            hits = self._hits.setdefault(key, deque())
            while hits and hits[0] <= cutoff:
                hits.popleft()
            if len(hits) >= self._max:
                return PolicyDecision(
                    allowed=False,
                    reason=f"Rate limit exceeded for {key}: {self._max} requests per {self._window:g}s",
                )
            hits.append(now)
        return _ALLOW


class WriteSettings(Protocol):
    """What `write_gate` reads of the settings (`pacsys.settings.Settings` has it)."""

    @property
    def allow_writes(self) -> tuple[str, ...]: ...


def write_gate(settings: WriteSettings, policies: list[Policy]) -> list[Policy]:
    """The service's rule, deny writes unless granted, applied to a policy chain.

    `allow_writes` patterns append an approving DeviceAccessPolicy for Sets; when no policy of
    the chain then grants writes, a ReadOnlyPolicy goes first and every Set is denied.
    """
    chain = list(policies)
    if settings.allow_writes:
        chain.append(DeviceAccessPolicy(list(settings.allow_writes), mode="allow", action="set"))
    if not any(p.allows_writes for p in chain):
        chain.insert(0, ReadOnlyPolicy())
    return chain
