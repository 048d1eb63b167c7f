"""Bounded records of what clients sent: excerpts, and refusal log lines at a bounded rate.

Anything a client sends (a DRF, a value, a garbage body) can be as large as the largest
message gRPC accepts. Log lines and audit entries hold an excerpt of it, never all of it,
so that refused requests cannot fill a disk. And a client that keeps sending refused
requests gets one log line per kind of refusal per interval, followed by a count of the
lines left out (the audit log keeps one bounded entry per request).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

__all__ = ["EXCERPT_CHARS", "EXCERPT_ITEMS", "RefusalLog", "excerpt", "excerpt_list"]

EXCERPT_CHARS = 200  # a DRF is a few dozen characters: 200 shows any real one whole
EXCERPT_ITEMS = 20  # list entries kept before "... and N more"


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """`text` cut to `limit` characters, saying how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...(+{len(text) - limit} chars)"


def excerpt_list(items: Sequence[str], limit: int = EXCERPT_ITEMS) -> list[str]:
    """The first `limit` items, each an excerpt, and one more item counting the rest."""
    kept = [excerpt(str(s)) for s in items[:limit]]
    if len(items) > limit:
        kept.append(f"... and {len(items) - limit} more")
    return kept


class RefusalLog:
    """Decides which refusals get a log line: one per (client, kind) per `interval` seconds.

    ``admit(key)`` returns None when the line is to be left out (it is counted), or the number
    of lines left out since the last one written for that key. Memory is bounded: the table
    is cleared when it holds `max_keys` keys (at worst a few lines more get through).
    """

    def __init__(self, interval: float, max_keys: int = 10_000, clock: Callable[[], float] = time.monotonic):
        self.interval = interval
        self._max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        self._last: dict[tuple[str, ...], tuple[float, int]] = {}  # key -> (time of last line, left out since)

    def admit(self, key: tuple[str, ...]) -> int | None:
        now = self._clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last[0] < self.interval:
                self._last[key] = (last[0], last[1] + 1)
                return None
            if len(self._last) >= self._max_keys:
                self._last.clear()
            self._last[key] = (now, 0)
            return last[1] if last is not None else 0
