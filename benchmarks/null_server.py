"""The "null DAQ server": a bare grpc.aio DAQ service answering from memory (the ceiling).

No policies, no audit, no backend, no worker: Read one-shots (`@I`, `@N`) answer one reply per
DRF with the device's scalar; any other Read is a stream that sends each DRF's scalar every period
of its `@P`/`@Q` event (1 s for other events); Set stores scalars and answers success.

In-process: `with NullServer() as s: s.port` (its own loop in a thread).
Subprocess: `python -m benchmarks.null_server` prints the port and serves until stdin closes.
"""

from __future__ import annotations

import asyncio
import heapq
import sys
import threading
import time

import grpc

from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2, DAQ_pb2_grpc
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


class NullDAQ(DAQ_pb2_grpc.DAQServicer):
    def __init__(self) -> None:
        self.values: dict[str, float] = {f"Z:SIM{i:03d}": float(i) for i in range(100)}

    def _reply(self, index: int, drf: str) -> DAQ_pb2.ReadingReply:
        reply = DAQ_pb2.ReadingReply(index=index)
        reading = reply.readings.reading.add()
        reading.timestamp.FromNanoseconds(time.time_ns())
        reading.data.scalar = self.values.get(_device(drf), 0.0)
        return reply

    async def Read(self, request, context):
        drfs = list(request.drf)
        if all(_oneshot(d) for d in drfs):
            for i, drf in enumerate(drfs):
                yield self._reply(i, drf)
            return
        # A stream: each DRF on its own period, deadlines aligned to the loop clock; a DRF
        # that fell behind by whole periods skips them.
        loop = asyncio.get_running_loop()
        now = loop.time()
        heap = []
        for i, drf in enumerate(drfs):
            period = _period(drf)
            heap.append(((now // period + 1) * period, i, period))
        heapq.heapify(heap)
        while True:
            when, i, period = heap[0]
            delay = when - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            nxt = when + period
            late = loop.time() - nxt
            if late > 0:
                nxt += (late // period + 1) * period
            heapq.heapreplace(heap, (nxt, i, period))
            yield self._reply(i, drfs[i])

    async def Set(self, request, context):
        reply = DAQ_pb2.SettingReply()
        for setting in request.setting:
            if setting.value.WhichOneof("value") == "scalar":
                self.values[_device(setting.device)] = setting.value.scalar
            reply.status.add()
        return reply


async def start(port: int = 0, host: str = "127.0.0.1") -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    DAQ_pb2_grpc.add_DAQServicer_to_server(NullDAQ(), server)
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
    asyncio.run(_main())
