"""A light load generator for server-streaming Reads: HTTP/2 frames counted, never decoded.

Why it exists: on a 2-core machine the benchmark's client shares the cores with the server it
measures, and a grpc.aio client costs about as much CPU per received reply as the server spends
sending it (~50 µs). That client alone caps any server near half of 25,000 replies/s. This
reader speaks just enough HTTP/2 to open gRPC calls and count the length-prefixed messages that
arrive on each stream, a few microseconds per reply, so the numbers measure the server.

What it does: one TCP connection; client preface and SETTINGS (push off, stream windows at the
maximum); each call is a HEADERS frame (HPACK literals, no table) and one DATA frame holding the
request message, END_STREAM set. The connection window is topped up as DATA arrives; PING and
SETTINGS are acknowledged. `count_streams` reads the socket at most every 5 ms, so one read
takes the hundreds of replies that piled up meanwhile (reading each as it comes costs a wake-up
per reply). Response HEADERS/trailers are skipped, not decoded: a stream that ends (trailers or
RST_STREAM) during the run counts as an error. It is not a general client; the grpcio client
stays the reference (`--client grpc`) and is what the service's tests use.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Callable

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
END_STREAM, ACK, END_HEADERS, PADDED = 0x1, 0x1, 0x4, 0x8
MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW = 65_535
TOP_UP = 2**24  # bytes consumed on the connection before a WINDOW_UPDATE gives them back


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes((kind, flags)) + struct.pack(">I", stream) + payload


def _hpack_int(value: int, prefix_bits: int = 7) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((value,))
    out = bytearray((limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def hpack_literals(headers: list[tuple[str, str]]) -> bytes:
    """Header block of "literal without indexing, new name" fields (no Huffman, no table)."""
    out = bytearray()
    for name, value in headers:
        raw_name, raw_value = name.encode(), value.encode()
        out += b"\x00" + _hpack_int(len(raw_name)) + raw_name + _hpack_int(len(raw_value)) + raw_value
    return bytes(out)


def grpc_message(payload: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", len(payload)) + payload


def split_frames(view: bytes) -> tuple[list[tuple[int, int, int, bytes]], bytes]:
    """The whole HTTP/2 frames at the start of `view`, as (type, flags, stream id, payload),
    and the incomplete frame that follows them (kept for the next read)."""
    frames = []
    pos, size = 0, len(view)
    while size - pos >= 9:
        length = int.from_bytes(view[pos : pos + 3], "big")
        if size - pos < 9 + length:
            break
        stream_id = int.from_bytes(view[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
        frames.append((view[pos + 3], view[pos + 4], stream_id, view[pos + 9 : pos + 9 + length]))
        pos += 9 + length
    return frames, view[pos:]


def messages_completed(stream, payload: bytes) -> int:
    """How many gRPC messages (5-byte prefix, then the body) `payload`, a DATA frame's content
    without padding, completes on `stream`; its partial state (`head`: a prefix split across
    frames, `remaining`: body bytes still to come) is carried over to the next frame."""
    whole = 0
    pos, size = 0, len(payload)
    while pos < size:
        if stream.remaining:
            take = min(stream.remaining, size - pos)
            stream.remaining -= take
            pos += take
            whole += not stream.remaining
            continue
        need = 5 - len(stream.head)
        stream.head += payload[pos : pos + need]
        pos += need
        if len(stream.head) == 5:
            stream.remaining = int.from_bytes(stream.head[1:5], "big")
            stream.head = b""
            whole += not stream.remaining
    return whole


class _Stream:
    __slots__ = ("head", "remaining", "received", "count", "first", "last", "gap", "served_gap", "ended")

    def __init__(self) -> None:
        self.head = b""  # a message prefix split across DATA frames
        self.remaining = 0  # body bytes of the current message still to come
        self.received = 0  # whole messages received
        self.count = 0  # whole messages received inside the counting window
        self.first: float | None = None  # when its first whole message arrived
        self.last = 0.0  # when its last whole message arrived
        self.gap = 0.0  # longest time inside the counting window without a message (so far)
        self.served_gap = 0.0  # the same, counted only from its first message on
        self.ended = False


class StreamCounter(asyncio.Protocol):
    """Counts, per stream, the gRPC messages whose last byte arrives in [t_start, t_end)."""

    def __init__(
        self,
        authority: str,
        t_start: float,
        t_end: float,
        clock: Callable[[], float] = time.time,
        read_interval: float = 0.0,
    ):
        self.authority = authority
        # Seconds to leave the socket unread after each read, so that replies pile up in the
        # kernel and one read takes hundreds of them: the reader's cost per reply then falls
        # from tens of microseconds (a wake-up per reply) to a few. 0: read as data arrives.
        self.read_interval = read_interval
        self.t_start, self.t_end = t_start, t_end
        self.clock = clock
        self.streams: dict[int, _Stream] = {}
        self.order: list[int] = []
        self.errors = 0
        self.goaway = False
        self._rest = b""  # an incomplete frame left from the last read
        self._unacked = 0
        self._transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # -- sending -----------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self._transport = transport
        settings = struct.pack(">HI", 0x2, 0) + struct.pack(">HI", 0x4, MAX_WINDOW)
        transport.write(
            PREFACE
            + frame(SETTINGS, 0, 0, settings)
            + frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", MAX_WINDOW - DEFAULT_WINDOW))
        )

    def open(self, path: str, request: bytes) -> None:
        """Start one call; `order` lists the calls' stream ids in the order of opening."""
        assert self._transport is not None
        stream_id = 2 * len(self.order) + 1
        block = hpack_literals(
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", path),
                (":authority", self.authority),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ]
        )
        self.streams[stream_id] = _Stream()
        self.order.append(stream_id)
        self._transport.write(
            frame(HEADERS, END_HEADERS, stream_id, block) + frame(DATA, END_STREAM, stream_id, grpc_message(request))
        )

    def close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(frame(GOAWAY, 0, 0, struct.pack(">II", 0, 0)))
            self._transport.close()

    # -- receiving ---------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.read_interval:
            self._transport.pause_reading()  # type: ignore[union-attr]
            asyncio.get_running_loop().call_later(self.read_interval, self._resume)
        frames, self._rest = split_frames(self._rest + data if self._rest else data)
        now = self.clock()
        for kind, flags, stream_id, payload in frames:
            if kind == DATA:
                self._on_data(stream_id, flags, payload, now)
            elif kind == HEADERS:
                if flags & END_STREAM:
                    self._on_end(stream_id)
            elif kind == RST_STREAM:
                self._on_end(stream_id)
            elif kind == SETTINGS:
                if not flags & ACK:
                    self._transport.write(frame(SETTINGS, ACK, 0))  # type: ignore[union-attr]
            elif kind == PING:
                if not flags & ACK:
                    self._transport.write(frame(PING, ACK, 0, bytes(payload)))  # type: ignore[union-attr]
            elif kind == GOAWAY:
                self.goaway = True

    def _resume(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    def _on_data(self, stream_id: int, flags: int, payload: bytes, now: float) -> None:
        self._unacked += len(payload)
        if self._unacked >= TOP_UP:
            self._transport.write(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", self._unacked)))  # type: ignore[union-attr]
            self._unacked = 0
        if flags & PADDED:
            payload = payload[1 : len(payload) - payload[0]]
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        whole = messages_completed(stream, payload)
        if whole:
            stream.received += whole
            if stream.first is None:
                stream.first = now
            if now < self.t_end:
                if now >= self.t_start:
                    stream.count += whole
                    silent = now - max(stream.last, self.t_start)
                    stream.gap = max(stream.gap, silent)
                    if stream.first != now:  # not its first message: it was served before
                        stream.served_gap = max(stream.served_gap, silent)
                stream.last = now

    def longest_gap(self, stream_id: int) -> float:
        """The longest time inside the window the stream went without a message, its end included."""
        stream = self.streams[stream_id]
        return max(stream.gap, self.t_end - max(stream.last, self.t_start))

    def longest_served_gap(self, stream_id: int) -> float | None:
        """The same from its first message on (None: never served before the window's end): a
        stream the server took late is not starved, it was waiting to be taken."""
        stream = self.streams[stream_id]
        if stream.first is None or stream.first >= self.t_end:
            return None
        return max(stream.served_gap, self.t_end - max(stream.last, self.t_start))

    def _on_end(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None and not stream.ended:
            stream.ended = True
            if self.clock() < self.t_end:
                self.errors += 1

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


async def count_streams(
    port: int,
    path: str,
    requests: list[bytes],
    t_start: float,
    t_end: float,
    host: str = "127.0.0.1",
    read_interval: float = 0.005,
    local_host: str | None = None,
) -> dict:
    """Open one call per request; return counts per call (in order), errors, this process's CPU,
    when the calls were opened and when the last of them delivered its first message (None: never),
    and per call: when its first message arrived ("firsts", None: never), the longest time inside
    the window it went without a message ("gaps"; "served_gaps" counts only from its first message,
    None: never served), and whether it ended ("ended": trailers or RST_STREAM, which a server
    never sends a live subscription).

    `local_host`: the connection's source address (127.0.0.2 and so on stand for other clients).
    """
    loop = asyncio.get_running_loop()
    _, counter = await loop.create_connection(
        lambda: StreamCounter(f"{host}:{port}", t_start, t_end, read_interval=read_interval),
        host,
        port,
        local_addr=(local_host, 0) if local_host else None,
    )
    opened = time.time()
    for request in requests:
        counter.open(path, request)
    cpu: list[float] = []
    for t in (t_start, t_end):
        await asyncio.sleep(max(0.0, t - time.time()))
        cpu.append(time.process_time())
    counter.close()
    counts = [counter.streams[s].count for s in counter.order]
    errors = counter.errors + (len(requests) if counter.goaway and not any(counts) else 0)
    firsts = [counter.streams[s].first for s in counter.order]
    last_first = None if None in firsts else max(f for f in firsts if f is not None)
    return {
        "counts": counts,
        "errors": errors,
        "cpu": cpu[1] - cpu[0],
        "opened": opened,
        "last_first": last_first,
        "gaps": [counter.longest_gap(s) for s in counter.order],
        "served_gaps": [counter.longest_served_gap(s) for s in counter.order],
        "ended": [counter.streams[s].ended for s in counter.order],
        "firsts": firsts,
    }
