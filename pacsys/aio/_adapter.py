"""The one place where sync and async meet (architecture idea 2).

`as_async(backend)` returns an AsyncBackend for either kind: an AsyncBackend as it is,
a sync Backend wrapped in `SyncBackendAdapter`, which runs its calls in a thread pool of
its own (sized for the backend, not shared with asyncio's default executor) and hands
subscription callbacks to the loop through the handle's thread-safe `dispatch`.
"""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pacsys.aio._backends import AsyncBackend
from pacsys.aio._subscription import AsyncSubscriptionHandle
from pacsys.backends import Backend
from pacsys.types import BackendCapability, Reading, Value, WriteResult

DEFAULT_THREADS = 16


class SyncBackendAdapter(AsyncBackend):
    def __init__(self, backend: Backend, max_threads: int = DEFAULT_THREADS):
        self.backend = backend
        self.max_threads = max_threads
        self._executor = ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="pacsys-backend")
        self._in_flight = 0

    @property
    def capabilities(self) -> BackendCapability:
        return self.backend.capabilities

    @property
    def in_flight(self) -> int:
        """Calls submitted to the thread pool and not yet finished (saturation shows here)."""
        return self._in_flight

    async def _run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        self._in_flight += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))
        finally:
            self._in_flight -= 1

    async def get_many(self, drfs: list[str], timeout: float | None = None) -> list[Reading]:
        return await self._run(self.backend.get_many, drfs, timeout=timeout)

    async def write_many(self, settings: list[tuple[str, Value]], timeout: float | None = None) -> list[WriteResult]:
        return await self._run(self.backend.write_many, settings, timeout=timeout)

    async def subscribe(self, drfs: list[str], callback: Any = None, on_error: Any = None) -> AsyncSubscriptionHandle:
        sync_handle = None

        async def remove(_handle: AsyncSubscriptionHandle) -> None:
            if sync_handle is not None:
                await self._run(self.backend.remove, sync_handle)

        handle = AsyncSubscriptionHandle(remover=remove)
        sync_handle = await self._run(
            self.backend.subscribe,
            list(drfs),
            callback=lambda reading, _h: handle.dispatch(reading),
            on_error=lambda exc, _h: handle.signal_error(exc),
        )
        return handle

    async def stop_streaming(self) -> None:
        await self._run(self.backend.stop_streaming)

    async def close(self) -> None:
        # Not in our own pool: its threads may all be stuck in calls that never return.
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.backend.close)
        finally:
            self.release_threads()

    def release_threads(self) -> None:
        """Stop the thread pool without closing the backend (its owner may still use it).

        Threads stuck in a blocked backend call must not hold up shutdown: not waited for.
        """
        self._executor.shutdown(wait=False, cancel_futures=True)


def as_async(backend: Backend | AsyncBackend, max_threads: int = DEFAULT_THREADS) -> AsyncBackend:
    """Present any backend as an AsyncBackend; TypeError for anything that is neither."""
    if isinstance(backend, AsyncBackend):
        return backend
    if isinstance(backend, Backend):
        return SyncBackendAdapter(backend, max_threads=max_threads)
    raise TypeError(
        f"backend must be a pacsys.backends.Backend or a pacsys.aio.AsyncBackend instance, got {type(backend).__name__}"
    )
