"""The worker process: one backend, one event loop, requests from the front over a socketpair.

Started by the pool as a fresh interpreter (`python -m workers.worker --fd N ...`), the
same clean start as multiprocessing's spawn method, with the socket inherited as a file
descriptor. It imports no gRPC server code. It builds its backend from the spec (a sync
backend goes through pacsys's one adapter and its thread pool), says Ready, then serves
requests concurrently. It exits when its socket closes or the front asks it to; on Linux
it also asks the kernel to kill it when the front dies, so it never outlives the front
even when its own loop is stuck.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import os
import signal
import socket
from typing import NoReturn

from pacsys._logging import MAX_VALUE_CHARS, configure_logging
from pacsys.aio import AsyncBackend, AsyncSubscriptionHandle, as_async, caller_authorization
from pacsys.aio._loops import new_event_loop
from pacsys.backends.spec import build_backend, describe_spec
from pacsys.drf_utils import get_device_name
from workers import protocol as p
from workers.channel import FrameChannel

logger = logging.getLogger("pacsys.workers.worker")

EXIT_STARTUP_FAILED = 3


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: the closed socket still ends the worker


class Worker:
    def __init__(self, sock: socket.socket, spec: str, threads: int):
        self._sock = sock
        self._spec = spec
        self._threads = threads
        self._backend: AsyncBackend | None = None
        self._channel: FrameChannel | None = None
        self._done: asyncio.Future[None] | None = None
        self._subs: dict[int, AsyncSubscriptionHandle] = {}
        self._pumps: dict[int, asyncio.Task] = {}
        self._cancelled: set[int] = set()
        self._tasks: set[asyncio.Task] = set()
        self._write_tails: dict[str, asyncio.Future] = {}
        self._data: list[tuple[int, p.WireReading]] = []
        self._data_scheduled = False
        self._in_flight = 0

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        _, channel = await loop.create_unix_connection(
            lambda: FrameChannel(p.ToWorker, self._on_message, self._on_closed), sock=self._sock
        )
        self._channel = channel
        try:
            backend = build_backend(self._spec)
            self._backend = as_async(backend, max_threads=self._threads)
            start = getattr(self._backend, "start", None)
            if start is not None and asyncio.iscoroutinefunction(start):
                await start()
        except BaseException as exc:
            channel.send(p.StartupFailed(pid=os.getpid(), message=f"{type(exc).__name__}: {exc}"))
            channel.close()
            await asyncio.sleep(0)
            return EXIT_STARTUP_FAILED
        channel.send(
            p.Ready(pid=os.getpid(), capabilities=self._backend.capabilities.value, backend=describe_spec(self._spec))
        )
        await self._done
        await self._shutdown()
        return 0

    def _on_closed(self, exc: BaseException | None) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    async def _shutdown(self) -> None:
        for task in list(self._tasks) + list(self._pumps.values()):
            task.cancel()
        for handle in list(self._subs.values()):
            await handle.stop()
        if self._backend is not None:
            try:
                await asyncio.wait_for(self._backend.close(), 5)
            except Exception:
                logger.exception("backend close failed")
        if self._channel is not None:
            self._channel.close()

    # -- requests ------------------------------------------------------------------------

    def _on_message(self, msg: object) -> None:
        if isinstance(msg, p.Ping):
            assert self._channel is not None
            self._channel.send(p.Pong(seq=msg.seq, in_flight=self._in_flight, subscriptions=len(self._subs)))
        elif isinstance(msg, p.Read):
            self._spawn(self._read(msg))
        elif isinstance(msg, p.Write):
            self._spawn(self._write(msg, self._queue_behind_earlier_writes(msg.drfs)))
        elif isinstance(msg, p.Subscribe):
            self._spawn(self._subscribe(msg))
        elif isinstance(msg, p.Unsubscribe):
            self._unsubscribe(msg.sid)
        elif isinstance(msg, p.Shutdown):
            self._on_closed(None)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _fail(self, request_id: int, exc: BaseException) -> None:
        assert self._channel is not None
        self._channel.send(p.Failed(id=request_id, kind=type(exc).__name__, message=str(exc)))

    async def _read(self, msg: p.Read) -> None:
        assert self._backend is not None and self._channel is not None
        self._in_flight += 1
        try:
            caller_authorization.set(msg.authorization)
            readings = await self._backend.get_many(msg.drfs, timeout=msg.timeout)
            self._channel.send(p.ReadDone(id=msg.id, readings=[p.reading_to_wire(r) for r in readings]))
        except Exception as exc:
            self._fail(msg.id, exc)
        finally:
            self._in_flight -= 1

    def _queue_behind_earlier_writes(self, drfs: list[str]) -> tuple[list[asyncio.Future], asyncio.Future]:
        """Per-device write order: this write waits for every earlier write to any of its devices.

        Called synchronously on arrival, so queue order is arrival order.
        """
        done = asyncio.get_running_loop().create_future()
        devices = {get_device_name(d) for d in drfs}
        earlier = [self._write_tails[d] for d in devices if d in self._write_tails]
        for device in devices:
            self._write_tails[device] = done
        return earlier, done

    async def _write(self, msg: p.Write, queue: tuple[list[asyncio.Future], asyncio.Future]) -> None:
        assert self._backend is not None and self._channel is not None
        earlier, done = queue
        self._in_flight += 1
        try:
            for future in earlier:
                await future
            caller_authorization.set(msg.authorization)
            settings = list(zip(msg.drfs, msg.values, strict=True))
            results = await self._backend.write_many(settings, timeout=msg.timeout)
            wire = [p.WireResult(facility=r.facility_code, error=r.error_code, message=r.message) for r in results]
            self._channel.send(p.WriteDone(id=msg.id, results=wire))
        except Exception as exc:
            self._fail(msg.id, exc)
        finally:
            self._in_flight -= 1
            done.set_result(None)
            for device, tail in list(self._write_tails.items()):
                if tail is done:
                    del self._write_tails[device]

    # -- subscriptions -------------------------------------------------------------------

    async def _subscribe(self, msg: p.Subscribe) -> None:
        assert self._backend is not None and self._channel is not None
        try:
            caller_authorization.set(msg.authorization)
            handle = await self._backend.subscribe([msg.drf])
        except Exception as exc:
            self._channel.send(p.SubscriptionEnded(sid=msg.sid, kind=type(exc).__name__, message=str(exc)))
            return
        if msg.sid in self._cancelled:
            self._cancelled.discard(msg.sid)
            await handle.stop()
            return
        self._subs[msg.sid] = handle
        self._pumps[msg.sid] = asyncio.get_running_loop().create_task(self._pump(msg.sid, handle))

    async def _pump(self, sid: int, handle: AsyncSubscriptionHandle) -> None:
        assert self._channel is not None
        while True:
            await handle.wait()
            for reading in handle.drain():
                self._data.append((sid, p.reading_to_wire(reading)))
            if not self._data_scheduled and self._data:
                self._data_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush_data)
            if handle.stopped and not len(handle):
                if handle.exc is not None and sid in self._subs:
                    exc = handle.exc
                    self._channel.send(p.SubscriptionEnded(sid=sid, kind=type(exc).__name__, message=str(exc)))
                self._subs.pop(sid, None)
                self._pumps.pop(sid, None)
                return

    def _flush_data(self) -> None:
        self._data_scheduled = False
        if self._data and self._channel is not None:
            self._channel.send(p.Data(items=self._data))
            self._data = []

    def _unsubscribe(self, sid: int) -> None:
        handle = self._subs.pop(sid, None)
        if handle is None:
            self._cancelled.add(sid)  # its Subscribe is still being set up
            return
        pump = self._pumps.pop(sid, None)
        if pump is not None:
            pump.cancel()
        self._spawn(handle.stop())


def main(argv: list[str] | None = None) -> NoReturn:
    parser = argparse.ArgumentParser(prog="pacsys-worker")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--backend", required=True)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--slot", type=int, default=0)
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument("--loop", default="auto", choices=("auto", "uvloop", "asyncio"))
    args = parser.parse_args(argv)
    _die_with_parent()
    for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGTTIN, signal.SIGTTOU):
        signal.signal(signum, signal.SIG_IGN)  # meant for the front, which decides what workers do
    # The front's log format and value limit, inherited with its environment (see pacsys._logging).
    configure_logging(
        args.log_level,
        os.environ.get("PACSYS_SUPERVISOR_LOG_FORMAT", "kv"),
        fields={"worker": args.slot, "pid": os.getpid()},
        max_value_chars=int(os.environ.get("PACSYS_SUPERVISOR_LOG_VALUE_CHARS", MAX_VALUE_CHARS)),
    )
    sock = socket.socket(fileno=args.fd)
    with asyncio.Runner(loop_factory=lambda: new_event_loop(args.loop)) as runner:
        code = runner.run(Worker(sock, args.backend, args.threads).run())
    logging.shutdown()
    # Threads of a sync backend may be stuck in a call that never returns; the
    # interpreter would wait for them at exit. The work is done: leave now.
    os._exit(code)


if __name__ == "__main__":
    main()
