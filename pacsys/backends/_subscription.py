"""The sync subscription handle: a callback target or a bounded, iterable buffer."""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Iterator

from pacsys.types import Reading

logger = logging.getLogger(__name__)

DEFAULT_BUFFER_SIZE = 10_000

# What a sync backend's `subscribe` calls: with each reading, and with the error that ended it.
ReadingCallback = Callable[[Reading, "SubscriptionHandle"], None]
ErrorCallback = Callable[[Exception, "SubscriptionHandle"], None]


class SubscriptionHandle:
    """A live subscription of a sync backend.

    With a callback, each reading is passed to it as (reading, handle). Without one,
    readings are buffered (bounded: the oldest is dropped and counted when full) and
    read with `readings(timeout)`. A backend (the producer) delivers with `dispatch`,
    reports a failure with `signal_error`, and learns of `stop()` through the `on_stop` hook.
    """

    def __init__(
        self,
        drfs: list[str],
        callback: ReadingCallback | None = None,
        on_error: ErrorCallback | None = None,
        on_stop: Callable[[SubscriptionHandle], None] | None = None,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
    ):
        self.drfs = list(drfs)
        self._callback = callback
        self._on_error = on_error
        self._on_stop = on_stop
        self._buffer: collections.deque[Reading] = collections.deque(maxlen=buffer_size)
        self._cond = threading.Condition()
        self._stopped = False
        self._exc: Exception | None = None
        self.dropped = 0

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def exc(self) -> Exception | None:
        return self._exc

    def dispatch(self, reading: Reading) -> None:
        """Deliver one reading: to the callback, or into the buffer (from any thread)."""
        if self._stopped:
            return
        if self._callback is not None:
            try:
                self._callback(reading, self)
            except Exception as exc:
                self._report(exc)
            return
        with self._cond:
            if len(self._buffer) == self._buffer.maxlen:
                self.dropped += 1
            self._buffer.append(reading)
            self._cond.notify_all()

    def _report(self, exc: Exception) -> None:
        if self._on_error is None:
            logger.error("subscription %s: %s", self.drfs, exc)
            return
        try:
            self._on_error(exc, self)
        except Exception:
            logger.exception("subscription error handler failed")

    def signal_error(self, exc: Exception) -> None:
        """The backend lost this subscription: record why and end it."""
        self._exc = exc
        if self._callback is not None:
            self._report(exc)
        self.stop()

    # The pacsys release's backends call its handles' producer methods by these private
    # names; a backend written against it calls ours the same way.
    _dispatch = dispatch
    _signal_error = signal_error

    def readings(self, timeout: float | None = None) -> Iterator[tuple[Reading, SubscriptionHandle]]:
        """Yield buffered readings until stopped or until `timeout` seconds have passed in total."""
        if self._callback is not None:
            raise RuntimeError("this subscription delivers to its callback; there is nothing to iterate")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._cond:
                while not self._buffer and not self._stopped:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return
                    self._cond.wait(remaining)
                if not self._buffer:
                    if self._exc is not None:
                        raise self._exc
                    return
                reading = self._buffer.popleft()
            yield reading, self

    def stop(self) -> None:
        with self._cond:
            if self._stopped:
                return
            self._stopped = True
            self._cond.notify_all()
        if self._on_stop is not None:
            self._on_stop(self)

    def __enter__(self) -> SubscriptionHandle:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
