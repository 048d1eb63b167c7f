"""Backends for fault-injection tests, loaded in worker processes as `fault_backends:NAME`."""

import asyncio
import logging
import os
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from pacsys.aio import AsyncBackend, AsyncSubscriptionHandle
from pacsys.backends import Backend
from pacsys.drf import DRFError
from pacsys.drf_utils import get_device_name
from pacsys.errors import AuthenticationError, BackendUnavailable, LimitExceeded, PolicyDenied
from pacsys.types import BackendCapability, Reading, ValueType, WriteResult


class Scripted(AsyncBackend):
    """Answers every device with a scalar; some device names misbehave on purpose.

    Z:PID reads as this process's pid; Z:HANG blocks the event loop; Z:SLOW takes 30 s
    to write; Z:CRASH ends the process.
    """

    @property
    def capabilities(self):
        return BackendCapability.READ | BackendCapability.WRITE | BackendCapability.STREAM

    async def get_many(self, drfs, timeout=None):
        out = []
        for drf in drfs:
            name = get_device_name(drf)
            if name == "Z:HANG":
                time.sleep(3600)  # blocks the loop: only the hang detector can help
            if name == "Z:CRASH":
                os._exit(13)
            value = float(os.getpid()) if name == "Z:PID" else 1.0
            out.append(Reading(drf=drf, value_type=ValueType.SCALAR, value=value, timestamp=datetime.now(UTC)))
        return out

    async def subscribe(self, drfs, callback=None, on_error=None):
        """Every DRF ticks every 100 ms; Z:BADSUB cannot be subscribed."""
        if any(get_device_name(d) == "Z:BADSUB" for d in drfs):
            raise ValueError("Z:BADSUB cannot be subscribed")
        task = None

        async def remove(_handle):
            task.cancel()

        handle = AsyncSubscriptionHandle(remover=remove)

        async def tick():
            n = 0
            while True:
                n += 1
                now = datetime.now(UTC)
                handle.dispatch_many(
                    Reading(drf=d, value_type=ValueType.SCALAR, value=float(n), timestamp=now) for d in drfs
                )
                await asyncio.sleep(0.1)

        task = asyncio.get_running_loop().create_task(tick())
        return handle

    async def write_many(self, settings, timeout=None):
        if any(get_device_name(d) == "Z:SLOW" for d, _ in settings):
            await asyncio.sleep(30)
        return [WriteResult(drf=d) for d, _ in settings]

    async def close(self):
        pass


def scripted():
    return Scripted()


def noisy():
    """Scripted, after a warning that quotes a hostile text (the worker's log line must stay one line)."""
    logging.getLogger("fault_backends").warning("built for %s", 'x" level=ERROR\nforged=1')
    return Scripted()


def broken():
    raise RuntimeError("the backend cannot reach its hardware")


def broken_when_flagged():
    """Fails to start in slot 1 while the file named by $FAULT_FLAG exists."""
    flag = os.environ.get("FAULT_FLAG")
    if flag and Path(flag).exists() and os.environ.get("PACSYS_WORKER_SLOT") == "1":
        raise RuntimeError("slot 1 is cursed")
    return Scripted()


def broken_everywhere_when_flagged():
    """Fails to start in every slot while the file named by $FAULT_FLAG exists."""
    flag = os.environ.get("FAULT_FLAG")
    if flag and Path(flag).exists():
        raise RuntimeError("the hardware is unreachable")
    return Scripted()


class BlockingSync(Backend):
    """A sync backend whose reads of Z:BLOCK never return (they hold a thread each)."""

    @property
    def capabilities(self):
        return BackendCapability.READ

    def get_many(self, drfs, timeout=None):
        if any(get_device_name(d) == "Z:BLOCK" for d in drfs):
            threading.Event().wait()
        now = datetime.now(UTC)
        return [Reading(drf=d, value_type=ValueType.SCALAR, value=1.0, timestamp=now) for d in drfs]

    def close(self):
        pass


def blocking_sync():
    return BlockingSync()


class Raising(AsyncBackend):
    """Raises, for a read of a device named below, the exception of each row of the error table."""

    ERRORS = {
        "Z:NOTIMPL": NotImplementedError("not here"),
        "Z:AUTH": AuthenticationError("who are you"),
        "Z:DENIED": PolicyDenied("not you"),
        "Z:BUSY": BackendUnavailable("nobody home"),
        "Z:LIMIT": LimitExceeded("too much"),
        "Z:LATE": TimeoutError("too late"),
        "Z:BADARG": ValueError("bad argument"),
        "Z:DRFERR": DRFError("Z:DRFERR", "bad DRF"),
        "Z:BUG": RuntimeError("a bug"),
    }

    @property
    def capabilities(self):
        return BackendCapability.READ

    async def get_many(self, drfs, timeout=None):
        for drf in drfs:
            error = self.ERRORS.get(get_device_name(drf))
            if error is not None:
                raise error
        return [Reading(drf=d, value_type=ValueType.SCALAR, value=1.0) for d in drfs]

    async def close(self):
        pass


def raising():
    return Raising()
