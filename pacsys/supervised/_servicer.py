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

import grpc

from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2
from pacsys.aio import AsyncBackend, AsyncSubscriptionHandle, caller_authorization
from pacsys.backends import summarize_drfs
from pacsys.drf import DRFError, parse_cached
from pacsys.errors import AuthenticationError, BackendUnavailable, LimitExceeded, PolicyDenied
from pacsys.replies import ReplyBodies, reply_bytes, setting_reply, value_from_proto
from pacsys.status import DPM, DPM_WRITE_OUTCOME_UNKNOWN
from pacsys.supervised._audit import AuditLog
from pacsys.supervised._policies import Policy, PolicyDecision, RequestContext, evaluate_policies

logger = logging.getLogger("pacsys.supervised")

SERVICE_NAME = "services.daq.DAQ"


@dataclass
class ServicerLimits:
    """Per-request limits; each one, when it bites, answers RESOURCE_EXHAUSTED and is counted."""

    max_drfs_per_request: int = 1000
    max_settings_per_request: int = 100
    max_streams: int = 10_000
    stream_buffer: int = 1_000  # readings queued per client stream before its oldest are dropped


@dataclass
class ServicerStats:
    """Counters the metrics and status views read."""

    requests: collections.Counter = field(default_factory=collections.Counter)  # (rpc, decision)
    denials_by_policy: collections.Counter = field(default_factory=collections.Counter)
    limits_hit: collections.Counter = field(default_factory=collections.Counter)
    readings_delivered: int = 0
    readings_dropped: int = 0  # of streams that have ended; live streams count in `dropped_now`
    # called with (rpc, seconds) per request when metrics are on
    latency_observer: Callable[[str, float], None] | None = None


@dataclass
class OpenStream:
    """One client stream, as the status view shows it."""

    peer: str
    drfs: list[str]
    opened: float  # time.time()
    handle: AsyncSubscriptionHandle

    def row(self, now: float) -> dict[str, object]:
        return {
            "peer": self.peer,
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


def _error_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status for an exception raised by the backend (spec: whole-call failures)."""
    if isinstance(exc, NotImplementedError):
        return grpc.StatusCode.UNIMPLEMENTED, str(exc) or "not implemented by the backend"
    if isinstance(exc, AuthenticationError):
        return grpc.StatusCode.UNAUTHENTICATED, str(exc)
    if isinstance(exc, PolicyDenied):
        return grpc.StatusCode.PERMISSION_DENIED, str(exc)
    if isinstance(exc, BackendUnavailable):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, LimitExceeded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc) or "backend timed out"
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


class DAQServicer:
    def __init__(
        self,
        backend: AsyncBackend,
        policies: list[Policy] | None = None,
        token: str | None = None,
        audit_log: AuditLog | None = None,
        limits: ServicerLimits | None = None,
        log_requests: bool = False,
    ):
        self.backend = backend
        self.policies: list[Policy] = list(policies or [])
        self._token = token
        self.audit = audit_log
        self.limits = limits or ServicerLimits()
        self.log_requests = log_requests
        self.stats = ServicerStats()
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
                    request_deserializer=DAQ_pb2.ReadingList.FromString,
                    response_serializer=identity,
                ),
                "Set": grpc.unary_unary_rpc_method_handler(
                    self.Set,
                    request_deserializer=DAQ_pb2.SettingList.FromString,
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
            handle._signal_stop()

    # -- shared request steps ----------------------------------------------------------

    def _check_token(self, metadata: dict[str, str]) -> None:
        if self._token is None:
            return
        presented = metadata.get("authorization", "")
        expected = f"Bearer {self._token}"
        if not hmac.compare_digest(presented.encode(), expected.encode()):
            raise _Abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token", "unauthenticated")

    def _check_count(self, n: int, limit: int, what: str) -> None:
        if n == 0:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"empty request: no {what}")
        if n > limit:
            self.stats.limits_hit[f"max_{what}_per_request"] += 1
            raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"too many {what}: {n} (the limit is {limit})", "limit")

    @staticmethod
    def _parse_all(drfs: list[str], what: str = "DRF"):
        parsed = []
        for i, text in enumerate(drfs):
            try:
                parsed.append(parse_cached(text))
            except DRFError as exc:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"{what} {i}: {exc}") from None
        return parsed

    def _decide(self, ctx: RequestContext) -> tuple[RequestContext, list[int]]:
        """Run the policy chain; return the final context and, per final slot, its original index."""
        try:
            decision: PolicyDecision = evaluate_policies(self.policies, ctx)
        except Exception as exc:
            logger.exception("policy raised on rpc=%s peer=%s", ctx.rpc_method, ctx.peer)
            raise _Abort(grpc.StatusCode.INTERNAL, f"Policy error: {exc}", "error") from None
        if not decision.allowed:
            self._audit_request(ctx, decision)
            self.stats.denials_by_policy[decision.policy or "policy"] += 1
            raise _Abort(grpc.StatusCode.PERMISSION_DENIED, decision.reason or "denied by policy", "denied")
        final = decision.ctx or ctx
        return final, _original_indices(ctx.drfs, final.drfs)

    def _audit_request(self, ctx: RequestContext, decision: PolicyDecision) -> int:
        if self.audit is None:
            return 0
        return self.audit.log_request(ctx, decision)

    def _refused(
        self,
        rpc: str,
        peer: str,
        drfs: list[str],
        request: object,
        context: grpc.aio.ServicerContext,
        abort: _Abort,
        started: float,
    ) -> None:
        """Log and audit a request refused before it reached the backend."""
        self._log(rpc, peer, drfs, abort.decision, started)
        if self.audit is not None and abort.decision != "denied":  # policy denials are audited already
            ctx = RequestContext(
                drfs=drfs, rpc_method=rpc, peer=peer, metadata=_metadata(context), values=[], raw_request=request
            )
            self.audit.log_request(ctx, PolicyDecision(False, f"{abort.code.name}: {abort.details}"))

    def _log(self, rpc: str, peer: str, drfs: list[str], decision: str, started: float) -> None:
        self.stats.requests[(rpc, decision)] += 1
        elapsed = time.perf_counter() - started
        if self.stats.latency_observer is not None:
            self.stats.latency_observer(rpc, elapsed)
        level = logging.INFO if (self.log_requests or decision not in ("allow", "ok")) else logging.DEBUG
        if logger.isEnabledFor(level):
            logger.log(
                level,
                "rpc=%s peer=%s devices=%s decision=%s ms=%.2f",
                rpc,
                peer,
                summarize_drfs(drfs),
                decision,
                elapsed * 1e3,
            )

    # -- Read --------------------------------------------------------------------------

    async def Read(self, request: DAQ_pb2.ReadingList, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        started = time.perf_counter()
        peer = context.peer()
        drfs = list(request.drf)
        try:
            if self.draining:
                raise _Abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down", "draining")
            self._check_count(len(drfs), self.limits.max_drfs_per_request, "drfs")
            self._parse_all(drfs)
            metadata = _metadata(context)
            ctx = RequestContext(
                drfs=drfs,
                rpc_method="Read",
                peer=peer,
                metadata=metadata,
                values=[],
                raw_request=request,
                allowed=frozenset(range(len(drfs))),
            )
            final, original = self._decide(ctx)
            parsed = self._parse_all(final.drfs, "DRF after policies")
        except _Abort as abort:
            self._refused("Read", peer, drfs, request, context, abort, started)
            await context.abort(abort.code, abort.details)
            return
        seq = self._audit_request(ctx, PolicyDecision(True, ctx=final if final.drfs != drfs else None))
        caller_authorization.set(metadata.get("authorization"))
        oneshot = all(p.is_oneshot for p in parsed)
        try:
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
            if len(self._streams) >= self.limits.max_streams:
                self.stats.limits_hit["max_streams"] += 1
                raise LimitExceeded(f"too many open streams (the limit is {self.limits.max_streams})")
            self._log("Read", peer, drfs, "allow", started)
            async for reply in self._stream(final.drfs, original, seq, peer):
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

    async def _stream(self, drfs: list[str], original: list[int], seq: int, peer: str) -> AsyncIterator[bytes]:
        # Readings come back under the DRF as requested or in its canonical spelling
        # (a shared subscription serves every spelling of one request).
        slots: dict[str, list[int]] = {}
        for pos, drf in enumerate(drfs):
            slots.setdefault(drf, []).append(original[pos])
            canonical = parse_cached(drf).canonical
            if canonical != drf:
                slots.setdefault(canonical, []).append(original[pos])
        handle = await self.backend.subscribe(drfs)
        handle.resize(self.limits.stream_buffer)
        self._streams[handle] = OpenStream(peer, drfs, time.time(), handle)
        bodies = self._bodies
        log_out = self.audit is not None and self.audit.log_responses
        try:
            while True:
                await handle.wait()
                batch = handle.drain()
                for reading in batch:
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
                self.stats.readings_delivered += len(batch)
                if handle.stopped and not len(handle):
                    if handle.exc is not None:
                        raise handle.exc
                    if self.draining:
                        raise _Abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down", "draining")
                    return
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

    async def Set(self, request: DAQ_pb2.SettingList, context: grpc.aio.ServicerContext) -> DAQ_pb2.SettingReply:
        started = time.perf_counter()
        peer = context.peer()
        drfs = [s.device for s in request.setting]
        try:
            if self.draining:
                raise _Abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down", "draining")
            metadata = _metadata(context)
            self._check_token(metadata)
            self._check_count(len(drfs), self.limits.max_settings_per_request, "settings")
            self._parse_all(drfs, "setting")
            values = []
            for i, setting in enumerate(request.setting):
                try:
                    values.append((setting.device, value_from_proto(setting.value)))
                except ValueError as exc:
                    raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"setting {i} ({setting.device!r}): {exc}") from None
            ctx = RequestContext(
                drfs=drfs, rpc_method="Set", peer=peer, metadata=metadata, values=values, raw_request=request
            )
            final, original = self._decide(ctx)
            self._parse_all(final.drfs, "setting after policies")
        except _Abort as abort:
            self._refused("Set", peer, drfs, request, context, abort, started)
            await context.abort(abort.code, abort.details)
            raise AssertionError("unreachable: abort raises")  # noqa: B904
        seq = self._audit_request(ctx, PolicyDecision(True, ctx=final if final.drfs != drfs else None))
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


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    return {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


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
