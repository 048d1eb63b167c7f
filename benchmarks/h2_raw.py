"""A hand-driven HTTP/2 client connection, for the red-team benchmark (`bench_abuse`).

A real client library will not send what an attacker sends: streams reset as soon as they are
opened, a header block continued forever, pings without end, streams whose replies are never
read. This connection sends exactly the frames it is given (built with `benchmarks.h2_reader`'s
`frame` and HPACK literals) and keeps just enough state to go on talking: it acknowledges
SETTINGS and (optionally) PING, tracks the send windows so that a large request message is
flow-controlled, and counts what the server sends back per stream (whole gRPC messages, the
end of a stream, RST_STREAM codes, GOAWAY). It decodes no response header: a stream is
"answered" when a message arrives on it, "ended" when the server ends or resets it.

Cheap on purpose: the attacker shares 2 cores with the server it attacks, so frames are
batched into large writes, writes wait while the kernel buffer is full (`write`), and a
connection can stop parsing what it reads (`parse = False`: bytes counted only).
"""

from __future__ import annotations

import asyncio
import collections
import socket
import struct

from benchmarks.h2_reader import (
    ACK,
    DATA,
    DEFAULT_WINDOW,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    MAX_WINDOW,
    PADDED,
    PING,
    PREFACE,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    frame,
    grpc_message,
    hpack_literals,
    messages_completed,
    split_frames,
)

CONTINUATION = 9
CANCEL = 0x8  # RST_STREAM error code
MAX_FRAME = 16_384  # the smallest SETTINGS_MAX_FRAME_SIZE: every server accepts frames this large
SETTINGS_MAX_CONCURRENT_STREAMS, SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE = 0x3, 0x4, 0x5
TOP_UP = 2**24  # bytes received on the connection before a WINDOW_UPDATE gives them back

__all__ = [
    "ACK",
    "CANCEL",
    "CONTINUATION",
    "END_HEADERS",
    "END_STREAM",
    "HEADERS",
    "MAX_FRAME",
    "PING",
    "RST_STREAM",
    "RawConnection",
    "connect",
    "frame",
    "grpc_message",
    "request_headers",
]


def request_headers(path: str, authority: str, extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    """The header block of a gRPC call (HPACK literals, nothing indexed)."""
    return hpack_literals(
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            *extra,
        ]
    )


class _Stream:
    __slots__ = ("window", "head", "remaining", "messages", "ended", "reset_code")

    def __init__(self, window: int):
        self.window = window  # bytes of DATA we may still send on it
        self.head = b""  # a message prefix split across DATA frames
        self.remaining = 0  # body bytes of the current message still to come
        self.messages = 0  # whole gRPC messages received
        self.ended = False  # ended by the server (END_STREAM or RST_STREAM)
        self.reset_code: int | None = None


class RawConnection(asyncio.Protocol):
    """One HTTP/2 connection driven by hand. `window`: give the server the largest windows (and
    top the connection window up), else leave HTTP/2's 64 KiB defaults, never topped up, so the
    server stalls once that much of its replies are unread. `ack_pings`: answer the server's
    pings. `read_interval`: leave the socket unread this long after each read (a slow reader)."""

    def __init__(self, *, window: bool = True, ack_pings: bool = True, read_interval: float = 0.0):
        self.give_window = window
        self.ack_pings = ack_pings
        self.read_interval = read_interval
        self.parse = True  # False: count bytes only (after set-up, for a flood's echo)
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, _Stream] = {}
        self.next_stream_id = 1
        self.frames_in: collections.Counter[int] = collections.Counter()
        self.resets: collections.Counter[int] = collections.Counter()  # RST_STREAM codes received
        self.goaway: tuple[int, int] | None = None  # (last stream id, error code) of the first GOAWAY
        self.bytes_in = 0
        self.settings_acked = asyncio.Event()  # the server's first SETTINGS arrived (and was acknowledged)
        self.server_max_streams = 2**31 - 1
        self._initial_window = DEFAULT_WINDOW  # the server's SETTINGS_INITIAL_WINDOW_SIZE
        self._send_window = DEFAULT_WINDOW  # connection-level window of what we send
        self._window_opened = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._rest = b""
        self._unacked = 0
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # -- connection --------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        settings = struct.pack(">HI", 0x2, 0)  # no server push
        first = PREFACE
        if self.give_window:
            settings += struct.pack(">HI", SETTINGS_INITIAL_WINDOW_SIZE, MAX_WINDOW)
            first += frame(SETTINGS, 0, 0, settings)
            first += frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", MAX_WINDOW - DEFAULT_WINDOW))
        else:
            first += frame(SETTINGS, 0, 0, settings)
        transport.write(first)

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self._writable.set()
        self._window_opened.set()
        if not self.closed.done():
            self.closed.set_result(None)

    @property
    def is_open(self) -> bool:
        return not self.closed.done() and self.transport is not None and not self.transport.is_closing()

    async def write(self, data: bytes) -> bool:
        """Write once the kernel takes more (a flood never buffers more than the transport's
        high-water mark); False once the connection is gone."""
        if not self._writable.is_set():
            await self._writable.wait()
        if not self.is_open:
            return False
        self.transport.write(data)  # type: ignore[union-attr]
        return True

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -- calls -------------------------------------------------------------------------

    def new_stream(self) -> int:
        stream_id = self.next_stream_id
        self.next_stream_id += 2
        self.streams[stream_id] = _Stream(self._initial_window)
        return stream_id

    async def call(self, path: str, request: bytes, authority: str, extra: tuple[tuple[str, str], ...] = ()) -> int:
        """Open a call and send its request message (flow-controlled); returns its stream id."""
        stream_id = self.new_stream()
        await self.write(frame(HEADERS, END_HEADERS, stream_id, request_headers(path, authority, extra)))
        await self.send_data(stream_id, grpc_message(request))
        return stream_id

    async def send_data(self, stream_id: int, payload: bytes) -> None:
        """DATA frames carrying `payload`, the last with END_STREAM, within the server's windows."""
        stream = self.streams[stream_id]
        view = memoryview(payload)
        while self.is_open:
            size = min(len(view), MAX_FRAME, self._send_window, stream.window)
            if size <= 0 and view:
                self._window_opened.clear()
                await self._window_opened.wait()
                continue
            last = size == len(view)
            self._send_window -= size
            stream.window -= size
            await self.write(frame(DATA, END_STREAM if last else 0, stream_id, bytes(view[:size])))
            view = view[size:]
            if last:
                return

    def opened_and_reset(self, block: bytes, count: int = 100) -> bytes:
        """`count` new streams, each its HEADERS (`block`) and at once RST_STREAM(CANCEL): the
        frames of a rapid reset, to be written in one go."""
        first = self.next_stream_id
        self.next_stream_id += 2 * count
        cancel = CANCEL.to_bytes(4, "big")
        return b"".join(
            frame(HEADERS, END_HEADERS, s, block) + frame(RST_STREAM, 0, s, cancel)
            for s in range(first, first + 2 * count, 2)
        )

    def answered(self, stream_id: int) -> bool:
        return self.streams[stream_id].messages > 0

    def ended(self, stream_id: int) -> bool:
        return self.streams[stream_id].ended

    # -- receiving ---------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        if self.read_interval:
            self.transport.pause_reading()  # type: ignore[union-attr]
            asyncio.get_running_loop().call_later(self.read_interval, self._resume_reading)
        if not self.parse:
            return
        frames, self._rest = split_frames(self._rest + data if self._rest else data)
        for kind, flags, stream_id, payload in frames:
            self.frames_in[kind] += 1
            self._on_frame(kind, flags, stream_id, payload)

    def _resume_reading(self) -> None:
        if self.is_open:
            self.transport.resume_reading()  # type: ignore[union-attr]

    def _on_frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        write = self.transport.write  # type: ignore[union-attr]
        if kind == DATA:
            self._on_data(stream_id, flags, payload)
        elif kind == HEADERS:
            if flags & END_STREAM:
                self._end(stream_id)
        elif kind == RST_STREAM:
            code = int.from_bytes(payload[:4], "big")
            self.resets[code] += 1
            self._end(stream_id, code)
        elif kind == SETTINGS:
            if not flags & ACK:
                self._on_settings(payload)
                write(frame(SETTINGS, ACK, 0))
                self.settings_acked.set()
        elif kind == PING:
            if not flags & ACK and self.ack_pings:
                write(frame(PING, ACK, 0, bytes(payload)))
        elif kind == GOAWAY:
            if self.goaway is None:
                self.goaway = (int.from_bytes(payload[:4], "big") & 0x7FFFFFFF, int.from_bytes(payload[4:8], "big"))
        elif kind == WINDOW_UPDATE:
            increment = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
            if stream_id == 0:
                self._send_window += increment
            elif stream_id in self.streams:
                self.streams[stream_id].window += increment
            self._window_opened.set()

    def _on_settings(self, payload: bytes) -> None:
        for pos in range(0, len(payload) - 5, 6):
            key, value = struct.unpack(">HI", payload[pos : pos + 6])
            if key == SETTINGS_MAX_CONCURRENT_STREAMS:
                self.server_max_streams = value
            elif key == SETTINGS_INITIAL_WINDOW_SIZE:
                delta = value - self._initial_window
                self._initial_window = value
                for stream in self.streams.values():
                    stream.window += delta
                self._window_opened.set()

    def _on_data(self, stream_id: int, flags: int, payload: bytes) -> None:
        if self.give_window:
            self._unacked += len(payload)
            if self._unacked >= TOP_UP:
                self.transport.write(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", self._unacked)))  # type: ignore[union-attr]
                self._unacked = 0
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        if flags & PADDED:
            payload = payload[1 : len(payload) - payload[0]]
        stream.messages += messages_completed(stream, payload)
        if flags & END_STREAM:
            self._end(stream_id)

    def _end(self, stream_id: int, code: int | None = None) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None and not stream.ended:
            stream.ended = True
            stream.reset_code = code


async def connect(
    host: str,
    port: int,
    source: str | None = None,
    *,
    receive_buffer: int | None = None,
    timeout: float = 5.0,
    **options,
) -> RawConnection:
    """A RawConnection to host:port from the local address `source` (e.g. 127.0.0.2: several
    loopback addresses stand for several clients), its preface and SETTINGS sent."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if receive_buffer is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        if source is not None:
            sock.bind((source, 0))
        await asyncio.wait_for(loop.sock_connect(sock, (host, port)), timeout)
        _, connection = await loop.create_connection(lambda: RawConnection(**options), sock=sock)
    except BaseException:
        sock.close()
        raise
    return connection
