"""The policy interface: what a policy sees, what it answers, and how a chain of them runs.

A policy looks at a :class:`RequestContext` and returns a :class:`PolicyDecision`: deny (with a
reason), allow, or allow with a modified context that later policies and the backend call see.
:func:`evaluate_policies` runs a chain of them; the first denial wins. The policies themselves
are `_policies` (access, grants, rates) and `_machine_protection` (range and slew limits);
the rules of per-slot approval and of the two hooks are described in `_policies`.
"""

from __future__ import annotations

import fnmatch
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from pacsys.drf import DRF
from pacsys.drf_utils import guess_device_name

__all__ = ["CurrentValue", "Policy", "PolicyDecision", "RequestContext", "evaluate_policies"]


@dataclass(frozen=True)
class CurrentValue:
    """A setting's value as the backend read it just before the policy chain ran.

    Attributes:
        value: The value read (a float for a scalar setting); None when the read failed.
        error: Why it could not be read (the status or the exception), else None.
    """

    value: object = None
    error: str | None = None


@dataclass(frozen=True)
class RequestContext:
    """One RPC as the policies see it.

    Attributes:
        drfs: DRF strings of the request, one slot each, in request order.
        rpc_method: ``"Read"`` or ``"Set"``.
        peer: Client address as gRPC reports it (``ipv4:10.0.0.5:51234``).
        metadata: gRPC invocation metadata.
        values: ``[(drf, value), ...]`` for a Set; empty for a Read.
        raw_request: The protobuf request message.
        allowed: Indices of approved slots: all of them for a Read, none for a Set when built.
        identity: Who the client is: the subject of its TLS client certificate
            (``CN=ops1,O=Fermilab``) when it presented one, else its address without the port
            (``ipv4:10.0.0.5``).
        parsed: The parse results of the request's DRFs by their text, when the caller parsed
            them (the gateway's request gate does); `device_name` uses them. A DRF a policy
            rewrote is not in it and its name is found from its text.
        current: The current values of the settings the chain's policies asked for
            (`Policy.needs_current`), read through the backend just before the chain ran, by
            setting (``Z:ACLTST.SETTING``). Empty for a Read, and when nothing was read.
    """

    drfs: list[str]
    rpc_method: str
    peer: str
    metadata: dict[str, str]
    values: list[tuple[str, object]]
    raw_request: object
    allowed: frozenset[int] = frozenset()
    identity: str = ""
    parsed: Mapping[str, DRF] = field(default_factory=dict, compare=False, repr=False)
    current: Mapping[str, CurrentValue] = field(default_factory=dict)

    def device_name(self, drf: object) -> str:
        """The canonical device name of one of this request's DRFs (see `guess_device_name`)."""
        known = self.parsed.get(drf) if isinstance(drf, str) else None
        return known.device if known is not None else guess_device_name(drf)


@dataclass(frozen=True)
class PolicyDecision:
    """Outcome of a policy check.

    A denial must carry a reason; its ``ctx`` is ignored. An allow carries ``ctx=None`` when the
    policy left the request alone, or the modified context. On a denial returned by
    :func:`evaluate_policies`, ``policy`` names the denying policy (``Policy.name``) for metrics;
    it takes no part in equality.
    """

    allowed: bool
    reason: str | None = None
    ctx: RequestContext | None = None
    policy: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.allowed and not self.reason:
            raise ValueError("a denied PolicyDecision needs a reason")


_ALLOW = PolicyDecision(allowed=True)


class Policy(ABC):
    """Base class for policies: implement :meth:`check`."""

    _name: str | None = None

    @property
    def name(self) -> str:
        """Label for metrics and logs: the class name unless set."""
        return self._name or type(self).__name__

    @name.setter
    def name(self, value: str) -> None:
        self._name = value

    @property
    def allows_writes(self) -> bool:
        """True for a policy that grants writes by approving slots (see the module docstring)."""
        return False

    @abstractmethod
    def check(self, ctx: RequestContext) -> PolicyDecision: ...

    def on_allowed(self, ctx: RequestContext) -> None:  # noqa: B027 - optional hook, empty by default
        """Called with the final context once the whole chain has allowed the request.

        A policy that keeps history of what was allowed records here, so that a request that
        a later policy denies leaves no trace. History of what reached a device belongs in
        `on_written`: an allowed setting may still be refused by the backend.
        """

    def needs_current(self, ctx: RequestContext) -> Sequence[str]:
        """The settings (``Z:ACLTST.SETTING``) whose current values `check` needs for `ctx`.

        The gateway reads them through the backend before the chain runs, holds them for the
        request (writes to one of them wait for each other), and passes them in `ctx.current`.
        """
        return ()

    def on_written(self, ctx: RequestContext, outcomes: Sequence[bool | None]) -> None:  # noqa: B027 - optional hook, empty by default
        """Called once the backend has answered a Set the chain allowed, with `ctx` as allowed.

        `outcomes[i]` is for the setting ``ctx.values[i]``: True accepted, False refused by the
        backend or not sent, None unknown (the backend failed, or its worker died, while it
        was being written: it may have reached the device).
        """


def evaluate_policies(policies: Sequence[Policy], ctx: RequestContext) -> PolicyDecision:
    """Run ``policies`` in order and return the final decision.

    The first denial is returned, tagged with the policy's name, and the remaining policies do
    not run. Each policy sees the context as modified by the ones before it. An allow carries
    ``ctx`` set to the final context. After the chain, unapproved slots deny the request when a
    policy gates writes (see the module docstring). Exceptions raised by a policy propagate.
    """
    current = ctx
    for policy in policies:
        decision = policy.check(current)
        if not decision.allowed:
            return replace(decision, policy=policy.name)
        if decision.ctx is not None:
            current = decision.ctx
    if any(p.allows_writes for p in policies):
        for i, drf in enumerate(current.drfs):
            if i not in current.allowed:
                reason = f"Device {current.device_name(drf)} not approved for {current.rpc_method}"
                return PolicyDecision(allowed=False, reason=reason, policy="approval")
    for policy in policies:
        policy.on_allowed(current)
    return PolicyDecision(allowed=True, ctx=current)


_CACHE_SIZE = 4096


class _Patterns:
    """Compiled device-name patterns with a cache of which ones match a name."""

    def __init__(self, patterns: Sequence[str], syntax: str = "glob"):
        if syntax not in ("glob", "regex"):
            raise ValueError(f"syntax must be 'glob' or 'regex', got {syntax!r}")
        sources = [fnmatch.translate(p) for p in patterns] if syntax == "glob" else list(patterns)
        try:
            self._regexes = [re.compile(s, re.IGNORECASE) for s in sources]
        except re.error as e:
            raise ValueError(f"bad pattern: {e}") from None
        self._cache: dict[str, tuple[int, ...]] = {}

    def matching(self, name: str) -> tuple[int, ...]:
        """Indices of the patterns that match the whole of ``name``."""
        hit = self._cache.get(name)
        if hit is None:
            hit = tuple(i for i, rx in enumerate(self._regexes) if rx.fullmatch(name))
            # Clearing when full keeps memory bounded for clients that name many devices.
            # No lock needed: single dict operations are atomic, a lost race only recomputes.
            if len(self._cache) >= _CACHE_SIZE:
                self._cache.clear()
            self._cache[name] = hit
        return hit


def _approve_matching(ctx: RequestContext, patterns: _Patterns) -> PolicyDecision:
    """Approve the slots of `ctx` that name a device matching `patterns` (the one way a policy
    grants writes: DeviceAccessPolicy in allow mode, WriteGrantPolicy); the others are left as
    they were."""
    newly = {i for i, drf in enumerate(ctx.drfs) if i not in ctx.allowed and patterns.matching(ctx.device_name(drf))}
    if not newly:
        return _ALLOW
    return PolicyDecision(allowed=True, ctx=replace(ctx, allowed=ctx.allowed | newly))
