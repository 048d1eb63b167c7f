"""The DAQ servicer: validate, authenticate, apply policies, audit, call the backend.

It has one code path. The backend is always an AsyncBackend (a sync one arrives wrapped
by `pacsys.aio.as_async`; a worker pool is one too), so nothing here knows whether the
work runs in this process, in threads or in worker processes.

Replies are written as pre-serialized bytes (see `pacsys.replies`): the oneof part of a
reading is encoded once and shared by every slot and stream that receives it.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2
from pacsys.aio import AsyncBackend, AsyncSubscriptionHandle, caller_authorization
from pacsys.backends import summarize_drfs
from pacsys.drf import DRF, DRFError, parse_cached
from pacsys.errors import grpc_status_of
from pacsys.replies import ReplyBodies, reply_bytes, setting_reply, value_from_proto
from pacsys.status import DPM, DPM_WRITE_OUTCOME_UNKNOWN
from pacsys.supervised._audit import AuditLog, AuditUnavailable
from pacsys.supervised._peers import Bucket, PeerLimit, Peers, peer_host
from pacsys.supervised._policies import Policy, PolicyDecision, RequestContext, evaluate_policies
from pacsys.supervised._refusal_log import RefusalLog, excerpt, excerpt_list

logger = logging.getLogger("pacsys.supervised")

SERVICE_NAME = "services.daq.DAQ"


# Readings per second counted for a stream's DRF that has no period (a clock or state event,
# or the device default): 15 Hz is ACNET's fastest regular clock event.
EVENT_RATE_HZ = 15.0
# A stream hands the loop back after this many readings of one batch, so that one heavy
# stream's burst does not hold everyone else's replies (smaller batches wait between them).
YIELD_AFTER = 32


@dataclass
class ServicerLimits:
    """Limits on what one request and one client may ask; each is counted when it bites."""

    max_drfs_per_request: int = 1000
    max_settings_per_request: int = 100
    max_drf_length: int = 512  # characters of one DRF (or one setting's device)
    max_streams: int = 10_000  # open streams of every client, Health.Watch included
    max_streams_per_peer: int = 1000
    max_calls_per_peer: int = 100  # one-shot Reads and Sets in flight
    max_rate_hz: float = 1440.0  # fastest periodic rate a DRF may ask for
    max_stream_rate: float = 5000.0  # readings per second one stream may ask for and receive
    max_peer_rate: float = 10_000.0  # the same, for all streams of one client together
    # Readings queued per client stream before its oldest are dropped. None keeps the size the
    # backend made the stream's buffer with (a worker pool's own `stream_buffer` setting).
    stream_buffer: int | None = None
    refusal_log_interval: float = 10.0  # seconds between log lines for one client's refusals of one kind

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
    # called with (rpc, seconds) per request when metrics are on
    latency_observer: Callable[[str, float], None] | None = None


@dataclass
class OpenStream:
    """One client stream, as the status view shows it."""

    peer: str
    drfs: list[str]
    opened: float  # time.time()
    handle: AsyncSubscriptionHandle
    identity: str = ""

    def row(self, now: float) -> dict[str, object]:
        return {
            "peer": self.peer,
            "identity": self.identity,
            "drfs": summarize_drfs(self.drfs, limit=2),
            "age_s": round(now - self.opened, 1),
            "delivered": self.handle.delivered,
            "dropped": self.handle.dropped,
            "queued": len(self.handle),
        }


class _Abort(Exception):
    """A request refused at the door or by a policy: the gRPC code and its details."""

    def __init__(self, code: grpc.StatusCode, details: str, decision: str = "invalid"):
        super().__init__(details)
        self.code = code
        self.details = details
        self.decision = decision


class _Undecodable:
    """A request body that is not the message it should be (answered INVALID_ARGUMENT)."""

    __slots__ = ("error", "size")

    def __init__(self, size: int, error: str):
        self.size = size
        self.error = error


def _decoder(message_class: Any) -> Callable[[bytes], Any]:
    # gRPC answers a deserializer's exception with UNKNOWN and logs a traceback per call;
    # the servicer refuses the request itself instead, and logs and audits it like any other.
    def decode(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except Exception as exc:  # DecodeError, or whatever protobuf raises on garbage
            return _Undecodable(len(data), type(exc).__name__)

    return decode


def _error_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status for an exception raised by the backend (the table in pacsys.errors)."""
    code, details = grpc_status_of(exc)
    return grpc.StatusCode[code], details


def identity_of(context: grpc.aio.ServicerContext) -> str:
    """The client's identity: its certificate's subject under mutual TLS, else its host address."""
    auth = context.auth_context() or {}
    for key in ("x509_subject", "x509_common_name"):
        values = auth.get(key)
        if values:
            return values[0].decode("utf-8", "replace")
    return peer_host(context.peer())


class DAQServicer:
    def __init__(
        self,
        backend: AsyncBackend,
        policies: list[Policy] | None = None,
        token: str | None = None,
        audit_log: AuditLog | None = None,
        limits: ServicerLimits | None = None,
        log_requests: bool = False,
        *,
        allow_unaudited_writes: bool = False,
        token_over_plaintext: bool = True,
    ):
        self.backend = backend
        self.policies: list[Policy] = list(policies or [])
        self._token = token
        self.audit = audit_log
        self.limits = limits or ServicerLimits()
        self.log_requests = log_requests
        self.allow_unaudited_writes = allow_unaudited_writes
        self.token_over_plaintext = token_over_plaintext
        self.stats = ServicerStats()
        self.peers = Peers(
            max_streams=self.limits.max_streams,
            max_streams_per_peer=self.limits.max_streams_per_peer,
            max_calls_per_peer=self.limits.max_calls_per_peer,
            max_peer_rate=self.limits.max_peer_rate,
        )
        self._refusal_log = RefusalLog(self.limits.refusal_log_interval)
        self._min_period_us = 1e6 / self.limits.max_rate_hz
        self._streams: dict[AsyncSubscriptionHandle, OpenStream] = {}
        # A backend that receives readings already encoded shares its cache of their bodies.
        self._bodies = backend.reply_bodies if backend.reply_bodies is not None else ReplyBodies()
        self.draining = False

    # -- wiring ------------------------------------------------------------------------

    def rpc_handler(self) -> grpc.GenericRpcHandler:
        identity: Callable[[bytes], bytes] = lambda b: b  # noqa: E731 - replies are pre-serialized
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "Read": grpc.unary_stream_rpc_method_handler(
                    self.Read,
                    request_deserializer=_decoder(DAQ_pb2.ReadingList),
                    response_serializer=identity,
                ),
                "Set": grpc.unary_unary_rpc_method_handler(
                    self.Set,
                    request_deserializer=_decoder(DAQ_pb2.SettingList),
                    response_serializer=DAQ_pb2.SettingReply.SerializeToString,
                ),
            },
        )

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    def dropped_now(self) -> int:
        """Readings dropped so far for slow clients, ended and live streams together."""
        return self.stats.readings_dropped + sum(h.dropped for h in list(self._streams))

    def stream_rows(self, limit: int = 20) -> list[dict[str, object]]:
        """The `limit` open streams most behind: most readings dropped, then queued, then oldest."""
        now = time.time()
        streams = sorted(list(self._streams.values()), key=lambda s: (-s.handle.dropped, -len(s.handle), s.opened))
        return [s.row(now) for s in streams[:limit]]

    @property
    def token(self) -> str | None:
        """The bearer token that Set requires (None: none)."""
        return self._token

    def token_refusal(self, context: grpc.aio.ServicerContext, token: str | None) -> tuple[grpc.StatusCode, str] | None:
        """The code and details that refuse a call not carrying `token` as Set requires it, or None."""
        try:
            self.check_token(_metadata(context), context, token)
        except _Abort as abort:
            return abort.code, abort.details
        return None

    def set_token(self, token: str | None) -> None:
        """Replace the bearer token that Set requires (None: no token required)."""
        self._token = token

    def set_policies(self, policies: list[Policy]) -> None:
        """Swap the policy chain atomically (a request uses the list it started with)."""
        self.policies = list(policies)

    def end_streams(self) -> None:
        """Drain: every open stream ends (UNAVAILABLE, so clients reconnect elsewhere)."""
        self.draining = True
        for handle in list(self._streams):
            handle.signal_stop()

    def check_token(self, metadata: dict[str, str], context: grpc.aio.ServicerContext, token: str | None) -> None:
        """Refuse unless `metadata` carries `Bearer <token>` (None: no token needed), over TLS
        unless a token may cross plaintext."""
        if token is None:
            return
        if not self.token_over_plaintext and not _over_tls(context):
            # Checked before the token itself, so that plaintext tells nothing about a guess.
            raise _Abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "a bearer token is refused over plaintext: connect with TLS (a token sent in clear should be rotated)",
                "unauthenticated",
            )
        presented = metadata.get("authorization", "")
        expected = f"Bearer {token}"
        if not hmac.compare_digest(presented.encode(), expected.encode()):
            raise _Abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token", "unauthenticated")

    # -- shared request steps ----------------------------------------------------------

    def _check_count(self, n: int, limit: int, what: str) -> None:
        if n == 0:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"empty request: no {what}")
        if n > limit:
            self.stats.limits_hit[f"max_{what}_per_request"] += 1
            raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"too many {what}: {n} (the limit is {limit})", "limit")

    def _parse_all(self, drfs: list[str], what: str = "DRF") -> list[DRF]:
        parsed = []
        longest = self.limits.max_drf_length
        for i, text in enumerate(drfs):
            if len(text) > longest:
                self.stats.limits_hit["max_drf_length"] += 1
                raise _Abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{what} {i} is {len(text)} characters long (the limit is {longest}): {excerpt(text, 40)}",
                    "limit",
                )
            try:
                drf = parse_cached(text)
            except DRFError as exc:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"{what} {i}: {excerpt(str(exc))}") from None
            event = drf.event
            if event is not None and event.kind in ("P", "Q"):
                period = event.period if event.period is not None else 1_000_000
                if period < self._min_period_us:
                    self.stats.limits_hit["max_rate_hz"] += 1
                    raise _Abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"{what} {i} ({text}): a period of {period} µs is shorter than the shortest allowed, "
                        f"{self._min_period_us:.0f} µs ({self.limits.max_rate_hz:g} Hz)",
                        "limit",
                    )
            parsed.append(drf)
        return parsed

    def _stream_rate(self, parsed: list[DRF]) -> float:
        """Readings per second a stream asks for; _Abort when more than one stream may."""
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
            raise _Abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
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
            raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), "limit") from None

    def _decide(self, ctx: RequestContext) -> tuple[RequestContext, list[int]]:
        """Run the policy chain; return the final context and, per final slot, its original index."""
        try:
            decision: PolicyDecision = evaluate_policies(self.policies, ctx)
        except Exception as exc:
            logger.exception("policy raised on rpc=%s peer=%s", ctx.rpc_method, ctx.peer)
            raise _Abort(grpc.StatusCode.INTERNAL, f"Policy error: {excerpt(str(exc))}", "error") from None
        if not decision.allowed:
            self._audit_request(ctx, decision)
            self.stats.denials_by_policy[decision.policy or "policy"] += 1
            raise _Abort(grpc.StatusCode.PERMISSION_DENIED, decision.reason or "denied by policy", "denied")
        final = decision.ctx or ctx
        return final, _original_indices(ctx.drfs, final.drfs)

    def _audit_request(self, ctx: RequestContext, decision: PolicyDecision, *, must_record: bool = False) -> int:
        if self.audit is None:
            return 0
        return self.audit.log_request(ctx, decision, must_record=must_record)

    def _refused(
        self,
        rpc: str,
        peer: str,
        who: str,
        drfs: list[str],
        abort: _Abort,
        started: float,
    ) -> None:
        """Log (at a bounded rate) and audit a request refused before it reached the backend."""
        self._log(rpc, peer, drfs, abort.decision, started, reason=abort.details, who=who)
        if self.audit is not None and abort.decision != "denied":  # policy denials are audited already
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
            self.audit.log_request(ctx, PolicyDecision(False, f"{abort.code.name}: {abort.details}"))

    def _log(
        self,
        rpc: str,
        peer: str,
        drfs: list[str],
        decision: str,
        started: float,
        *,
        reason: str | None = None,
        who: str | None = None,
    ) -> None:
        self.stats.requests[(rpc, decision)] += 1
        elapsed = time.perf_counter() - started
        if self.stats.latency_observer is not None:
            self.stats.latency_observer(rpc, elapsed)
        refused = decision not in ("allow", "ok")
        level = logging.INFO if (self.log_requests or refused) else logging.DEBUG
        if not logger.isEnabledFor(level):
            return
        if not refused:
            logger.log(
                level,
                "rpc=%s peer=%s devices=%s decision=%s ms=%.2f",
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
        text = "rpc=%s peer=%s devices=%s decision=%s reason=%s ms=%.2f"
        if not_logged:
            text, args = text + " not_logged=%d", (*args, not_logged)
        logger.log(level, text, *args)

    # -- Read --------------------------------------------------------------------------

    async def Read(
        self, request: DAQ_pb2.ReadingList | _Undecodable, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        started = time.perf_counter()
        peer = context.peer()
        who = identity_of(context)
        drfs: list[str] = []
        rate = 0.0
        try:
            if isinstance(request, _Undecodable):
                raise _Abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"request is not a ReadingList ({request.size} bytes, {request.error})",
                )
            drfs = list(request.drf)
            if self.draining:
                raise _Abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down", "draining")
            metadata = _metadata(context)
            self._check_count(len(drfs), self.limits.max_drfs_per_request, "drfs")
            self._parse_all(drfs)
            ctx = RequestContext(
                drfs=drfs,
                rpc_method="Read",
                peer=peer,
                metadata=metadata,
                values=[],
                raw_request=request,
                allowed=frozenset(range(len(drfs))),
                identity=who,
            )
            final, original = self._decide(ctx)
            parsed = self._parse_all(final.drfs, "DRF after policies")
            oneshot = all(p.is_oneshot for p in parsed)
            if oneshot:
                self._peer_limit(self.peers.begin_call, who)
            else:
                rate = self._stream_rate(parsed)
                self._peer_limit(self.peers.open_stream, who, rate)
        except _Abort as abort:
            self._refused("Read", peer, who, drfs, abort, started)
            await context.abort(abort.code, abort.details)
            return
        try:
            seq = self._audit_request(ctx, PolicyDecision(True, ctx=final if final.drfs != drfs else None))
            caller_authorization.set(metadata.get("authorization"))
            if oneshot:
                timeout = context.time_remaining()
                readings = await self.backend.get_many(final.drfs, timeout=timeout)
                self._log("Read", peer, drfs, "allow", started)
                for pos, reading in enumerate(readings):
                    reply = reply_bytes(original[pos], self._bodies.body(reading))
                    if self.audit is not None and self.audit.log_responses:
                        self.audit.log_response(seq, peer, "Read", DAQ_pb2.ReadingReply.FromString(reply))
                    yield reply
                return
            self._log("Read", peer, drfs, "allow", started)
            async for reply in self._stream(final.drfs, original, seq, peer, who):
                yield reply
        except _Abort as abort:
            await context.abort(abort.code, abort.details)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            code, details = _error_status(exc)
            if code is grpc.StatusCode.INTERNAL:
                logger.exception("rpc=Read peer=%s failed", peer)
            self.stats.requests[("Read", "error")] += 1
            await context.abort(code, details)
        finally:
            if oneshot:
                self.peers.end_call(who)
            else:
                self.peers.close_stream(who, rate)

    async def _stream(
        self, drfs: list[str], original: list[int], seq: int, peer: str, who: str
    ) -> AsyncIterator[bytes]:
        # Readings come back under the DRF as requested or in its canonical spelling
        # (a shared subscription serves every spelling of one request).
        slots: dict[str, list[int]] = {}
        for pos, drf in enumerate(drfs):
            slots.setdefault(drf, []).append(original[pos])
            canonical = parse_cached(drf).canonical
            if canonical != drf:
                slots.setdefault(canonical, []).append(original[pos])
        handle = await self.backend.subscribe(drfs)
        if self.limits.stream_buffer is not None:
            handle.resize(self.limits.stream_buffer)
        self._streams[handle] = OpenStream(peer, drfs, time.time(), handle, who)
        bodies = self._bodies
        log_out = self.audit is not None and self.audit.log_responses
        # Budgets: this stream's, and its client's shared by all of its streams.
        own_budget = Bucket(self.limits.max_stream_rate)
        peer_budget = self.peers.bucket(who)
        try:
            while True:
                await handle.wait()
                batch = handle.drain()
                for n, reading in enumerate(batch, 1):
                    indices = slots.get(reading.drf)
                    if indices is None:
                        logger.warning("stream reading for an unrequested DRF %r dropped", reading.drf)
                        continue
                    body = bodies.body(reading)
                    for index in indices:
                        reply = reply_bytes(index, body)
                        if log_out:
                            self.audit.log_response(seq, peer, "Read", DAQ_pb2.ReadingReply.FromString(reply))  # type: ignore[union-attr]
                        yield reply
                    if n % YIELD_AFTER == 0:
                        await asyncio.sleep(0)  # a large batch lets the others' replies through
                self.stats.readings_delivered += len(batch)
                if handle.stopped and not len(handle):
                    if handle.exc is not None:
                        raise handle.exc
                    if self.draining:
                        raise _Abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down", "draining")
                    return
                # Over budget, this stream waits: its own buffer fills and drops its own oldest.
                own_wait = own_budget.take(len(batch))
                peer_wait = peer_budget.take(len(batch))
                if own_wait or peer_wait:
                    self.stats.limits_hit["max_stream_rate" if own_wait >= peer_wait else "max_peer_rate"] += 1
                    await _pause(handle, max(own_wait, peer_wait))
        finally:
            self._streams.pop(handle, None)
            self.stats.readings_dropped += handle.dropped
            if handle.dropped:
                logger.warning(
                    "event=stream_ended_behind peer=%s drfs=%s delivered=%d dropped=%d",
                    peer,
                    summarize_drfs(drfs),
                    handle.delivered,
                    handle.dropped,
                )
            await handle.stop()

    # -- Set ---------------------------------------------------------------------------

    async def Set(
        self, request: DAQ_pb2.SettingList | _Undecodable, context: grpc.aio.ServicerContext
    ) -> DAQ_pb2.SettingReply:
        started = time.perf_counter()
        peer = context.peer()
        who = identity_of(context)
        drfs: list[str] = []
        try:
            if isinstance(request, _Undecodable):
                raise _Abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"request is not a SettingList ({request.size} bytes, {request.error})",
                )
            drfs = [s.device for s in request.setting]
            if self.draining:
                raise _Abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down", "draining")
            metadata = _metadata(context)
            self.check_token(metadata, context, self._token)
            self._check_count(len(drfs), self.limits.max_settings_per_request, "settings")
            self._parse_all(drfs, "setting")
            values = []
            for i, setting in enumerate(request.setting):
                try:
                    values.append((setting.device, value_from_proto(setting.value)))
                except ValueError as exc:
                    raise _Abort(
                        grpc.StatusCode.INVALID_ARGUMENT, f"setting {i} ({setting.device!r}): {excerpt(str(exc))}"
                    ) from None
            ctx = RequestContext(
                drfs=drfs,
                rpc_method="Set",
                peer=peer,
                metadata=metadata,
                values=values,
                raw_request=request,
                identity=who,
            )
            final, original = self._decide(ctx)
            self._parse_all(final.drfs, "setting after policies")
            self._peer_limit(self.peers.begin_call, who)
        except _Abort as abort:
            self._refused("Set", peer, who, drfs, abort, started)
            await context.abort(abort.code, abort.details)
            raise AssertionError("unreachable: abort raises")  # noqa: B904
        try:
            return await self._write(ctx, final, original, metadata, context, peer, who, started)
        finally:
            self.peers.end_call(who)

    async def _write(
        self,
        ctx: RequestContext,
        final: RequestContext,
        original: list[int],
        metadata: dict[str, str],
        context: grpc.aio.ServicerContext,
        peer: str,
        who: str,
        started: float,
    ) -> DAQ_pb2.SettingReply:
        drfs = ctx.drfs
        try:
            # A write that the audit log cannot record is not made (unless allowed).
            seq = self._audit_request(
                ctx,
                PolicyDecision(True, ctx=final if final.drfs != drfs else None),
                must_record=not self.allow_unaudited_writes,
            )
        except AuditUnavailable as exc:
            self.stats.writes_refused_unaudited += 1
            self._log("Set", peer, drfs, "audit_unavailable", started, reason=str(exc), who=who)
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "the audit log cannot record writes: writes are refused until it can"
            )
            raise AssertionError("unreachable: abort raises")  # noqa: B904
        settings = list(zip(final.drfs, (v for _, v in final.values), strict=True))
        caller_authorization.set(metadata.get("authorization"))
        try:
            results = await self.backend.write_many(settings, timeout=context.time_remaining())
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            code, details = _error_status(exc)
            if code is grpc.StatusCode.INTERNAL:
                logger.exception("rpc=Set peer=%s failed", peer)
            self._log("Set", peer, drfs, "error", started)
            await context.abort(code, details)
            raise AssertionError("unreachable: abort raises")  # noqa: B904
        ordered = [results[0]] * len(results)
        for pos, result in enumerate(results):
            ordered[original[pos]] = result
        unknown = [r.drf for r in ordered if (r.facility_code, r.error_code) == (DPM, DPM_WRITE_OUTCOME_UNKNOWN)]
        if unknown and self.audit is not None:
            self.audit.log_event(seq, "write_outcome_unknown", drfs=unknown)
        reply = setting_reply(ordered)
        if self.audit is not None and self.audit.log_responses:
            self.audit.log_response(seq, peer, "Set", reply)
        self._log("Set", peer, drfs, "allow", started)
        return reply


async def _pause(handle: AsyncSubscriptionHandle, seconds: float) -> None:
    """Sleep `seconds`, or less when the subscription stops (a drain must not wait for a paced stream)."""
    loop = asyncio.get_running_loop()
    until = loop.time() + seconds
    while not handle.stopped and (left := until - loop.time()) > 0:
        await asyncio.sleep(min(left, 0.1))


def _over_tls(context: grpc.aio.ServicerContext) -> bool:
    auth = context.auth_context() or {}
    return auth.get("transport_security_type") == [b"ssl"]


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    """The text metadata of a call; a second `authorization` header is refused (which one counts?)."""
    result: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and key in result:
            raise _Abort(grpc.StatusCode.UNAUTHENTICATED, "more than one authorization header", "unauthenticated")
        if isinstance(value, str):
            result[key] = value
    return result


def _original_indices(before: list[str], after: list[str]) -> list[int]:
    """For each DRF of the final list, the index of the request slot it answers.

    Policies may reorder or rewrite DRFs but not add or drop them. A DRF that still
    appears in the request is matched to its first unused slot; a rewritten one keeps
    its position.
    """
    if len(after) != len(before):
        raise _Abort(
            grpc.StatusCode.INVALID_ARGUMENT,
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
