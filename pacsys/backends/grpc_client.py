"""DAQClientBackend: an AsyncBackend that forwards to another DAQ gRPC server.

The upstream is Fermilab's DAQ service or another pacsys-supervisor; the wire is the
one in docs/wire.md. DRFs are sent unchanged, so the upstream decides what is a
one-shot read and what is a subscription.

- The grpc.aio channel is created lazily, on the running loop of the first call (a
  grpc.aio channel belongs to the loop that uses it). The backend may be built outside a
  loop; a call made on another loop later gets a fresh channel. Use it from one loop at
  a time. Keepalive pings every 30 s, also with no call open (the pacsys client pings every
  300 s, only while a call is open: this one keeps idle upstream connections warmer).
- get_many: one Read call with the DRFs; the first reply per index is kept. A one-shot
  request (every DRF @I or @N) ends upstream once each index is answered. A request with
  other DRFs is a subscription upstream: the first reading per index is returned and the
  call is then cancelled. An index the upstream never answered becomes an error reading
  (ACNET 1, -6 request timeout). When the deadline passes after some indices were
  answered, the rest are such timeout readings; when nothing at all came, TimeoutError.
- write_many: one Set call; SettingReply.status[i] answers settings[i]. A status missing
  from the reply reads DPM -120 (write outcome unknown): the setting may have been applied.
- subscribe: a Read call with no deadline, pumped by a task into an AsyncSubscriptionHandle
  (reading.drf is the requested DRF at the reply's index). UNAVAILABLE or CANCELLED from the
  upstream (restart, drain, network) reconnects with backoff, 0.1 s doubling to 5 s, reset
  by the next reply: the handle sees a gap, not an error. Any other gRPC error ends the
  handle with the mapped exception (below). An upstream that ends the stream normally (a
  subscription of one-shot DRFs) stops the handle without an error. A subscription made
  while the upstream is down retries the same way, so errors surface through the handle,
  never from subscribe() itself. The `callback`/`on_error` arguments are ignored, as in the
  other async backends: read `handle.readings()`.
- TLS: with `tls` (a `ClientTLS`: a CA bundle, the system's when none is given, and
  optionally a client certificate and key for an upstream that does mutual TLS) the
  channel is a secure one; the files are read when the backend is built.
- Authorization: `authorization: Bearer <token>` when `token` is given. With
  `pass_caller_token`, the caller's own `authorization` header
  (`pacsys.aio.caller_authorization`, set by the servicer) is sent as it is and wins over
  `token`; `token`, if given, is the fallback when the caller sent none. A subscription keeps
  the header it was made with across reconnects.

gRPC errors of one-shot calls (and the ones that end a subscription) become the exceptions
that a chained supervisor's servicer answers with the same code (`pacsys.errors.ERROR_KINDS`;
CANCELLED by the upstream counts as UNAVAILABLE, OUT_OF_RANGE as INVALID_ARGUMENT); any other
code becomes pacsys.errors.ReadError (Read) or WriteError (Set).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio

from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2, DAQ_pb2_grpc
from pacsys.aio import AsyncBackend, AsyncSubscriptionHandle, caller_authorization
from pacsys.errors import ReadError, WriteError, exception_for_code
from pacsys.replies import reading_from_reply, value_to_proto
from pacsys.status import ACNET, ACNET_REQUEST_TIMEOUT, DPM, DPM_WRITE_OUTCOME_UNKNOWN
from pacsys.types import BackendCapability, Reading, Value, WriteResult

logger = logging.getLogger("pacsys.backends.grpc_client")

RECONNECT_INITIAL = 0.1
RECONNECT_MAX = 5.0

# As the pacsys client: ping every 30 s, also with no call open, with no cap on pings
# sent without data. The channel's own reconnect backoff follows the subscription's.
KEEPALIVE_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", int(RECONNECT_INITIAL * 1000)),
    ("grpc.max_reconnect_backoff_ms", int(RECONNECT_MAX * 1000)),
]

_RECONNECT_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


def map_rpc_error(exc: grpc.aio.AioRpcError, target: str, fallback: type[Exception] = ReadError) -> Exception:
    """The exception for a gRPC error of the upstream at `target` (the table in pacsys.errors)."""
    code = exc.code()
    message = f"upstream {target} answered {code.name}: {exc.details() or 'no details'}"
    return exception_for_code(code.name, message, fallback)


@dataclass(frozen=True)
class ClientTLS:
    """TLS to the upstream: PEM files of the CA (None: the system's roots) and of a client certificate."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate needs both cert and key")

    def credentials(self) -> grpc.ChannelCredentials:
        """The channel credentials, the files read now (OSError names the one that cannot be read)."""

        def read(path: str | None) -> bytes | None:
            if path is None:
                return None
            with open(path, "rb") as f:
                return f.read()

        return grpc.ssl_channel_credentials(read(self.ca), read(self.key), read(self.cert))


def _timeout_reading(drf: str) -> Reading:
    return Reading(
        drf=drf, facility_code=ACNET, error_code=ACNET_REQUEST_TIMEOUT, message="no reply from the upstream DAQ server"
    )


class DAQClientBackend(AsyncBackend):
    def __init__(
        self,
        target: str,
        token: str | None = None,
        pass_caller_token: bool = False,
        default_timeout: float = 5.0,
        channel_options: Sequence[tuple[str, Any]] | None = None,
        tls: ClientTLS | None = None,
    ):
        if not target:
            raise ValueError("target must be HOST:PORT")
        if default_timeout <= 0:
            raise ValueError(f"default_timeout must be positive, got {default_timeout!r}")
        self.target = target
        self._token = token
        self.pass_caller_token = pass_caller_token
        self.default_timeout = default_timeout
        # Caller options come last: gRPC takes the last value given for a key.
        self._options = [*KEEPALIVE_OPTIONS, *(channel_options or ())]
        self._credentials = tls.credentials() if tls is not None else None
        self._channel: grpc.aio.Channel | None = None
        self._channel_loop: asyncio.AbstractEventLoop | None = None
        self._stub: DAQ_pb2_grpc.DAQStub | None = None
        self._subscriptions: dict[AsyncSubscriptionHandle, asyncio.Task[None]] = {}
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"DAQClientBackend(target={self.target!r}, token={'set' if self._token else 'none'}, "
            f"pass_caller_token={self.pass_caller_token}, default_timeout={self.default_timeout})"
        )

    @property
    def capabilities(self) -> BackendCapability:
        return BackendCapability.READ | BackendCapability.WRITE | BackendCapability.STREAM | BackendCapability.BATCH

    @property
    def subscription_count(self) -> int:
        return len(self._subscriptions)

    # -- plumbing ------------------------------------------------------------------------

    def _daq(self) -> DAQ_pb2_grpc.DAQStub:
        """The stub on this loop's channel, creating the channel on first use."""
        if self._closed:
            raise RuntimeError("Backend is closed")
        loop = asyncio.get_running_loop()
        if self._stub is None or self._channel_loop is not loop:
            if self._channel is not None:
                logger.debug("event=daq_channel_opened target=%s reason=new_event_loop", self.target)
            if self._credentials is not None:
                self._channel = grpc.aio.secure_channel(self.target, self._credentials, options=self._options)
            else:
                self._channel = grpc.aio.insecure_channel(self.target, options=self._options)
            self._channel_loop = loop
            self._stub = DAQ_pb2_grpc.DAQStub(self._channel)
        return self._stub

    def _metadata(self) -> tuple[tuple[str, str], ...] | None:
        if self.pass_caller_token:
            header = caller_authorization.get()
            if header is not None:
                return (("authorization", header),)
        if self._token is not None:
            return (("authorization", f"Bearer {self._token}"),)
        return None

    def _timeout(self, timeout: float | None) -> float:
        return self.default_timeout if timeout is None else max(timeout, 0.0)

    # -- one-shot calls ------------------------------------------------------------------

    async def get_many(self, drfs: list[str], timeout: float | None = None) -> list[Reading]:
        drfs = list(drfs)
        if not drfs:
            return []
        call = self._daq().Read(
            DAQ_pb2.ReadingList(drf=drfs), timeout=self._timeout(timeout), metadata=self._metadata()
        )
        got: dict[int, Reading] = {}
        try:
            # read(), not `async for`: leaving early must not strand the call's async generator
            while (reply := await call.read()) is not grpc.aio.EOF:
                index = reply.index
                if index >= len(drfs) or index in got:
                    continue  # a later reply for an index, or one we never asked for
                got[index] = reading_from_reply(drfs[index], reply)
                if len(got) == len(drfs):
                    break  # a subscription upstream: its first readings are all we need
        except grpc.aio.AioRpcError as exc:
            if not (got and exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED):
                raise map_rpc_error(exc, self.target, ReadError) from exc
        finally:
            call.cancel()  # no-op once the upstream has ended the stream
        return [got.get(i) or _timeout_reading(drf) for i, drf in enumerate(drfs)]

    async def write_many(self, settings: list[tuple[str, Value]], timeout: float | None = None) -> list[WriteResult]:
        settings = list(settings)
        if not settings:
            return []
        request = DAQ_pb2.SettingList()
        for i, (drf, value) in enumerate(settings):
            setting = request.setting.add()
            setting.device = drf
            try:
                value_to_proto(value, None, setting.value)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"setting {i} ({drf!r}): cannot send the value: {exc}") from exc
        try:
            reply = await self._daq().Set(request, timeout=self._timeout(timeout), metadata=self._metadata())
        except grpc.aio.AioRpcError as exc:
            raise map_rpc_error(exc, self.target, WriteError) from exc
        if len(reply.status) != len(settings):
            logger.warning(
                "event=set_status_count_mismatch target=%s statuses=%d settings=%d",
                self.target,
                len(reply.status),
                len(settings),
            )
        results = []
        for i, (drf, _) in enumerate(settings):
            if i < len(reply.status):
                s = reply.status[i]
                results.append(
                    WriteResult(
                        drf=drf, facility_code=s.facility_code, error_code=s.status_code, message=s.message or None
                    )
                )
            else:
                results.append(
                    WriteResult(
                        drf=drf,
                        facility_code=DPM,
                        error_code=DPM_WRITE_OUTCOME_UNKNOWN,
                        message="the upstream sent no status for this setting",
                    )
                )
        return results

    # -- subscriptions -------------------------------------------------------------------

    async def subscribe(self, drfs: list[str], callback: Any = None, on_error: Any = None) -> AsyncSubscriptionHandle:
        drfs = list(drfs)
        if not drfs:
            raise ValueError("subscribe needs at least one DRF")
        self._daq()  # closed check, channel on this loop
        metadata = self._metadata()
        task: asyncio.Task[None] | None = None

        async def remove(handle: AsyncSubscriptionHandle) -> None:
            self._subscriptions.pop(handle, None)
            if task is not None and not task.done():
                task.cancel()
                await asyncio.wait([task])

        handle = AsyncSubscriptionHandle(remover=remove)
        task = asyncio.get_running_loop().create_task(
            self._pump(handle, drfs, metadata), name=f"daq-subscription {self.target}"
        )
        self._subscriptions[handle] = task
        return handle

    async def _pump(
        self, handle: AsyncSubscriptionHandle, drfs: list[str], metadata: tuple[tuple[str, str], ...] | None
    ) -> None:
        request = DAQ_pb2.ReadingList(drf=drfs)
        backoff = RECONNECT_INITIAL
        try:
            while not handle.stopped:
                call = self._daq().Read(request, metadata=metadata)
                try:
                    while (reply := await call.read()) is not grpc.aio.EOF:
                        backoff = RECONNECT_INITIAL
                        if reply.index < len(drfs):
                            handle.dispatch(reading_from_reply(drfs[reply.index], reply))
                    handle.signal_stop()  # the upstream ended the stream normally
                    return
                except grpc.aio.AioRpcError as exc:
                    if exc.code() not in _RECONNECT_CODES:
                        handle.signal_error(map_rpc_error(exc, self.target, ReadError))
                        return
                    # the first interruption at INFO; the retries of a long outage at DEBUG
                    logger.log(
                        logging.INFO if backoff == RECONNECT_INITIAL else logging.DEBUG,
                        "event=subscription_interrupted target=%s code=%s detail=%s reconnect_in=%.1fs",
                        self.target,
                        exc.code().name,
                        exc.details(),
                        backoff,
                    )
                finally:
                    call.cancel()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RECONNECT_MAX)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # not a gRPC status: end the handle rather than die silently
            logger.exception("event=subscription_failed target=%s", self.target)
            handle.signal_error(exc)
        finally:
            self._subscriptions.pop(handle, None)

    async def _end_subscriptions(self) -> None:
        subscriptions, self._subscriptions = self._subscriptions, {}
        for handle, task in subscriptions.items():
            handle.signal_stop()
            task.cancel()
        tasks = [t for t in subscriptions.values() if not t.done()]
        if tasks:
            await asyncio.wait(tasks)

    async def stop_streaming(self) -> None:
        await self._end_subscriptions()

    async def close(self) -> None:
        """End every subscription and close the channel; later calls raise RuntimeError."""
        if self._closed:
            return
        self._closed = True
        await self._end_subscriptions()
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None and self._channel_loop is asyncio.get_running_loop():
            await channel.close()
        self._channel_loop = None


__all__ = ["DAQClientBackend", "map_rpc_error", "KEEPALIVE_OPTIONS"]
