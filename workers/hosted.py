"""The backend a worker hosts, used only through the public Backend / AsyncBackend methods.

A worker may run under another interpreter, with another `pacsys` (the release's), so this
module imports none: it calls `get_many`, `write_many`, `subscribe`, `close` and reads
`capabilities`, and reads readings and write results through their attributes.

A sync backend's calls run in a thread pool of their own (the loop never blocks); its
subscription callbacks, called on the backend's threads, are handed to the loop in batches,
one wake-up per batch. An async backend is awaited on the loop, and its subscriptions are
read with the public `readings()` iterator.

The caller's authorization header is handed to a backend that asks for it the way this
project's backends do: a `caller_authorization` context variable in `pacsys.aio`, looked up
in the modules the backend itself imported (nothing is imported for it).
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

__all__ = ["HostedBackend"]

OnReading = Callable[[object], None]
OnEnd = Callable[[BaseException | None], None]


class _ThreadFeed:
    """Items put from any thread, delivered on the loop in batches (one wake-up per batch)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, deliver: Callable[[list], None]):
        self._loop = loop
        self._deliver = deliver
        self._lock = threading.Lock()
        self._items: list = []
        self._scheduled = False

    def put(self, item: object) -> None:
        with self._lock:
            self._items.append(item)
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._run)
        except RuntimeError:
            pass  # the loop is closed: the worker is exiting

    def _run(self) -> None:
        with self._lock:
            items, self._items = self._items, []
            self._scheduled = False
        self._deliver(items)


class Subscription:
    """One backend subscription; `stop()` ends it at the backend."""

    def __init__(self, stop: Callable[[], Any]):
        self._stop = stop
        self._stopped = False

    async def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            await self._stop()


class HostedBackend:
    def __init__(self, backend: Any, threads: int):
        self.backend = backend
        self.is_async = inspect.iscoroutinefunction(getattr(backend, "get_many", None))
        self._executor = None if self.is_async else ThreadPoolExecutor(threads, thread_name_prefix="backend")
        aio = sys.modules.get("pacsys.aio")
        self._authorization: contextvars.ContextVar | None = getattr(aio, "caller_authorization", None)

    @property
    def capabilities(self) -> object:
        return self.backend.capabilities

    async def _run(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        """A sync backend call in the pool, in the caller's context (its authorization included)."""
        context = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, lambda: context.run(fn, *args, **kwargs)
        )

    def _authorize(self, authorization: str | None) -> None:
        if self._authorization is not None:
            self._authorization.set(authorization)

    async def start(self) -> None:
        start = getattr(self.backend, "start", None)
        if start is not None and inspect.iscoroutinefunction(start):
            await start()

    async def get_many(self, drfs: list[str], timeout: float | None, authorization: str | None) -> list:
        self._authorize(authorization)
        if self.is_async:
            return await self.backend.get_many(drfs, timeout=timeout)
        return await self._run(self.backend.get_many, drfs, timeout=timeout)

    async def write_many(
        self, settings: list[tuple[str, object]], timeout: float | None, authorization: str | None
    ) -> list:
        self._authorize(authorization)
        if self.is_async:
            return await self.backend.write_many(settings, timeout=timeout)
        return await self._run(self.backend.write_many, settings, timeout=timeout)

    async def subscribe(
        self, drf: str, authorization: str | None, on_readings: Callable[[list], None], on_end: OnEnd
    ) -> Subscription:
        """Subscribe to `drf`; readings go to `on_readings` in batches, on the loop; `on_end(exc)` once it ends."""
        self._authorize(authorization)
        if self.is_async:
            return await self._subscribe_async(drf, on_readings, on_end)
        return await self._subscribe_sync(drf, on_readings, on_end)

    async def _subscribe_async(self, drf: str, on_readings: Callable[[list], None], on_end: OnEnd) -> Subscription:
        handle = await self.backend.subscribe([drf])

        async def pump() -> None:
            try:
                async for reading, _handle in handle.readings():
                    on_readings([reading])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                on_end(exc)
                return
            on_end(getattr(handle, "exc", None))

        task = asyncio.get_running_loop().create_task(pump())

        async def stop() -> None:
            task.cancel()
            await handle.stop()

        return Subscription(stop)

    async def _subscribe_sync(self, drf: str, on_readings: Callable[[list], None], on_end: OnEnd) -> Subscription:
        ended = object()  # marks the error, in order with the readings before it

        def deliver(items: list) -> None:
            readings = [item for item in items if not (isinstance(item, tuple) and item[0] is ended)]
            if readings:
                on_readings(readings)
            for item in items:
                if isinstance(item, tuple) and item[0] is ended:
                    on_end(item[1])
                    return

        feed = _ThreadFeed(asyncio.get_running_loop(), deliver)
        handle = await self._run(
            self.backend.subscribe,
            [drf],
            callback=lambda reading, _handle: feed.put(reading),
            on_error=lambda exc, _handle: feed.put((ended, exc)),
        )

        async def stop() -> None:
            await self._run(handle.stop)

        return Subscription(stop)

    async def close(self) -> None:
        try:
            if self.is_async:
                await self.backend.close()
            else:
                # Not in our own pool: its threads may all be stuck in calls that never return.
                await asyncio.get_running_loop().run_in_executor(None, self.backend.close)
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)
