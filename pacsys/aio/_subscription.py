"""The async subscription handle: a bounded buffer that any thread may feed.

The producer API, for backends (from the loop or from any other thread: a sync backend's
receiver thread, a test's emitter):

- `dispatch(reading)` / `dispatch_many(readings)`: deliver readings, in order;
- `dispatch_on_loop(reading)`: the same for a producer already on the handle's loop
  (the worker pool's hot path: no thread check);
- `signal_error(exc)`: end the subscription with an error, seen after the buffered readings;
- `signal_stop()`: end it normally (the backend's subscription is over).

The consumer iterates `readings()` on the loop and is woken at once, with no polling. When
the consumer falls behind, the oldest readings are dropped and counted in `dropped`: a slow
reader loses its own data, it never blocks the producer.

A handle carries Readings. One made for a consumer that only forwards the bytes (the
servicer's streams on a worker pool, `AsyncBackend.subscribe_bodies`) carries each reading as
the pair (DRF, DAQ reply body) instead, which its consumer takes with `drain()`.

A consumer that bounds what its readings may cost meters the handle (`meter(cost)`):
`queued_bytes` then counts each reading's cost from the moment it is buffered until it is
dropped, or taken and written (`drain`, then `sent`).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import cast

from pacsys.types import Reading

DEFAULT_BUFFER_SIZE = 10_000

#: What a handle carries: a Reading, or (DRF, DAQ reply body) on a stream of encoded readings.
Item = Reading | tuple[str, bytes]


class AsyncSubscriptionHandle:
    def __init__(
        self,
        remover: Callable[[AsyncSubscriptionHandle], Awaitable[None]] | None = None,
        maxsize: int = DEFAULT_BUFFER_SIZE,
    ):
        self._remover = remover
        self._buffer: collections.deque[Item] = collections.deque(maxlen=maxsize)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        try:
            self._bind(asyncio.get_running_loop())
        except RuntimeError:
            pass  # created outside a loop: bound when first awaited
        self._waiter: asyncio.Future[None] | None = None
        self._stopped = False
        self._stop_started = False
        self._exc: BaseException | None = None
        self.dropped = 0
        self.delivered = 0
        self._cost: Callable[[Item], int] | None = None  # set by `meter`
        self._buffered_bytes = 0  # the cost of the buffered readings
        self._taken_bytes = 0  # the cost of the last batch drained, until `sent`

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._loop_thread = threading.get_ident()

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def exc(self) -> BaseException | None:
        return self._exc

    def __len__(self) -> int:
        return len(self._buffer)

    @property
    def queued_bytes(self) -> int:
        """The cost of the readings buffered and of the batch taken but not yet `sent` (0 unmetered)."""
        return self._buffered_bytes + self._taken_bytes

    def meter(self, cost: Callable[[Item], int]) -> None:
        """Count `cost(reading)` in `queued_bytes` for each reading from now on (and those buffered)."""
        self._cost = cost
        self._buffered_bytes = sum(map(cost, self._buffer))

    # -- producer side ---------------------------------------------------------------

    def _on_loop(self) -> bool:
        return self._loop is None or threading.get_ident() == self._loop_thread

    def _call(self, fn: Callable, *args) -> None:
        """Run fn on the handle's loop: directly when already there, else thread-safely."""
        if self._on_loop():
            fn(*args)
            return
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass  # the loop is closed: nobody is left to read

    def dispatch(self, reading: Item) -> None:
        """Deliver one reading (from any thread)."""
        self._call(self._put, (reading,))

    def dispatch_many(self, readings: Iterable[Item]) -> None:
        """Deliver readings in order, with at most one wake-up of the consumer (from any thread)."""
        self._call(self._put, tuple(readings))

    def signal_error(self, exc: BaseException) -> None:
        """End the subscription with an error; the consumer sees it after the buffered readings."""
        self._call(self._end, exc)

    def signal_stop(self) -> None:
        """End the subscription normally; the consumer reads what is buffered, then stops."""
        self._call(self._end, None)

    def dispatch_on_loop(self, reading: Item) -> None:
        """`dispatch` for a producer on the handle's own loop (the pool's hot path): no thread check."""
        if self._stopped:
            return
        buffer = self._buffer
        cost = self._cost
        if len(buffer) == buffer.maxlen:
            self.dropped += 1  # the deque drops the oldest on append
            if cost is not None:
                self._buffered_bytes -= cost(buffer[0])
        buffer.append(reading)
        if cost is not None:
            self._buffered_bytes += cost(reading)
        self._wake()

    # The pacsys release's backends call its handles' producer methods by these private
    # names; a backend written against it calls ours the same way.
    _dispatch = dispatch
    _signal_error = signal_error
    _signal_stop = signal_stop

    def _put(self, readings: tuple[Item, ...]) -> None:
        if self._stopped:
            return
        buffer = self._buffer
        cost = self._cost
        overflow = len(buffer) + len(readings) - (buffer.maxlen or 0)
        if overflow > 0:
            self.dropped += overflow  # the deque drops the oldest on extend
        if cost is not None:
            # Dropped: the oldest buffered, then (more arriving than the buffer holds) the first new.
            lost = max(overflow, 0)
            old_lost = min(lost, len(buffer))
            self._buffered_bytes += sum(map(cost, readings[lost - old_lost :])) - sum(
                map(cost, itertools.islice(buffer, old_lost))
            )
        buffer.extend(readings)
        self._wake()

    def _end(self, exc: BaseException | None) -> None:
        if self._stopped:
            return
        self._stopped = True
        if exc is not None and self._exc is None:
            self._exc = exc
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- consumer side ---------------------------------------------------------------

    async def readings(self, timeout: float | None = None) -> AsyncIterator[tuple[Reading, AsyncSubscriptionHandle]]:
        """Yield (reading, handle) until the subscription stops, or for `timeout` seconds in total.

        A subscription that ended with an error raises it once its buffer is drained.
        """
        if self._loop is None:
            self._bind(asyncio.get_running_loop())
        loop = self._loop
        assert loop is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            while self._buffer:
                reading = cast(Reading, self._buffer.popleft())  # a handle of Readings is iterated
                self.delivered += 1
                if self._cost is not None:
                    self._buffered_bytes -= self._cost(reading)
                yield reading, self
            if self._stopped:
                if self._exc is not None:
                    raise self._exc
                return
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return
            self._waiter = loop.create_future()
            try:
                if remaining is None:
                    await self._waiter
                else:
                    await asyncio.wait_for(self._waiter, remaining)
            except TimeoutError:
                return
            finally:
                self._waiter = None

    def resize(self, maxsize: int) -> None:
        """Bound the buffer to `maxsize` readings (the consumer's limit, whoever made the handle)."""
        if maxsize != self._buffer.maxlen:
            kept = collections.deque(self._buffer, maxlen=maxsize)
            self.dropped += len(self._buffer) - len(kept)
            self._buffer = kept
            if self._cost is not None:
                self._buffered_bytes = sum(map(self._cost, kept))

    def drain(self) -> list[Item]:
        """Take every buffered reading at once (for consumers that write in batches).

        Metered, the batch's cost stays in `queued_bytes` until `sent` (or the next `drain`).
        """
        items = list(self._buffer)
        self._buffer.clear()
        self.delivered += len(items)
        self._taken_bytes = self._buffered_bytes
        self._buffered_bytes = 0
        return items

    def sent(self) -> None:
        """The batch last drained is written: its cost leaves `queued_bytes`."""
        self._taken_bytes = 0

    async def wait(self) -> None:
        """Wait until a reading is buffered or the subscription stops."""
        if self._buffer or self._stopped:
            return
        if self._loop is None:
            self._bind(asyncio.get_running_loop())
        assert self._loop is not None
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def stop(self) -> None:
        """Stop the subscription and release it at the backend (once, however often called)."""
        self._end(None)
        if self._stop_started:
            return
        self._stop_started = True
        if self._remover is not None:
            await self._remover(self)

    async def __aenter__(self) -> AsyncSubscriptionHandle:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.stop()
