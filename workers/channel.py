"""One end of a worker's socketpair as an asyncio protocol: framed messages in and out.

Outgoing messages are buffered and written together once per loop iteration, so a
burst of replies or readings costs one system call. A frame that cannot be decoded
closes the connection: the peer is then gone, which both sides treat as fatal.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import msgspec

from workers.protocol import FrameReader, ProtocolError, encode

logger = logging.getLogger("pacsys.workers")


class FrameChannel(asyncio.Protocol):
    def __init__(
        self,
        message_type: object,
        on_message: Callable[[object], None],
        on_closed: Callable[[BaseException | None], None],
    ):
        self._reader = FrameReader(message_type)
        self._on_message = on_message
        self._on_closed = on_closed
        self._transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the transport's: flushes are scheduled on it
        self._outgoing: list[bytes] = []
        self._flush_scheduled = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._loop = asyncio.get_running_loop()

    def data_received(self, data: bytes) -> None:
        try:
            messages = self._reader.feed(data)
        except ProtocolError as exc:
            logger.error("event=channel_protocol_error error=%s", exc)
            self.abort(exc)
            return
        for message in messages:
            self._on_message(message)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.closed = True
            self._on_closed(exc)

    def send(self, message: msgspec.Struct) -> None:
        if self.closed:
            return
        self._outgoing.append(encode(message))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            (self._loop or asyncio.get_running_loop()).call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        if self._outgoing and self._transport is not None and not self.closed:
            self._transport.write(b"".join(self._outgoing))
        self._outgoing.clear()

    def close(self) -> None:
        self.flush()
        if self._transport is not None:
            self._transport.close()

    def abort(self, exc: BaseException | None = None) -> None:
        if self._transport is not None:
            self._transport.abort()
        if not self.closed:
            self.closed = True
            self._on_closed(exc)
