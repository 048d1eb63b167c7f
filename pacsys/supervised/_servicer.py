"""The DAQ servicer: adapts gRPC calls to the request gate and the backend.

Each call is decoded, handed to the gate (`pacsys.supervised.gate`: validation, limits, the
token, the policies, the audit line), aborted with the gate's refusal, or passed on to the
backend with the DRFs the gate parsed; replies are written here.

A Set of settings that machine protection judges from the device's current value is held,
read, decided and written as `_protected_writes` describes.

It has one code path. The backend is always an AsyncBackend (a sync one arrives wrapped
by `pacsys.aio.as_async`; a worker pool is one too), so nothing here knows whether the
work runs in this process, in threads or in worker processes.

Replies are written as pre-serialized bytes (see `pacsys.replies`): the oneof part of a
reading is encoded once and shared by every slot and stream that receives it.

What each stream holds queued is counted in bytes (`_queue_budget`); `watch_queues`, run by
the server, ends the streams that stall their clients over the budget.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc

from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2
from pacsys.aio import AsyncBackend, AsyncSubscriptionHandle, caller_authorization
from pacsys.backends import summarize_drfs
from pacsys.errors import grpc_status_of
from pacsys.replies import reading_body, reply_bytes, setting_reply
from pacsys.status import DPM, DPM_WRITE_OUTCOME_UNKNOWN
from pacsys.supervised._audit import AuditLog
from pacsys.supervised._forwarded import ForwardedError, TrustedProxies
from pacsys.supervised._identity import Callers
from pacsys.supervised._peers import Bucket, Peers
from pacsys.supervised._policies import Policy
from pacsys.supervised._protected_writes import HeldSettings, SettingWrite, read_current
from pacsys.supervised._queue_budget import Cut, QueueBudget, queued_cost
from pacsys.supervised._refusal_log import RefusalLog
from pacsys.supervised.gate import (
    DRAINING_DETAILS,
    Decision,
    Gate,
    GateRequest,
    Opened,
    Refusal,
    ServicerLimits,
    ServicerStats,
)

__all__ = ["SERVICE_NAME", "DAQServicer", "OpenStream", "ServicerLimits", "ServicerStats"]

logger = logging.getLogger("pacsys.supervised")

SERVICE_NAME = "services.daq.DAQ"


# A stream hands the loop back after this many readings of one batch, so that one heavy
# stream's burst does not hold everyone else's replies (smaller batches wait between them).
YIELD_AFTER = 32


@dataclass(eq=False)
class OpenStream:
    """One client stream, as the status view shows it and the queue budget weighs it."""

    peer: str
    drfs: list[str]
    opened: float  # time.time()
    handle: AsyncSubscriptionHandle
    identity: str = ""
    seq: int = 0  # its request's audit seq
    context: grpc.aio.ServicerContext | None = None  # to end it with a status from outside its task
    task: asyncio.Task | None = None  # the task writing its replies
    # What the queue budget (`_queue_budget`) weighs: kept by the task writing the stream.
    caught_up: int = 0  # how often it found its queue empty
    written: int = 0  # readings whose replies it has written
    writing: bool = False  # whether it is writing a batch (not waiting for readings or pacing)

    @property
    def queued_bytes(self) -> int:
        return self.handle.queued_bytes

    def row(self, now: float) -> dict[str, object]:
        return {
            "peer": self.peer,
            "identity": self.identity,
            "drfs": summarize_drfs(self.drfs, limit=2),
            "age_s": round(now - self.opened, 1),
            "delivered": self.handle.delivered,
            "dropped": self.handle.dropped,
            "queued": len(self.handle),
            "queued_bytes": self.handle.queued_bytes,
        }


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


async def _backend_failed(context: grpc.aio.ServicerContext, rpc: str, peer: str, exc: Exception) -> NoReturn:
    """End the call with the gRPC status of the backend's exception (the table in pacsys.errors);
    one of no row (INTERNAL) is a bug somewhere, logged with its traceback."""
    code, details = grpc_status_of(exc)
    if code == "INTERNAL":
        logger.error("event=backend_call_failed rpc=%s peer=%s", rpc, peer, exc_info=exc)
    await context.abort(grpc.StatusCode[code], details)
    raise AssertionError("unreachable: abort raises")


class _Abort(Exception):
    """A stream ended by a refusal after it was admitted (a drain)."""

    def __init__(self, refusal: Refusal):
        super().__init__(refusal.details)
        self.refusal = refusal


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
        callers: Callers | None = None,
        trusted_proxies: TrustedProxies | None = None,
    ):
        self.backend = backend
        # Whether calls come over TLS and with client certificates: facts of the server's ports.
        self.callers = callers if callers is not None else Callers()
        # None unless trusted_proxies is set: then x-forwarded-for is looked at (per call).
        self.proxies = trusted_proxies if trusted_proxies is not None and trusted_proxies.networks else None
        self.gate = Gate(
            policies,
            token,
            audit_log,
            limits,
            log_requests,
            allow_unaudited_writes=allow_unaudited_writes,
            token_over_plaintext=token_over_plaintext,
        )
        self._streams: dict[AsyncSubscriptionHandle, OpenStream] = {}
        self._held = HeldSettings()  # the settings Sets in flight judge from their current values
        limits = self.gate.limits
        self.queue_budget: QueueBudget[OpenStream] = QueueBudget(
            limits.max_queued_bytes_per_peer, limits.max_queued_bytes, limits.stalled_stream_seconds
        )
        self._cut_log = RefusalLog(limits.refusal_log_interval)
        self._ending: set[asyncio.Task] = set()  # statuses of streams ended from outside, being sent

    # -- wiring ------------------------------------------------------------------------

    def rpc_handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "Read": grpc.unary_stream_rpc_method_handler(
                    self.Read,
                    request_deserializer=_decoder(DAQ_pb2.ReadingList),
                    response_serializer=None,  # replies are bytes already: gRPC sends them as they are
                ),
                "Set": grpc.unary_unary_rpc_method_handler(
                    self.Set,
                    request_deserializer=_decoder(DAQ_pb2.SettingList),
                    response_serializer=DAQ_pb2.SettingReply.SerializeToString,
                ),
            },
        )

    # -- the gate's state, as the server, the status view and the metrics read it ----------

    @property
    def stats(self) -> ServicerStats:
        return self.gate.stats

    @property
    def peers(self) -> Peers:
        return self.gate.peers

    @property
    def limits(self) -> ServicerLimits:
        return self.gate.limits

    @property
    def audit(self) -> AuditLog | None:
        return self.gate.audit

    @property
    def policies(self) -> list[Policy]:
        return self.gate.policies

    @property
    def log_requests(self) -> bool:
        return self.gate.log_requests

    @log_requests.setter
    def log_requests(self, value: bool) -> None:
        self.gate.log_requests = value

    @property
    def draining(self) -> bool:
        return self.gate.draining

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    def queued_bytes_now(self) -> int:
        """Bytes of readings queued for client streams now (their estimated cost, `_queue_budget`)."""
        return sum(h.queued_bytes for h in list(self._streams))

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
        return self.gate.token

    def token_refusal(self, context: grpc.aio.ServicerContext, token: str | None) -> tuple[grpc.StatusCode, str] | None:
        """The code and details that refuse a call not carrying `token` as Set requires it, or None."""
        _, tls = self.callers.identify(context, context.peer())
        refusal = self.gate.token_refusal(context.invocation_metadata() or (), tls, token)
        if refusal is None:
            return None
        return grpc.StatusCode[refusal.code], refusal.details

    def set_token(self, token: str | None) -> None:
        """Replace the bearer token that Set requires (None: no token required)."""
        self.gate.token = token

    def set_policies(self, policies: list[Policy]) -> None:
        """Swap the policy chain atomically (a request uses the list it started with)."""
        self.gate.policies = list(policies)

    def client_of(self, context: grpc.aio.ServicerContext) -> tuple[str, str]:
        """(peer, identity) of a call's client: the one a trusted proxy forwards, else the caller
        itself (ForwardedError when a trusted proxy's header is not an address)."""
        peer = context.peer()
        forwarded = None if self.proxies is None else self.proxies.client(peer, context.invocation_metadata() or ())
        return forwarded or (peer, self.callers.identify(context, peer)[0])

    def end_streams(self) -> None:
        """Drain: every open stream ends (UNAVAILABLE, so clients reconnect elsewhere)."""
        self.gate.draining = True
        for handle in list(self._streams):
            handle.signal_stop()

    # -- Read --------------------------------------------------------------------------

    async def Read(
        self, request: DAQ_pb2.ReadingList | _Undecodable, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        started = time.perf_counter()
        decision = self.gate.admit(_gate_request("Read", request, context, started, self.callers, self.proxies))
        if decision.refusal is not None:
            await _abort(context, decision.refusal)
            return
        peer, who = decision.request.peer, decision.request.identity
        drfs = decision.request.drfs  # as the client sent them, for the log
        final = decision.final
        assert final is not None
        try:
            caller_authorization.set(decision.metadata.get("authorization"))
            if decision.oneshot:
                timeout = context.time_remaining()
                devices = [parsed.device for parsed in decision.parsed]  # the gate's parse, not another
                bodies = await self.backend.read_bodies(final.drfs, timeout=timeout, devices=devices)
                self.gate.log_outcome("Read", peer, drfs, "allow", started)
                audit = self.audit
                for pos, body in enumerate(bodies):
                    reply = reply_bytes(decision.original[pos], body)
                    if audit is not None and audit.log_responses:
                        audit.log_response(decision.seq, peer, "Read", DAQ_pb2.ReadingReply.FromString(reply))
                    yield reply
                return
            self.gate.log_outcome("Read", peer, drfs, "allow", started)
            async for reply in self._stream(decision, peer, who, context):
                yield reply
        except _Abort as abort:
            await _abort(context, abort.refusal)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.stats.requests[("Read", "error")] += 1
            await _backend_failed(context, "Read", peer, exc)
        finally:
            self.gate.release(decision)

    async def _stream(
        self, decision: Decision, peer: str, who: str, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        assert decision.final is not None
        drfs = decision.final.drfs
        # Readings come back under the DRF as requested or in its canonical spelling
        # (a shared subscription serves every spelling of one request).
        slots: dict[str, list[int]] = {}
        for pos, (drf, parsed) in enumerate(zip(drfs, decision.parsed, strict=True)):
            slots.setdefault(drf, []).append(decision.original[pos])
            if parsed.canonical != drf:
                slots.setdefault(parsed.canonical, []).append(decision.original[pos])
        handle = await self.backend.subscribe_bodies(drfs)
        if self.limits.stream_buffer is not None:
            handle.resize(self.limits.stream_buffer)
        handle.meter(queued_cost)
        stream = OpenStream(peer, drfs, time.time(), handle, who, decision.seq, context, asyncio.current_task())
        self._streams[handle] = stream
        audit = self.audit
        log_out = audit is not None and audit.log_responses
        seq = decision.seq
        # Budgets: this stream's, and its client's shared by all of its streams.
        own_budget = Bucket(self.limits.max_stream_rate)
        peer_budget = self.peers.bucket(who)
        try:
            while True:
                if not len(handle):
                    stream.caught_up += 1
                await handle.wait()
                batch = handle.drain()
                stream.writing = True
                for n, item in enumerate(batch, 1):
                    if isinstance(item, tuple):  # (DRF, the body its worker encoded): a worker pool's
                        drf, body = item
                    else:  # a Reading of a backend in this process: encoded here
                        drf, body = item.drf, reading_body(item)
                    indices = slots.get(drf)
                    if indices is None:
                        logger.warning("event=stream_reading_dropped reason=not_requested drf=%s", drf)
                        continue
                    for index in indices:
                        reply = reply_bytes(index, body)
                        if log_out:
                            audit.log_response(seq, peer, "Read", DAQ_pb2.ReadingReply.FromString(reply))  # type: ignore[union-attr]
                        yield reply
                    stream.written += 1
                    if n % YIELD_AFTER == 0:
                        await asyncio.sleep(0)  # a large batch lets the others' replies through
                stream.writing = False
                taken = len(batch)
                self.stats.readings_delivered += taken
                handle.sent()
                batch.clear()  # written: not held while this stream waits
                if handle.stopped and not len(handle):
                    if handle.exc is not None:
                        raise handle.exc
                    if self.draining:
                        raise _Abort(Refusal("UNAVAILABLE", DRAINING_DETAILS, "draining"))
                    return
                # Over budget, this stream waits: its own buffer fills and drops its own oldest.
                own_wait = own_budget.take(taken)
                peer_wait = peer_budget.take(taken)
                if own_wait or peer_wait:
                    self.stats.limits_hit["max_stream_rate" if own_wait >= peer_wait else "max_peer_rate"] += 1
                    await _pause(handle, max(own_wait, peer_wait))
        finally:
            self._streams.pop(handle, None)
            self.stats.readings_dropped += handle.dropped
            if handle.dropped:
                self._log_bounded(
                    (who or peer, "stream_ended_behind"),
                    "event=stream_ended_behind peer=%s drfs=%s delivered=%d dropped=%d",
                    peer,
                    summarize_drfs(drfs),
                    handle.delivered,
                    handle.dropped,
                )
            await handle.stop()

    # -- the queue budget ----------------------------------------------------------------

    async def watch_queues(self) -> None:
        """End the streams that stall their clients over the queued-bytes budgets
        (`_queue_budget`); the server runs it while it serves."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.queue_budget.interval)
            self._end_stalled(loop.time())

    def _end_stalled(self, now: float) -> None:
        # (A function of its own: a loop variable left holding the last cut would keep its queue.)
        for cut in self.queue_budget.cuts(list(self._streams.values()), now):
            self._cut(cut)

    def _cut(self, cut: Cut[OpenStream]) -> None:
        """End a stalled stream with RESOURCE_EXHAUSTED: counted, logged at a bounded rate, audited."""
        stream = cut.stream
        if self._streams.pop(stream.handle, None) is None:
            return  # it ended meanwhile
        stream.handle.signal_stop()
        self.stats.limits_hit[cut.limit] += 1
        self._log_bounded(
            (stream.identity or stream.peer, "stream_cut"),
            "event=stream_cut limit=%s peer=%s identity=%s drfs=%s queued_bytes=%d client_bytes=%d share=%d seconds=%.1f",
            cut.limit,
            stream.peer,
            stream.identity,
            summarize_drfs(stream.drfs),
            cut.queued_bytes,
            cut.client_bytes,
            cut.share,
            cut.seconds,
        )
        audit = self.audit
        if audit is not None:
            audit.log_event(
                stream.seq,
                "stream_cut",
                limit=cut.limit,
                queued_bytes=cut.queued_bytes,
                client_bytes=cut.client_bytes,
                share=cut.share,
            )
        # The task writing the stream is most likely waiting for the client to take a reply (HTTP/2
        # flow control): the status is sent from another task, and the writer cancelled, which
        # frees the stream's queue now, not when (if ever) the client reads again.
        if stream.context is not None:
            ending = asyncio.get_running_loop().create_task(_end_call(stream.context, cut.details()))
            self._ending.add(ending)
            ending.add_done_callback(self._ending.discard)
        if stream.task is not None:
            stream.task.cancel()

    def _log_bounded(self, key: tuple[str, str], text: str, *args: object) -> None:
        """A WARNING line, at most one per client and kind per refusal_log_interval (then counted)."""
        not_logged = self._cut_log.admit(key)
        if not_logged is None:
            self.stats.refusals_not_logged += 1
            return
        if not_logged:
            text, args = text + " not_logged=%d", (*args, not_logged)
        logger.warning(text, *args)

    # -- Set ---------------------------------------------------------------------------

    async def Set(
        self, request: DAQ_pb2.SettingList | _Undecodable, context: grpc.aio.ServicerContext
    ) -> DAQ_pb2.SettingReply:
        started = time.perf_counter()
        opened = self.gate.door(_gate_request("Set", request, context, started, self.callers, self.proxies))
        if isinstance(opened, Refusal):
            await _abort(context, opened)
            raise AssertionError("unreachable: abort raises")
        async with self._held.hold(opened.wanted):
            decision = await self._decide(opened, context)
            if decision.refusal is not None:
                await _abort(context, decision.refusal)
                raise AssertionError("unreachable: abort raises")
            try:
                return await self._write(decision, context, started)
            finally:
                self.gate.release(decision)

    async def _decide(self, opened: Opened, context: grpc.aio.ServicerContext) -> Decision:
        """The gate's decision on a Set, given the current values of the settings it wanted."""
        caller_authorization.set(opened.metadata.get("authorization"))
        current = await read_current(self.backend, opened.wanted, context.time_remaining())
        return self.gate.decide(opened, current)

    async def _write(
        self, decision: Decision, context: grpc.aio.ServicerContext, started: float
    ) -> DAQ_pb2.SettingReply:
        final = decision.final
        assert final is not None
        peer = decision.request.peer
        drfs = list(decision.request.drfs)
        caller_authorization.set(decision.metadata.get("authorization"))
        write = SettingWrite(decision)
        try:
            results = await write.run(self.backend, context.time_remaining())
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.gate.log_outcome("Set", peer, drfs, "error", started)
            await _backend_failed(context, "Set", peer, exc)
        finally:
            self.gate.written(decision, write.outcomes)
        ordered = [results[0]] * len(results)
        for pos, result in enumerate(results):
            ordered[decision.original[pos]] = result
        unknown = [r.drf for r in ordered if (r.facility_code, r.error_code) == (DPM, DPM_WRITE_OUTCOME_UNKNOWN)]
        audit = self.audit
        if unknown and audit is not None:
            audit.log_event(decision.seq, "write_outcome_unknown", drfs=unknown)
        not_sent = [r.drf for r in ordered if r.skipped]
        if not_sent and audit is not None:
            audit.log_event(decision.seq, "settings_not_sent", drfs=not_sent)
        reply = setting_reply(ordered)
        if audit is not None and audit.log_responses:
            audit.log_response(decision.seq, peer, "Set", reply)
        self.gate.log_outcome("Set", peer, drfs, "allow", started)
        return reply


def _gate_request(
    rpc: str,
    request: Any,
    context: grpc.aio.ServicerContext,
    started: float,
    callers: Callers,
    proxies: TrustedProxies | None = None,
) -> GateRequest:
    """The gate's view of a call: its client (the one a trusted proxy forwards), metadata and
    transport, its DRFs or settings."""
    peer = context.peer()
    who, tls = callers.identify(context, peer)
    if proxies is not None:
        try:
            peer, who = proxies.client(peer, context.invocation_metadata() or ()) or (peer, who)
        except ForwardedError as exc:
            return GateRequest(rpc, peer, who, malformed=str(exc), started=started)
    if isinstance(request, _Undecodable):
        kind = "ReadingList" if rpc == "Read" else "SettingList"
        malformed = f"request is not a {kind} ({request.size} bytes, {request.error})"
        return GateRequest(rpc, peer, who, malformed=malformed, started=started)
    metadata = context.invocation_metadata() or ()
    if rpc == "Read":
        return GateRequest(rpc, peer, who, metadata, list(request.drf), tls=tls, raw=request, started=started)
    settings = request.setting
    return GateRequest(
        rpc,
        peer,
        who,
        metadata,
        [s.device for s in settings],
        [s.value for s in settings],
        tls=tls,
        raw=request,
        started=started,
    )


async def _abort(context: grpc.aio.ServicerContext, refusal: Refusal) -> None:
    await context.abort(grpc.StatusCode[refusal.code], refusal.details)


async def _end_call(context: grpc.aio.ServicerContext, details: str) -> None:
    """End a stream's call with RESOURCE_EXHAUSTED from outside the task writing it.

    gRPC sends the status after the reply it is holding: a client that reads again gets that
    reply, then the status. Until then (or until its connection closes) this waits.
    """
    try:
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, details)
    except Exception:  # noqa: S110 - AbortError once sent, an error when the client left first: done either way
        pass


async def _pause(handle: AsyncSubscriptionHandle, seconds: float) -> None:
    """Sleep `seconds`, or less when the subscription stops (a drain must not wait for a paced stream)."""
    loop = asyncio.get_running_loop()
    until = loop.time() + seconds
    while not handle.stopped and (left := until - loop.time()) > 0:
        await asyncio.sleep(min(left, 0.1))
