"""The worker process: one backend, one event loop, requests from the front over a socketpair.

Started by the pool as a fresh interpreter (`python -m workers.worker --fd N ...`), the
same clean start as multiprocessing's spawn method, with the socket inherited as a file
descriptor. It imports no gRPC server code, and nothing of this project's `pacsys`: with
the `worker_python` setting it runs under another environment's interpreter (the pacsys
release's, say), started by `command()`, and hosts that environment's backends unchanged.
It builds its backend from a `module:factory` spec (`workers.backend_spec`: the front has
rewritten any other form into that one), uses it through the public
Backend / AsyncBackend methods (`workers.hosted`), says Ready, then serves requests
concurrently. It exits when its socket closes or the front asks it to; on Linux
it also asks the kernel to kill it when the front dies, so it never outlives the front
even when its own loop is stuck.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import os
import re
import signal
import socket
import sys
from pathlib import Path
from typing import NoReturn

from workers import backend_spec
from workers import protocol as p
from workers.channel import FrameChannel
from workers.hosted import HostedBackend, Subscription
from workers.logformat import MAX_VALUE_CHARS, configure_logging

logger = logging.getLogger("pacsys.workers.worker")

EXIT_STARTUP_FAILED = 3

# Run under another interpreter with `-I` (isolated: no PYTHONPATH, no current directory on
# the path): that environment's packages come first, then this project's root (for the
# `workers` package) and the front's working directory (for module:factory specs), so a
# `pacsys` installed there is never shadowed by ours.
_BOOTSTRAP = "import sys; sys.path += sys.argv[1:3]; del sys.argv[1:3]; from workers.worker import main; main()"


def command(python: str) -> list[str]:
    """The start of the command line that runs a worker under the interpreter `python`."""
    root = str(Path(__file__).resolve().parent.parent)
    return [python, "-I", "-c", _BOOTSTRAP, root, os.getcwd()]


# The device part of a DRF the front has already checked: up to the first property,
# range, field or event mark; the qualifier (second character) becomes ':'.
_DEVICE_END = re.compile(r"[.\[{@<]")


def device_of(drf: str) -> str:
    """The canonical device name of a valid DRF (`m_outtmp.setting@p,1000` -> `M:OUTTMP`)."""
    end = _DEVICE_END.search(drf, 2)
    name = drf[: end.start()] if end else drf
    return (name[:1] + ":" + name[2:]).upper() if len(name) > 1 else name.upper()


def _describe(spec: str, backend: object) -> str:
    cls = type(backend)
    module = sys.modules.get(cls.__module__)
    where = getattr(module, "__file__", None) or "?"
    return f"{backend_spec.describe(spec)}: {cls.__module__}.{cls.__qualname__} from {where}"


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
        self._backend: HostedBackend | None = None
        self._channel: FrameChannel | None = None
        self._done: asyncio.Future[None] | None = None
        self._subs: dict[int, Subscription] = {}
        self._cancelled: set[int] = set()
        # sid -> None while its Subscribe is being set up, or the exception that ended it meanwhile
        self._starting: dict[int, BaseException | None] = {}
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
            backend = backend_spec.call_factory(self._spec)
            self._backend = HostedBackend(backend, self._threads)
            await self._backend.start()
            capabilities = p.capability_bits(self._backend.capabilities)
        except BaseException as exc:
            channel.send(p.StartupFailed(pid=os.getpid(), message=f"{type(exc).__name__}: {exc}"))
            channel.close()
            await asyncio.sleep(0)
            return EXIT_STARTUP_FAILED
        channel.send(
            p.Ready(
                pid=os.getpid(),
                capabilities=capabilities,
                backend=_describe(self._spec, backend),
                protocol=p.PROTOCOL_VERSION,
            )
        )
        await self._done
        await self._shutdown()
        return 0

    def _on_closed(self, exc: BaseException | None) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    async def _shutdown(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for sub in list(self._subs.values()):
            try:
                await sub.stop()
            except Exception:
                logger.exception("event=subscription_stop_failed")
        if self._backend is not None:
            try:
                await asyncio.wait_for(self._backend.close(), 5)
            except Exception:
                logger.exception("event=backend_close_failed")
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
            readings = await self._backend.get_many(msg.drfs, msg.timeout, msg.authorization)
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
        devices = {device_of(d) for d in drfs}
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
            settings = list(zip(msg.drfs, msg.values, strict=True))
            results = await self._backend.write_many(settings, msg.timeout, msg.authorization)
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
        sid = msg.sid
        self._starting[sid] = None
        try:
            sub = await self._backend.subscribe(
                msg.drf, msg.authorization, lambda readings: self._on_readings(sid, readings), self._ender(sid)
            )
        except Exception as exc:
            self._starting.pop(sid, None)
            self._channel.send(p.SubscriptionEnded(sid=sid, kind=type(exc).__name__, message=str(exc)))
            return
        ended = self._starting.pop(sid, None)  # the backend may end it before subscribe returns
        if sid in self._cancelled or ended is not None:
            self._cancelled.discard(sid)
            await sub.stop()
            if ended is not None:
                self._channel.send(p.SubscriptionEnded(sid=sid, kind=type(ended).__name__, message=str(ended)))
            return
        self._subs[sid] = sub

    def _on_readings(self, sid: int, readings: list) -> None:
        self._data.extend((sid, p.reading_to_wire(reading)) for reading in readings)
        if not self._data_scheduled and self._data:
            self._data_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_data)

    def _ender(self, sid: int):
        def on_end(exc: BaseException | None) -> None:
            # Readings gathered before the end go first.
            self._flush_data()
            if sid in self._starting:
                self._starting[sid] = exc
            elif self._subs.pop(sid, None) is not None and exc is not None and self._channel is not None:
                self._channel.send(p.SubscriptionEnded(sid=sid, kind=type(exc).__name__, message=str(exc)))

        return on_end

    def _flush_data(self) -> None:
        self._data_scheduled = False
        if self._data and self._channel is not None:
            self._channel.send(p.Data(items=self._data))
            self._data = []

    def _unsubscribe(self, sid: int) -> None:
        sub = self._subs.pop(sid, None)
        if sub is None:
            self._cancelled.add(sid)  # its Subscribe is still being set up
            return
        self._spawn(sub.stop())


def _new_event_loop(kind: str) -> asyncio.AbstractEventLoop:
    """uvloop for "uvloop", and for "auto" when it is installed (as `pacsys.aio._loops` chooses)."""
    if kind != "asyncio":
        try:
            import uvloop
        except ImportError:
            if kind == "uvloop":
                raise
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


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
    # The front's log format and value limit, inherited with its environment (see workers.logformat).
    configure_logging(
        args.log_level,
        os.environ.get("PACSYS_SUPERVISOR_LOG_FORMAT", "kv"),
        fields={"worker": args.slot, "pid": os.getpid()},
        max_value_chars=int(os.environ.get("PACSYS_SUPERVISOR_LOG_VALUE_CHARS", MAX_VALUE_CHARS)),
    )
    sock = socket.socket(fileno=args.fd)
    with asyncio.Runner(loop_factory=lambda: _new_event_loop(args.loop)) as runner:
        code = runner.run(Worker(sock, args.backend, args.threads).run())
    logging.shutdown()
    # Threads of a sync backend may be stuck in a call that never returns; the
    # interpreter would wait for them at exit. The work is done: leave now.
    os._exit(code)


if __name__ == "__main__":
    main()
