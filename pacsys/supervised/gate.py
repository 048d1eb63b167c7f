"""The request gate: what a Read or a Set must pass before the backend is called.

A `GateRequest` goes in (the method, the client's address and identity, its metadata, its
DRFs or settings, whether it came over TLS); a `Decision` comes out: either a `Refusal`
(a gRPC status name, its details, and the label the metrics and the log use), or the
request admitted with its DRFs parsed (`pacsys.drf` results, in the order the backend is
called), the context the policies left, the slot each final DRF answers, and the audit
seq. The steps, in order (`docs/design.md`, "The request path"):

0. a body that could not be decoded; a draining server; one authorization header
1. Set only: the bearer token (constant-time; not over plaintext unless allowed)
2. the count of DRFs or settings, each DRF's length, its parse, the shortest period;
   a Set's values
   (`door` ends here: an `Opened` request names the settings whose current values the
   chain needs, which the caller reads through the backend and hands to `decide`)
3. the policy chain (a denial is audited here)
4. the client's limits (`_peers.Peers`): calls in flight, streams, readings per second
5. the audit line of the admitted request (a Set's must be recorded: else refused; a Read's
   may be summarised when its client is over its audit budget, `_audit_limits`)

`admit` does it all in one step, with no current values. After a Set's write, `written`
tells the chain what the backend accepted (`Policy.on_written`).

Every refusal is counted, logged at a bounded rate per client and kind, and audited as a
bounded excerpt. The gate knows nothing of gRPC: the servicer adapts a call to it, aborts
with the refusal's status, or calls the backend and then `release`s the admission.
"""

from __future__ import annotations

import collections
import dataclasses
import hmac
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pacsys.backends import summarize_drfs
from pacsys.drf import DRF, DRFError, parse_cached
from pacsys.replies import value_from_proto
from pacsys.settings import Settings
from pacsys.supervised._audit import AuditLog, AuditUnavailable
from pacsys.supervised._peers import PeerLimit, Peers, peer_host
from pacsys.supervised._policies import CurrentValue, Policy, PolicyDecision, RequestContext, evaluate_policies
from pacsys.supervised._refusal_log import RefusalLog, excerpt, excerpt_list

__all__ = [
    "EVENT_RATE_HZ",
    "Decision",
    "Gate",
    "GateRequest",
    "Opened",
    "Refusal",
    "ServicerLimits",
    "ServicerStats",
]

logger = logging.getLogger("pacsys.supervised")

# Readings per second counted for a stream's DRF that has no period (a clock or state event,
# or the device default): 15 Hz is ACNET's fastest regular clock event.
EVENT_RATE_HZ = 15.0

DRAINING_DETAILS = "server is shutting down"
TIMED_RPCS = ("Read", "Set")  # the latency histogram's; a refused Health/Watch is only counted
UNAUDITED_DETAILS = "the audit log cannot record writes: writes are refused until it can"


_DEFAULTS = Settings()  # the one owner of every default


@dataclass
class ServicerLimits:
    """Limits on what one request and one client may ask; each is counted when it bites.

    The defaults are the settings' of the same names (`pacsys.settings.Settings`); `from_settings`
    takes a service's. `stream_buffer` None keeps the size the backend made a stream's buffer
    with (a worker pool's own `stream_buffer` setting).
    """

    max_drfs_per_request: int = _DEFAULTS.max_drfs_per_request
    max_settings_per_request: int = _DEFAULTS.max_settings_per_request
    max_drf_length: int = _DEFAULTS.max_drf_length
    max_streams: int = _DEFAULTS.max_streams
    max_streams_per_peer: int = _DEFAULTS.max_streams_per_peer
    max_health_watches: int = _DEFAULTS.max_health_watches
    max_health_watches_per_peer: int = _DEFAULTS.max_health_watches_per_peer
    max_calls_per_peer: int = _DEFAULTS.max_calls_per_peer
    max_rate_hz: float = _DEFAULTS.max_rate_hz
    max_stream_rate: float = _DEFAULTS.max_stream_rate
    max_peer_rate: float = _DEFAULTS.max_peer_rate
    stream_buffer: int | None = None
    max_queued_bytes_per_peer: int = _DEFAULTS.max_queued_bytes_per_peer
    max_queued_bytes: int = _DEFAULTS.max_queued_bytes
    stalled_stream_seconds: float = _DEFAULTS.stalled_stream_seconds
    refusal_log_interval: float = _DEFAULTS.refusal_log_interval

    @classmethod
    def from_settings(cls, settings: Settings) -> ServicerLimits:
        """The limits of a service run with `settings`."""
        names = [f.name for f in dataclasses.fields(cls) if f.name != "stream_buffer"]
        return cls(
            **{name: getattr(settings, name) for name in names},
            # With workers the pool makes each stream's buffer this size: it alone owns the setting.
            stream_buffer=settings.stream_buffer if settings.workers == 0 else None,
        )

    def __post_init__(self) -> None:
        for name in ("max_rate_hz", "max_stream_rate", "max_peer_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")


@dataclass
class ServicerStats:
    """Counters the metrics and status views read."""

    requests: collections.Counter = field(default_factory=collections.Counter)  # (rpc, decision)
    denials_by_policy: collections.Counter = field(default_factory=collections.Counter)
    limits_hit: collections.Counter = field(default_factory=collections.Counter)
    readings_delivered: int = 0
    readings_dropped: int = 0  # of streams that have ended; live streams count in `dropped_now`
    refusals_not_logged: int = 0  # refusal log lines left out by the rate limit
    writes_refused_unaudited: int = 0  # Sets refused because the audit log could not record them
    # called with (rpc, seconds) per Read and Set when metrics are on
    latency_observer: Callable[[str, float], None] | None = None


@dataclass(slots=True)
class GateRequest:
    """One call as the gate sees it (built once per call: a plain slotted class, which costs a
    third of a frozen dataclass to make; nothing changes it after).

    Attributes:
        rpc: ``"Read"`` or ``"Set"``.
        peer: The client's address as gRPC reports it (``ipv4:10.0.0.5:51234``).
        identity: Its certificate's subject under mutual TLS, else its address without the port.
        metadata: The call's invocation metadata as (key, value) pairs; binary values are ignored.
        drfs: A Read's DRFs, or each setting's device for a Set.
        values: A Set's values as sent (DAQ ``Value`` messages), one per setting.
        tls: Whether the call came over TLS (a bearer token may be refused over plaintext).
        raw: The decoded request message, for the policies and the audit's capture.
        malformed: Why the body could not be decoded (refused INVALID_ARGUMENT), else None.
        started: `time.perf_counter()` when the call arrived, for the logged latency.
    """

    rpc: str
    peer: str
    identity: str
    metadata: Sequence[tuple[str, str | bytes]] = ()
    drfs: Sequence[str] = ()
    values: Sequence[Any] = ()
    tls: bool = False
    raw: object = None
    malformed: str | None = None
    started: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class Refusal:
    """A request refused: the gRPC status name, its details, and the decision label."""

    code: str  # a grpc.StatusCode name: "INVALID_ARGUMENT", "UNAUTHENTICATED", ...
    details: str
    decision: str = "invalid"  # invalid, limit, unauthenticated, denied, draining, error, audit_unavailable


class _Refused(Exception):
    def __init__(self, code: str, details: str, decision: str = "invalid"):
        super().__init__(details)
        self.refusal = Refusal(code, details, decision)


@dataclass(frozen=True)
class Opened:
    """A request the door let in (steps 0-2), for `Gate.decide`.

    `ctx` is its context before the policies, `policies` the chain it is decided by (the one
    in force when it arrived), `wanted` the settings (``Z:ACLTST.SETTING``) whose current
    values that chain needs (`Policy.needs_current`): the caller reads them first.
    """

    request: GateRequest
    ctx: RequestContext
    metadata: dict[str, str]
    policies: list[Policy]
    wanted: list[str]


@dataclass
class Decision:
    """What the gate decided. Refused: `refusal` says why, and nothing else is set.

    Admitted: `final` is the context after the policies (the DRFs and values to call the
    backend with), `parsed` their parse results in the same order, `original[i]` the request
    slot that final DRF `i` answers, `seq` the audit seq (0 without an audit log), `policies`
    the chain that decided it. The client's call or stream slot is held until `Gate.release`.
    """

    request: GateRequest
    refusal: Refusal | None = None
    ctx: RequestContext | None = None
    final: RequestContext | None = None
    parsed: list[DRF] = field(default_factory=list)
    original: list[int] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    seq: int = 0
    oneshot: bool = True
    rate: float = 0.0  # readings per second a stream asked for
    policies: list[Policy] = field(default_factory=list)

    @property
    def allowed(self) -> bool:
        return self.refusal is None


class Gate:
    """Validation, limits, the bearer token, the policy chain and the audit line of each request."""

    def __init__(
        self,
        policies: list[Policy] | None = None,
        token: str | None = None,
        audit_log: AuditLog | None = None,
        limits: ServicerLimits | None = None,
        log_requests: bool = False,
        *,
        allow_unaudited_writes: bool = False,
        token_over_plaintext: bool = True,
        stats: ServicerStats | None = None,
    ):
        self.policies: list[Policy] = list(policies or [])
        self.token = token
        self.audit = audit_log
        self.limits = limits or ServicerLimits()
        self.log_requests = log_requests
        self.allow_unaudited_writes = allow_unaudited_writes
        self.token_over_plaintext = token_over_plaintext
        self.stats = stats if stats is not None else ServicerStats()
        self.peers = Peers(
            max_streams=self.limits.max_streams,
            max_streams_per_peer=self.limits.max_streams_per_peer,
            max_calls_per_peer=self.limits.max_calls_per_peer,
            max_peer_rate=self.limits.max_peer_rate,
        )
        self._refusal_log = RefusalLog(self.limits.refusal_log_interval)
        self._min_period_us = 1e6 / self.limits.max_rate_hz
        self.draining = False

    # -- the decision ------------------------------------------------------------------

    def admit(self, request: GateRequest, current: Mapping[str, CurrentValue] | None = None) -> Decision:
        """Decide on `request` in one step: `door`, then `decide` with `current`."""
        opened = self.door(request)
        if isinstance(opened, Refusal):
            return Decision(request, opened)
        return self.decide(opened, current or {})

    def door(self, request: GateRequest) -> Opened | Refusal:
        """Steps 0-2: the request opened for the policy chain, or refused (counted, logged
        and audited already)."""
        try:
            return self._door(request)
        except _Refused as refused:
            self._refused(request, refused.refusal)
            return refused.refusal

    def decide(self, opened: Opened, current: Mapping[str, CurrentValue]) -> Decision:
        """Steps 3-5 for a request the door opened, given the current values it wanted.
        A refusal is already counted, logged and audited; an admitted request holds its
        client's call or stream slot until `release`."""
        request = opened.request
        try:
            decision = self._decide(opened, current)
        except _Refused as refused:
            self._refused(request, refused.refusal)
            return Decision(request, refused.refusal)
        try:
            self._audit_admitted(decision)
        except AuditUnavailable as exc:
            self.release(decision)
            self.stats.writes_refused_unaudited += 1
            self.log_outcome(
                request.rpc,
                request.peer,
                list(request.drfs),
                "audit_unavailable",
                request.started,
                reason=str(exc),
                who=request.identity,
            )
            return Decision(request, Refusal("UNAVAILABLE", UNAUDITED_DETAILS, "audit_unavailable"))
        except BaseException:
            self.release(decision)
            raise
        return decision

    def written(self, decision: Decision, outcomes: Sequence[bool | None]) -> None:
        """Tell the chain that decided a Set what the backend did with each setting
        (`Policy.on_written`; `outcomes` in the order of `decision.final.values`)."""
        final = decision.final
        assert final is not None
        for policy in decision.policies:
            try:
                policy.on_written(final, outcomes)
            except Exception:
                logger.exception("event=policy_on_written_failed policy=%s", policy.name)

    def release(self, decision: Decision) -> None:
        """Give back the client's call or stream slot that an admitted request held."""
        who = decision.request.identity
        if decision.oneshot:
            self.peers.end_call(who)
        else:
            self.peers.close_stream(who, decision.rate)

    def _door(self, request: GateRequest) -> Opened:
        if request.malformed is not None:
            raise _Refused("INVALID_ARGUMENT", request.malformed)
        if self.draining:
            raise _Refused("UNAVAILABLE", DRAINING_DETAILS, "draining")
        metadata = metadata_of(request.metadata)
        drfs = request.drfs if isinstance(request.drfs, list) else list(request.drfs)  # one list per call
        policies = self.policies  # a request uses the chain it arrived under
        if request.rpc == "Set":
            self._check_token(metadata, request.tls, self.token)
            self._check_count(len(drfs), self.limits.max_settings_per_request, "settings")
            first = self._parse_all(drfs, "setting")
            values: list[tuple[str, object]] = []
            for i, (device, value) in enumerate(zip(drfs, request.values, strict=True)):
                try:
                    values.append((device, value_from_proto(value)))
                except ValueError as exc:
                    raise _Refused("INVALID_ARGUMENT", f"setting {i} ({device!r}): {excerpt(str(exc))}") from None
            ctx = RequestContext(
                drfs=drfs,
                rpc_method="Set",
                peer=request.peer,
                metadata=metadata,
                values=values,
                raw_request=request.raw,
                identity=request.identity,
                parsed=dict(zip(drfs, first, strict=True)),
            )
            return Opened(request, ctx, metadata, policies, self._wanted(policies, ctx))
        self._check_count(len(drfs), self.limits.max_drfs_per_request, "drfs")
        first = self._parse_all(drfs)
        ctx = RequestContext(
            drfs=drfs,
            rpc_method="Read",
            peer=request.peer,
            metadata=metadata,
            values=[],
            raw_request=request.raw,
            allowed=frozenset(range(len(drfs))),
            identity=request.identity,
            parsed=dict(zip(drfs, first, strict=True)),
        )
        return Opened(request, ctx, metadata, policies, [])

    def _wanted(self, policies: list[Policy], ctx: RequestContext) -> list[str]:
        """The settings whose current values `policies` need to judge `ctx`, each once."""
        wanted: dict[str, None] = {}
        for policy in policies:
            try:
                wanted.update(dict.fromkeys(policy.needs_current(ctx)))
            except Exception as exc:
                logger.exception("event=policy_failed rpc=%s peer=%s", ctx.rpc_method, ctx.peer)
                raise _Refused("INTERNAL", f"Policy error: {excerpt(str(exc))}", "error") from None
        return list(wanted)

    def _decide(self, opened: Opened, current: Mapping[str, CurrentValue]) -> Decision:
        request, metadata, policies = opened.request, opened.metadata, opened.policies
        ctx = dataclasses.replace(opened.ctx, current=current) if current else opened.ctx
        final, original = self._run_chain(policies, ctx)
        if request.rpc == "Set":
            parsed = self._parse_all(final.drfs, "setting after policies", ctx.parsed)
            self._peer_limit(self.peers.begin_call, request.identity)
            return Decision(request, None, ctx, final, parsed, original, metadata, policies=policies)
        parsed = self._parse_all(final.drfs, "DRF after policies", ctx.parsed)
        oneshot = all(p.is_oneshot for p in parsed)
        rate = 0.0
        if oneshot:
            self._peer_limit(self.peers.begin_call, request.identity)
        else:
            rate = self._stream_rate(parsed)
            self._peer_limit(self.peers.open_stream, request.identity, rate)
        return Decision(
            request, None, ctx, final, parsed, original, metadata, oneshot=oneshot, rate=rate, policies=policies
        )

    def _audit_admitted(self, decision: Decision) -> None:
        ctx, final = decision.ctx, decision.final
        assert ctx is not None and final is not None
        if self.audit is None:
            return
        # A write that the audit log cannot record is not made (unless allowed).
        must_record = ctx.rpc_method == "Set" and not self.allow_unaudited_writes
        policy = PolicyDecision(True, ctx=final if final.drfs != ctx.drfs else None)
        decision.seq = self.audit.log_request(ctx, policy, must_record=must_record)

    # -- the token ---------------------------------------------------------------------

    def token_refusal(
        self, metadata: Sequence[tuple[str, str | bytes]], tls: bool, token: str | None
    ) -> Refusal | None:
        """The refusal of a call not carrying `token` as Set requires it (None: it does)."""
        try:
            self._check_token(metadata_of(metadata), tls, token)
        except _Refused as refused:
            return refused.refusal
        return None

    def _check_token(self, metadata: dict[str, str], tls: bool, token: str | None) -> None:
        """Refuse unless `metadata` carries `Bearer <token>` (None: no token needed), over TLS
        unless a token may cross plaintext."""
        if token is None:
            return
        if not self.token_over_plaintext and not tls:
            # Checked before the token itself, so that plaintext tells nothing about a guess.
            raise _Refused(
                "UNAUTHENTICATED",
                "a bearer token is refused over plaintext: connect with TLS (a token sent in clear should be rotated)",
                "unauthenticated",
            )
        presented = metadata.get("authorization")
        if presented is None:
            raise _Refused("UNAUTHENTICATED", "missing or invalid bearer token", "unauthenticated")
        scheme, _, credential = presented.partition(" ")
        if scheme.lower() != "bearer":  # the scheme is case-insensitive (RFC 9110, section 11.1)
            raise _Refused(
                "UNAUTHENTICATED",
                "the authorization header is not a bearer token: send 'Bearer <token>'",
                "unauthenticated",
            )
        if not hmac.compare_digest(credential.encode(), token.encode()):
            raise _Refused("UNAUTHENTICATED", "missing or invalid bearer token", "unauthenticated")

    # -- validation and limits ---------------------------------------------------------

    def _check_count(self, n: int, limit: int, what: str) -> None:
        if n == 0:
            raise _Refused("INVALID_ARGUMENT", f"empty request: no {what}")
        if n > limit:
            self.stats.limits_hit[f"max_{what}_per_request"] += 1
            raise _Refused("RESOURCE_EXHAUSTED", f"too many {what}: {n} (the limit is {limit})", "limit")

    def _parse_all(self, drfs: list[str], what: str = "DRF", checked: Mapping[str, DRF] | None = None) -> list[DRF]:
        """Each DRF parsed and checked (length, period); those in `checked` (the request's own,
        which the policies left as they were) are not looked up again."""
        parsed = []
        longest = self.limits.max_drf_length
        for i, text in enumerate(drfs):
            known = checked.get(text) if checked is not None else None
            if known is not None:
                parsed.append(known)
                continue
            if len(text) > longest:
                self.stats.limits_hit["max_drf_length"] += 1
                raise _Refused(
                    "INVALID_ARGUMENT",
                    f"{what} {i} is {len(text)} characters long (the limit is {longest}): {excerpt(text, 40)}",
                    "limit",
                )
            try:
                drf = parse_cached(text)
            except DRFError as exc:
                raise _Refused("INVALID_ARGUMENT", f"{what} {i}: {excerpt(str(exc))}") from None
            event = drf.event
            if event is not None and event.kind in ("P", "Q"):
                period = event.period if event.period is not None else 1_000_000
                if period < self._min_period_us:
                    self.stats.limits_hit["max_rate_hz"] += 1
                    raise _Refused(
                        "INVALID_ARGUMENT",
                        f"{what} {i} ({text}): a period of {period} µs is shorter than the shortest allowed, "
                        f"{self._min_period_us:.0f} µs ({self.limits.max_rate_hz:g} Hz)",
                        "limit",
                    )
            parsed.append(drf)
        return parsed

    def _stream_rate(self, parsed: list[DRF]) -> float:
        """Readings per second a stream asks for; refused when more than one stream may."""
        rate = 0.0
        for drf in parsed:
            event = drf.event
            if event is None or not event.is_oneshot:
                if event is not None and event.kind in ("P", "Q"):
                    rate += 1e6 / (event.period if event.period is not None else 1_000_000)
                else:
                    rate += EVENT_RATE_HZ
        if rate > self.limits.max_stream_rate:
            self.stats.limits_hit["max_stream_rate"] += 1
            raise _Refused(
                "RESOURCE_EXHAUSTED",
                f"this stream would ask for {rate:.0f} readings/s (the limit is {self.limits.max_stream_rate:g} "
                "per stream): ask for fewer DRFs or longer periods",
                "limit",
            )
        return rate

    def _peer_limit(self, take: Callable[..., None], *args: Any) -> None:
        try:
            take(*args)
        except PeerLimit as exc:
            self.stats.limits_hit[exc.limit] += 1
            raise _Refused("RESOURCE_EXHAUSTED", str(exc), "limit") from None

    # -- policies ----------------------------------------------------------------------

    def _run_chain(self, policies: list[Policy], ctx: RequestContext) -> tuple[RequestContext, list[int]]:
        """Run the policy chain; return the final context and, per final slot, its original index."""
        try:
            decision: PolicyDecision = evaluate_policies(policies, ctx)
        except Exception as exc:
            logger.exception("event=policy_failed rpc=%s peer=%s", ctx.rpc_method, ctx.peer)
            raise _Refused("INTERNAL", f"Policy error: {excerpt(str(exc))}", "error") from None
        if not decision.allowed:
            if self.audit is not None:
                # A denied Set is recorded in full when it passed the token; with no token to pass,
                # anyone can send one, and it counts against its client's audit budget.
                self.audit.log_request(ctx, decision, summarisable=ctx.rpc_method != "Set" or self.token is None)
            self.stats.denials_by_policy[decision.policy or "policy"] += 1
            raise _Refused("PERMISSION_DENIED", decision.reason or "denied by policy", "denied")
        final = decision.ctx or ctx
        return final, original_indices(ctx.drfs, final.drfs)

    # -- the log and the audit of refusals ---------------------------------------------

    def refuse(self, request: GateRequest, refusal: Refusal) -> None:
        """Count, log and audit a refusal decided outside the gate (a Health/Watch over its caps)."""
        self._refused(request, refusal)

    def _refused(self, request: GateRequest, refusal: Refusal) -> None:
        """Log (at a bounded rate) and audit a request refused before it reached the backend."""
        rpc, peer, who, drfs = request.rpc, request.peer, request.identity, list(request.drfs)
        self.log_outcome(rpc, peer, drfs, refusal.decision, request.started, reason=refusal.details, who=who)
        if self.audit is not None and refusal.decision != "denied":  # policy denials are audited already
            # Not captured whole (no raw_request): only requests that passed the door are.
            ctx = RequestContext(
                drfs=excerpt_list(drfs),
                rpc_method=rpc,
                peer=peer,
                metadata={},
                values=[],
                raw_request=None,
                identity=who,
            )
            self.audit.log_request(ctx, PolicyDecision(False, f"{refusal.code}: {refusal.details}"), refusal=True)

    def log_outcome(
        self,
        rpc: str,
        peer: str,
        drfs: Sequence[str],
        decision: str,
        started: float,
        *,
        reason: str | None = None,
        who: str | None = None,
    ) -> None:
        """Count a request's outcome, observe its latency, and log it (a refusal at a bounded rate)."""
        self.stats.requests[(rpc, decision)] += 1
        elapsed = time.perf_counter() - started
        if self.stats.latency_observer is not None and rpc in TIMED_RPCS:
            self.stats.latency_observer(rpc, elapsed)
        refused = decision not in ("allow", "ok")
        level = logging.INFO if (self.log_requests or refused) else logging.DEBUG
        if not logger.isEnabledFor(level):
            return
        if not refused:
            logger.log(
                level,
                "event=request rpc=%s peer=%s devices=%s decision=%s ms=%.2f",
                rpc,
                peer,
                summarize_drfs(drfs),
                decision,
                elapsed * 1e3,
            )
            return
        # A client repeating a refused request gets one line per kind per interval.
        not_logged = self._refusal_log.admit((who or peer_host(peer), rpc, decision))
        if not_logged is None:
            self.stats.refusals_not_logged += 1
            return
        args: tuple[object, ...] = (
            rpc,
            peer,
            summarize_drfs(excerpt_list(drfs, 5)),
            decision,
            excerpt(reason or "", 300),
            elapsed * 1e3,
        )
        text = "event=request rpc=%s peer=%s devices=%s decision=%s reason=%s ms=%.2f"
        if not_logged:
            text, args = text + " not_logged=%d", (*args, not_logged)
        logger.log(level, text, *args)


def metadata_of(pairs: Sequence[tuple[str, str | bytes]]) -> dict[str, str]:
    """The text metadata of a call; a second `authorization` header is refused (which one counts?)."""
    result: dict[str, str] = {}
    for key, value in pairs:
        if key == "authorization" and key in result:
            raise _Refused("UNAUTHENTICATED", "more than one authorization header", "unauthenticated")
        if isinstance(value, str):
            result[key] = value
    return result


def original_indices(before: list[str], after: list[str]) -> list[int]:
    """For each DRF of the final list, the index of the request slot it answers.

    Policies may reorder or rewrite DRFs but not add or drop them. A DRF that still
    appears in the request is matched to its first unused slot; a rewritten one keeps
    its position.
    """
    if len(after) != len(before):
        raise _Refused(
            "INVALID_ARGUMENT",
            f"a policy changed the number of DRFs from {len(before)} to {len(after)}; policies may not add or drop DRFs",
        )
    if after == before:
        return list(range(len(before)))
    unused: dict[str, collections.deque[int]] = {}
    for i, drf in enumerate(before):
        unused.setdefault(drf, collections.deque()).append(i)
    taken: set[int] = set()
    result = []
    for pos, drf in enumerate(after):
        queue = unused.get(drf)
        if queue:
            index = queue.popleft()
        else:
            index = pos
        result.append(index)
        taken.add(index)
    if len(taken) != len(after):
        # A rewritten DRF's position collided with a moved one: keep positions.
        return list(range(len(before)))
    return result
