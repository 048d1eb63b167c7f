"""Several sync subscriptions read as one stream, in timestamp order."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

from pacsys.types import Reading

# How often a handle that cannot wake the reader (it has no `add_waker`) is looked at.
POLL_INTERVAL = 0.05
_NO_TIME = datetime.min.replace(tzinfo=UTC)


def _time_order(pair: tuple[Reading, Any]) -> datetime:
    """A reading's place in the merged order: no timestamp first, a naive one read as UTC."""
    ts = pair[0].timestamp
    if ts is None:
        return _NO_TIME
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)


class CombinedStream:
    """The readings of several subscriptions as one iterable of (reading, handle) pairs.

    Each round takes every reading the handles hold and yields them sorted by timestamp, so
    the order is exact among readings that arrived together, not across streams of different
    latency. `readings(timeout)` ends when every handle has ended and been drained, or when
    `timeout` seconds have passed in total (`timeout=0`: what is buffered now; `None`: no
    limit). The error of any handle is raised at once, without the readings still buffered;
    `exc` keeps it. Stopping the stream (`stop()`, or leaving a `with` block) stops every
    handle.

    Handles are buffered handles (`readings(timeout=0)`, `stopped`, `exc`, `stop()`); one
    with `add_waker` (every handle of `pacsys.backends`) wakes the reader at once, any other
    is looked at every `POLL_INTERVAL` seconds.
    """

    def __init__(self, subscriptions: Iterable[Any]):
        self._subscriptions = list(subscriptions)
        if not self._subscriptions:
            raise ValueError("CombinedStream needs at least one subscription; the list is empty")

    @property
    def stopped(self) -> bool:
        """True when every subscription has ended."""
        return all(sub.stopped for sub in self._subscriptions)

    @property
    def exc(self) -> Exception | None:
        """The error of the first subscription (in the order given) that ended with one."""
        return next((sub.exc for sub in self._subscriptions if sub.exc is not None), None)

    def readings(self, timeout: float | None = None) -> Iterator[tuple[Reading, Any]]:
        deadline = None if timeout is None else time.monotonic() + timeout
        woken = threading.Event()
        wakers = [sub for sub in self._subscriptions if hasattr(sub, "add_waker")]
        for sub in wakers:
            sub.add_waker(woken.set)
        longest_wait = None if len(wakers) == len(self._subscriptions) else POLL_INTERVAL
        try:
            while True:
                woken.clear()
                if (exc := self.exc) is not None:
                    raise exc
                ended = self.stopped  # before taking: a handle that ended holds nothing new after
                batch = [pair for sub in self._subscriptions for pair in sub.readings(timeout=0)]
                batch.sort(key=_time_order)
                yield from batch
                remaining = None if deadline is None else deadline - time.monotonic()
                if (ended and not batch) or (remaining is not None and remaining <= 0):
                    return
                if not batch:
                    wait = remaining if longest_wait is None else min(remaining or longest_wait, longest_wait)
                    woken.wait(wait)
        finally:
            for sub in wakers:
                sub.remove_waker(woken.set)

    def stop(self) -> None:
        """Stop every subscription."""
        for sub in self._subscriptions:
            sub.stop()

    def __enter__(self) -> CombinedStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
