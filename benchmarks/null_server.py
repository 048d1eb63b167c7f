"""The "null DAQ server": a bare grpc.aio DAQ service answering from memory (the ceiling).

No policies, no audit, no backend, no worker: Read one-shots (`@I`, `@N`) answer one reply per
DRF with the device's scalar; any other Read is a stream that sends each DRF's scalar every period
of its `@P`/`@Q` event (1 s for other events); Set stores scalars and answers success.
Streams do the least a stream server can: one timer per period shared by all streams, each
reply serialized once per device and tick, replies written as bytes.

In-process: `with NullServer() as s: s.port` (its own loop in a thread).
Subprocess: `python -m benchmarks.null_server` prints the port and serves until stdin closes.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time

import grpc

from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2
from pacsys.aio._loops import new_event_loop
from pacsys.drf import parse_cached


def _device(drf: str) -> str:
    return drf.split("@", 1)[0].split(".", 1)[0].split("[", 1)[0].upper()


def _oneshot(drf: str) -> bool:
    _, at, event = drf.rpartition("@")
    return bool(at) and event[:1] in ("I", "i", "N", "n")


def _period(drf: str) -> float:
    event = parse_cached(drf).event
    if event is not None and event.kind in ("P", "Q") and event.period:
        return max(event.period / 1e6, 0.001)
    return 1.0


class _Ticker:
    """One timer for every stream on one period: each aligned deadline wakes them all at once.

    Deadlines are multiples of the period on the loop clock; a tick that fell behind by whole
    periods skips them instead of bursting. Each tick's replies are serialized once per device.
    """

    def __init__(self, period: float, values: dict[str, float]):
        self.period = period
        self.values = values
        self.streams: set[_Stream] = set()
        self.bodies: dict[str, bytes] = {}
        self.task: asyncio.Task | None = None

    def body(self, device: str) -> bytes:
        """This tick's reply for `device` without its index (serialized messages concatenate)."""
        body = self.bodies.get(device)
        if body is None:
            reply = DAQ_pb2.ReadingReply()
            reading = reply.readings.reading.add()
            reading.timestamp.FromNanoseconds(time.time_ns())
            reading.data.scalar = self.values.get(device, 0.0)
            body = self.bodies[device] = reply.SerializeToString()
        return body

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        when = (loop.time() // self.period + 1) * self.period
        while self.streams:
            await asyncio.sleep(max(0.0, when - loop.time()))
            self.bodies.clear()
            for stream in self.streams:
                stream.due(self)
            when += self.period
            late = loop.time() - when
            if late > 0:
                when += (late // self.period + 1) * self.period


class _Stream:
    """One client stream: the tickers that fired since it last wrote, and its wake-up.

    A ticker that fired twice before the stream got to write counts once: a stream that fell
    behind sends the current tick's readings, never the same reading twice.
    """

    def __init__(self) -> None:
        self.fired: set[_Ticker] = set()
        self.waiter: asyncio.Future[None] | None = None

    def due(self, ticker: _Ticker) -> None:
        self.fired.add(ticker)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def wait(self) -> set[_Ticker]:
        if not self.fired:
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        fired, self.fired = self.fired, set()
        return fired


class NullDAQ:
    def __init__(self) -> None:
        self.values: dict[str, float] = {f"Z:SIM{i:03d}": float(i) for i in range(100)}
        self.tickers: dict[float, _Ticker] = {}

    def _reply(self, index: int, drf: str) -> bytes:
        reply = DAQ_pb2.ReadingReply(index=index)
        reading = reply.readings.reading.add()
        reading.timestamp.FromNanoseconds(time.time_ns())
        reading.data.scalar = self.values.get(_device(drf), 0.0)
        return reply.SerializeToString()

    async def Read(self, request, context):
        drfs = list(request.drf)
        if all(_oneshot(d) for d in drfs):
            for i, drf in enumerate(drfs):
                yield self._reply(i, drf)
            return
        # A stream: its DRFs grouped by period, each period's ticker shared with every stream.
        slots: dict[float, list[tuple[bytes, str]]] = {}
        for i, drf in enumerate(drfs):
            slots.setdefault(_period(drf), []).append((DAQ_pb2.ReadingReply(index=i).SerializeToString(), _device(drf)))
        stream = _Stream()
        tickers = [self._join(period, stream) for period in slots]
        try:
            while True:
                for ticker in await stream.wait():
                    for prefix, device in slots[ticker.period]:
                        yield prefix + ticker.body(device)
        finally:
            for ticker in tickers:
                ticker.streams.discard(stream)

    def _join(self, period: float, stream: _Stream) -> _Ticker:
        ticker = self.tickers.get(period)
        if ticker is None or ticker.task is None or ticker.task.done():
            ticker = self.tickers[period] = _Ticker(period, self.values)
        ticker.streams.add(stream)
        if ticker.task is None:
            ticker.task = asyncio.get_running_loop().create_task(ticker.run())
        return ticker

    async def Set(self, request, context):
        reply = DAQ_pb2.SettingReply()
        for setting in request.setting:
            if setting.value.WhichOneof("value") == "scalar":
                self.values[_device(setting.device)] = setting.value.scalar
            reply.status.add()
        return reply


async def start(port: int = 0, host: str = "127.0.0.1") -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    daq = NullDAQ()
    handler = grpc.method_handlers_generic_handler(
        "services.daq.DAQ",
        {
            # Read replies are bytes already (serialized once per device and tick).
            "Read": grpc.unary_stream_rpc_method_handler(daq.Read, request_deserializer=DAQ_pb2.ReadingList.FromString),
            "Set": grpc.unary_unary_rpc_method_handler(
                daq.Set,
                request_deserializer=DAQ_pb2.SettingList.FromString,
                response_serializer=DAQ_pb2.SettingReply.SerializeToString,
            ),
        },
    )
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    return server, bound


class NullServer:
    """The null server on its own event loop in a daemon thread."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1"):
        self._address = (port, host)
        self.port = 0
        self._loop = new_event_loop()  # the same loop as the front (uvloop when installed): a fair ceiling
        self._thread = threading.Thread(target=self._loop.run_forever, name="null-daq", daemon=True)
        self._server: grpc.aio.Server | None = None

    def start(self) -> NullServer:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(start(*self._address), self._loop)
        self._server, self.port = future.result(30)
        return self

    def stop(self) -> None:
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(self._server.stop(0), self._loop).result(10)
            self._server = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> NullServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


async def _main() -> None:
    server, port = await start()
    print(port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until stdin closes
    await server.stop(0)


if __name__ == "__main__":
    with asyncio.Runner(loop_factory=new_event_loop) as runner:  # uvloop when installed, as the front
        runner.run(_main())
