"""The red-team benchmark's hand-built HTTP/2 frames are what a real gRPC server understands.

Checked against a real grpc.aio server on loopback: a call opened by the raw client gets its
reply (a request larger than the server's window is flow-controlled), from the source address
it was bound to; a burst of streams reset as soon as they are opened is taken without closing
the connection; pings are acknowledged; a header block split into CONTINUATION frames is read
as one. Bounded and fast; no timing is asserted.
"""

import asyncio
import time

import grpc

from benchmarks.bench_abuse import _audit_drfs
from benchmarks.h2_raw import (
    CANCEL,
    CONTINUATION,
    END_HEADERS,
    HEADERS,
    PING,
    RST_STREAM,
    connect,
    frame,
    grpc_message,
    request_headers,
)
from pacsys import drf

PATH = "/bench.Test/Echo"


async def _serve():
    peers = []

    async def echo(request: bytes, context):
        peers.append(context.peer())
        yield len(request).to_bytes(8, "big")  # what arrived, whole
        yield request[:16]

    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler("bench.Test", {"Echo": grpc.unary_stream_rpc_method_handler(echo)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port, peers


async def _until(condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def _run(test):
    async def main():
        server, port, peers = await _serve()
        try:
            await test(port, peers)
        finally:
            await server.stop(0)

    asyncio.run(main())


def test_a_call_gets_its_reply_and_a_large_request_is_flow_controlled():
    async def test(port, peers):
        conn = await connect("127.0.0.1", port, "127.0.0.2")
        small = await conn.call(PATH, b"hello", f"127.0.0.1:{port}")
        large = await conn.call(PATH, bytes(300_000), f"127.0.0.1:{port}")  # > the 64 KiB initial windows
        await _until(lambda: conn.ended(small) and conn.ended(large))
        assert conn.streams[small].messages == 2 and conn.streams[large].messages == 2
        assert conn.streams[small].reset_code is None and conn.goaway is None
        assert all(peer.startswith("ipv4:127.0.0.2:") for peer in peers)  # bound to its source address
        conn.close()

    _run(test)


def test_streams_reset_at_once_leave_the_connection_serving():
    async def test(port, peers):
        conn = await connect("127.0.0.1", port)
        await conn.settings_acked.wait()
        block = request_headers(PATH, f"127.0.0.1:{port}")
        first = conn.next_stream_id
        conn.next_stream_id += 100
        burst = b"".join(
            frame(HEADERS, END_HEADERS, s, block) + frame(RST_STREAM, 0, s, CANCEL.to_bytes(4, "big"))
            for s in range(first, first + 100, 2)
        )
        assert await conn.write(burst)
        after = await conn.call(PATH, b"still there", f"127.0.0.1:{port}")
        await _until(lambda: conn.ended(after))
        assert conn.answered(after) and conn.is_open and conn.goaway is None
        conn.close()

    _run(test)


def test_pings_are_acknowledged():
    async def test(port, peers):
        conn = await connect("127.0.0.1", port)
        await conn.settings_acked.wait()
        pings_before = conn.frames_in[PING]
        assert await conn.write(frame(PING, 0, 0, b"\0" * 8) * 50)
        await _until(lambda: conn.frames_in[PING] >= pings_before + 50)
        conn.close()

    _run(test)


def test_a_header_block_in_continuation_frames_is_read_as_one():
    async def test(port, peers):
        conn = await connect("127.0.0.1", port)
        stream_id = conn.new_stream()
        block = request_headers(PATH, f"127.0.0.1:{port}")
        pieces = [block[i : i + 20] for i in range(0, len(block), 20)]
        frames = frame(HEADERS, 0, stream_id, pieces[0])
        frames += b"".join(frame(CONTINUATION, 0, stream_id, p) for p in pieces[1:-1])
        frames += frame(CONTINUATION, END_HEADERS, stream_id, pieces[-1])
        assert await conn.write(frames)
        await conn.send_data(stream_id, grpc_message(b"continued"))
        await _until(lambda: conn.ended(stream_id))
        assert conn.streams[stream_id].messages == 2
        conn.close()

    _run(test)


def test_the_audit_attack_sends_valid_drfs_of_the_longest_length():
    drfs = _audit_drfs()
    assert len(drfs) == 1000 and {len(d) for d in drfs} == {512}
    assert all(drf.parse(d).is_oneshot for d in drfs)  # valid, and one-shot
