"""The benchmark's frame-counting reader counts exactly the messages a gRPC server sends.

Checked against a real grpc.aio server: messages larger than one HTTP/2 frame, many small
messages per frame, several streams on one connection, and a stream that ends early (an error
for a benchmark whose streams never end).
"""

import asyncio
import time

import grpc
from helpers import until

from benchmarks.h2_reader import StreamCounter

SIZES = [1, 0, 40, 20_000, 70_000, 3] * 20  # 0: an empty message; 20k/70k: split across DATA frames


async def _serve():
    async def read(request: bytes, context):
        for size in SIZES:
            yield bytes(size)
        if request == b"end":
            return
        await asyncio.Event().wait()  # hold the stream open, like a subscription

    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler("bench.Test", {"Read": grpc.unary_stream_rpc_method_handler(read)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


def test_counts_every_message_of_every_stream():
    async def main():
        server, port = await _serve()
        loop = asyncio.get_running_loop()
        try:
            now = time.time()
            _, counter = await loop.create_connection(
                lambda: StreamCounter(f"127.0.0.1:{port}", now - 1, now + 3600), "127.0.0.1", port
            )
            for _ in range(5):
                counter.open("/bench.Test/Read", b"")
            counter.open("/bench.Test/Read", b"end")
            streams = [counter.streams[s] for s in counter.order]
            await until(lambda: all(s.count == len(SIZES) for s in streams) and counter.errors == 1)
            assert [s.ended for s in streams] == [False] * 5 + [True]
            counter.close()
            await asyncio.wait_for(counter.closed, 10)
        finally:
            await server.stop(0)

    asyncio.run(main())


def test_nothing_is_counted_outside_the_window():
    async def main():
        server, port = await _serve()
        loop = asyncio.get_running_loop()
        try:
            later = time.time() + 3600
            _, counter = await loop.create_connection(
                lambda: StreamCounter(f"127.0.0.1:{port}", later, later + 1), "127.0.0.1", port
            )
            counter.open("/bench.Test/Read", b"end")
            await until(lambda: counter.streams[1].ended)
            assert counter.streams[1].count == 0
            counter.close()
        finally:
            await server.stop(0)

    asyncio.run(main())


def test_the_longest_gap_inside_the_window_counts_its_start_and_end():
    """Messages at 5 (before the window [10, 20)), 12, 13 and 25 (after it): the longest gap is
    13 -> 20 (7 s: a stream that falls silent near the end starves too), not 25 - 13; a stream
    that never sends anything went the whole window without a message. A stream first served at
    16, then at 17 and 19, went 6 s without a message, but it was being taken, not starved: once
    served, its longest silence was 17 -> 19.
    """

    async def main():
        released = {b"": asyncio.Queue(), b"late": asyncio.Queue()}

        async def read(request: bytes, context):
            if request == b"silent":
                await asyncio.Event().wait()
            while True:
                await released[request].get()
                yield b"x"

        server = grpc.aio.server()
        handler = grpc.method_handlers_generic_handler(
            "bench.Test", {"Read": grpc.unary_stream_rpc_method_handler(read)}
        )
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        clock = [0.0]
        loop = asyncio.get_running_loop()
        try:
            _, counter = await loop.create_connection(
                lambda: StreamCounter(f"127.0.0.1:{port}", 10.0, 20.0, clock=lambda: clock[0]), "127.0.0.1", port
            )
            for request in (b"", b"silent", b"late"):
                counter.open("/bench.Test/Read", request)
            talking, silent, late = counter.order
            sent = {talking: 0, late: 0}
            messages = [(t, b"", talking) for t in (5.0, 12.0, 13.0, 25.0)] + [
                (t, b"late", late) for t in (16.0, 17.0, 19.0)
            ]
            for at, request, stream_id in sorted(messages):
                clock[0] = at  # each message arrives while the clock reads `at`
                released[request].put_nowait(None)
                sent[stream_id] += 1
                await until(lambda s=stream_id: counter.streams[s].received == sent[s])
            stream = counter.streams[talking]
            assert stream.count == 2  # 12 and 13: 5 and 25 are outside the window
            assert counter.longest_gap(talking) == 7.0
            assert counter.longest_gap(silent) == 10.0
            assert stream.first == 5.0 and counter.streams[silent].first is None
            assert counter.longest_served_gap(talking) == 7.0 and counter.longest_served_gap(silent) is None
            assert counter.longest_gap(late) == 6.0 and counter.longest_served_gap(late) == 2.0  # 17 -> 19
            counter.close()
        finally:
            await server.stop(0)

    asyncio.run(main())
