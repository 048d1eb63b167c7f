"""The sync subscription handles: a bounded buffer a producer fills and a consumer iterates.

`BufferedSubscriptionHandle` is the buffer alone, with the producer side a backend builds
its own handle on: `dispatch`, `signal_stop` and `signal_error`, also callable as
`_dispatch`, `_signal_stop` and `_signal_error` (the names the pacsys release's backends
use, so that a handle written for the release works here unchanged). `SubscriptionHandle`
is what a backend's `subscribe` returns: it delivers to a callback instead when given one,
reports errors to `on_error`, and tells its backend when it ends (`on_stop`).
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

from pacsys.types import Reading

logger = logging.getLogger(__name__)

DEFAULT_BUFFER_SIZE = 10_000
DROP_LOG_INTERVAL = 5.0  # seconds: at most one log line per handle about its full buffer

# What a sync backend's `subscribe` calls: with each reading, and with the error that ended it.
ReadingCallback = Callable[[Reading, "SubscriptionHandle"], None]
ErrorCallback = Callable[[Exception, "SubscriptionHandle"], None]


def summarize_drfs(drfs: Sequence[str], limit: int = 5) -> str:
    """A short list of DRFs for log lines: the first few and a count of the rest."""
    if len(drfs) <= limit:
        return ", ".join(drfs)
    return f"{', '.join(drfs[:limit])} and {len(drfs) - limit} more"


class BufferedSubscriptionHandle:
    """A subscription's readings, buffered for `readings(timeout)`; the reader is woken at once.

    The buffer holds `_maxsize` readings. When it is full, new readings are dropped (those
    buffered keep their order), counted in `dropped`, and a WARNING says so at most every
    `DROP_LOG_INTERVAL` seconds. `signal_stop()` ends the subscription, `signal_error(exc)`
    ends it with an error (the first one is kept); either way the reader gets the readings
    buffered before the end, then `readings()` returns or raises the error.

    A backend's own handle may subclass it, call `__init__()` and set `_drfs`, `_ref_ids`,
    `_maxsize` or `_is_callback_mode` afterwards, and override `stop()`, as the release's
    backends do.
    """

    _is_callback_mode = False  # set by a handle that delivers to a callback: nothing to iterate

    def __init__(self, drfs: Iterable[str] = (), maxsize: int = DEFAULT_BUFFER_SIZE) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._buffer: collections.deque[Reading] = collections.deque()
        self._maxsize = maxsize
        self._drfs = list(drfs)
        self._ref_ids = list(range(len(self._drfs)))
        self._stopped = False
        self._exc: Exception | None = None
        self._drop_count = 0
        self._drops_not_logged = 0
        self._drop_logged_at = -math.inf
        self._wakers: tuple[Callable[[], None], ...] = ()

    @property
    def drfs(self) -> list[str]:
        return list(self._drfs)

    @property
    def ref_ids(self) -> list[int]:
        """One id per DRF of the subscription (its position), as a copy."""
        return list(self._ref_ids)

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def exc(self) -> Exception | None:
        return self._exc

    @property
    def dropped(self) -> int:
        """Readings dropped because the buffer was full (or dropped by a callback dispatcher)."""
        return self._drop_count

    def add_waker(self, wake: Callable[[], None]) -> None:
        """Have `wake()` called after each change a reader may wait for: a reading, the end."""
        self._wakers = (*self._wakers, wake)

    def remove_waker(self, wake: Callable[[], None]) -> None:
        self._wakers = tuple(w for w in self._wakers if w != wake)

    def _wake(self) -> None:
        for wake in self._wakers:
            wake()

    # -- producer side ------------------------------------------------------------------

    def dispatch(self, reading: Reading) -> None:
        """Buffer one reading (from any thread); dropped when stopped or when the buffer is full."""
        with self._cond:
            if self._stopped:
                return
            if len(self._buffer) < self._maxsize:
                self._buffer.append(reading)
                self._cond.notify()
                to_log = 0
            else:
                self._drop_count += 1
                self._drops_not_logged += 1
                to_log = self._drops_to_log()
        if to_log:
            logger.warning(
                "event=subscription_buffer_full size=%d dropped=%d drfs=%s",
                self._maxsize,
                to_log,
                summarize_drfs(self._drfs),
            )
        else:
            self._wake()

    def _drops_to_log(self) -> int:
        """The drops not logged yet when a log line is due now, else 0. Holds the lock."""
        now = time.monotonic()
        if now - self._drop_logged_at < DROP_LOG_INTERVAL:
            return 0
        count, self._drops_not_logged, self._drop_logged_at = self._drops_not_logged, 0, now
        return count

    def signal_stop(self) -> bool:
        """End the subscription normally; True for the call that ended it."""
        with self._cond:
            if self._stopped:
                return False
            self._stopped = True
            self._cond.notify_all()
        self._wake()
        return True

    def signal_error(self, exc: Exception) -> bool:
        """End the subscription with `exc` (an error already kept stays); True for the call that ended it."""
        with self._cond:
            if self._exc is None:
                self._exc = exc
            ended = not self._stopped
            self._stopped = True
            self._cond.notify_all()
        self._wake()
        return ended

    def _note_dispatch_drop(self) -> None:
        """Count a reading a callback dispatcher had to drop for this handle."""
        with self._cond:
            self._drop_count += 1

    # The pacsys release's names for the producer side. Methods rather than aliases, so that
    # a subclass's override of either name is the one that runs.
    def _dispatch(self, reading: Reading) -> None:
        self.dispatch(reading)

    def _signal_stop(self) -> None:
        self.signal_stop()

    def _signal_error(self, exc: Exception) -> None:
        self.signal_error(exc)

    # -- consumer side ------------------------------------------------------------------

    def readings(self, timeout: float | None = None) -> Iterator[tuple[Reading, BufferedSubscriptionHandle]]:
        """Yield (reading, handle) until the subscription ends, or for `timeout` seconds in total.

        `timeout=0` yields what is buffered now. After the end, the buffered readings come
        first; then the error that ended the subscription, if any, is raised.
        """
        if self._is_callback_mode:
            raise RuntimeError("this subscription delivers to its callback; there is nothing to iterate")
        if timeout is not None and timeout <= 0:
            yield from self._drain()
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._cond:
                while not self._buffer and not self._stopped:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return
                    self._cond.wait(remaining)
                if deadline is not None and time.monotonic() >= deadline and self._exc is None:
                    return  # a steady stream must not hold the reader past its timeout
                if self._buffer:
                    reading = self._buffer.popleft()
                elif self._exc is not None:
                    raise self._exc
                else:
                    return
            yield reading, self

    def _drain(self) -> Iterator[tuple[Reading, BufferedSubscriptionHandle]]:
        with self._cond:
            count = len(self._buffer)  # only those here now: a fast producer cannot keep us here
        for _ in range(count):
            with self._cond:
                if not self._buffer:
                    break
                reading = self._buffer.popleft()
            yield reading, self
        if self._exc is not None:
            raise self._exc

    def stop(self) -> None:
        self.signal_stop()

    def __enter__(self) -> BufferedSubscriptionHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class SubscriptionHandle(BufferedSubscriptionHandle):
    """A live subscription of a sync backend.

    With a callback, each reading is passed to it as (reading, handle) on the producer's
    thread; a callback that raises is reported like an error of the subscription without
    ending it. Without one, readings are buffered and read with `readings(timeout)`. The
    error that ends the subscription goes to `on_error` (without one, a callback
    subscription logs it; a buffered one raises it from `readings()`). `on_stop(handle)` is
    called once when the subscription ends, however it ends: the backend forgets it then.
    """

    def __init__(
        self,
        drfs: list[str],
        callback: ReadingCallback | None = None,
        on_error: ErrorCallback | None = None,
        on_stop: Callable[[SubscriptionHandle], None] | None = None,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
    ):
        super().__init__(drfs, buffer_size)
        self._callback = callback
        self._is_callback_mode = callback is not None
        self._on_error = on_error
        self._on_stop = on_stop

    def dispatch(self, reading: Reading) -> None:
        if self._callback is None:
            super().dispatch(reading)
            return
        if self._stopped:
            return
        try:
            self._callback(reading, self)
        except Exception as exc:
            self._report(exc)

    def signal_stop(self) -> bool:
        ended = super().signal_stop()
        if ended and self._on_stop is not None:
            self._on_stop(self)
        return ended

    def signal_error(self, exc: Exception) -> bool:
        ended = super().signal_error(exc)
        if ended:
            if self._on_stop is not None:
                self._on_stop(self)
            self._report(exc)
        return ended

    def _report(self, exc: Exception) -> None:
        if self._on_error is None:
            if self._is_callback_mode:  # nobody reads this handle's exc
                logger.error("event=subscription_error drfs=%s error=%s", summarize_drfs(self._drfs), exc)
            return
        try:
            self._on_error(exc, self)
        except Exception:
            logger.exception("event=subscription_error_handler_failed drfs=%s", summarize_drfs(self._drfs))
