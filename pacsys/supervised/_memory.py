"""Giving the heap back to the system after a flood.

Each HTTP/2 connection costs gRPC about 14 KiB of heap, and a flood of frames (endless
CONTINUATION, pings read late) has gRPC buffer hundreds of MiB for a few seconds. When it
is over, glibc keeps the freed memory in its arenas, and the next flood, fragmenting them
differently, takes more: four waves of 10,000 idle connections against a bare grpc.aio
server left 168, 227, 258 and 274 MiB; with `malloc_trim(0)` after each, 81, 80, 78 and 79
MiB. `release()` is that call; `HeapWatch` makes it once `memory_release_bytes` (a setting)
more bytes are resident than malloc has in use (glibc's own count, `mallinfo2`), looked at
every `HEAP_CHECK_SECONDS` by the connection guard's thread. Both do nothing where the C library
is not glibc (or is older than 2.33, which has no `mallinfo2`).
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable

import psutil

__all__ = ["HEAP_CHECK_SECONDS", "HeapWatch", "release"]

logger = logging.getLogger("pacsys.supervised")


def _glibc_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return None


_malloc_trim = _glibc_malloc_trim()

HEAP_CHECK_SECONDS = 5.0  # mallinfo2 walks every arena's free lists: not on every guard pass


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _glibc_mallinfo2() -> Callable[[], _Mallinfo2] | None:
    try:
        function = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):  # not glibc, or glibc before 2.33
        return None
    function.restype = _Mallinfo2
    return function


_mallinfo2 = _glibc_mallinfo2()


def release(reason: str) -> None:
    """Return the heap's free memory to the system (glibc), logging the RSS before and after."""
    if _malloc_trim is None:
        return
    process = psutil.Process()
    before = process.memory_info().rss
    _malloc_trim(0)
    after = process.memory_info().rss
    logger.info("event=memory_released reason=%s rss_mb=%.0f->%.0f", reason, before / 2**20, after / 2**20)


class HeapWatch:
    """Gives the heap back (`release`) once the memory resident but not in use by malloc has
    grown by more than `limit` bytes since the last look that gave it back (or the first),
    looking at most once per `every` seconds of `clock`.

    Resident memory not in use is the RSS less what malloc has handed out (`mallinfo2`'s
    in-use and mmapped bytes): code, Python's own arenas and freed heap pages still mapped.
    Only the last grows in a flood, and a trim takes it back, so the floor is measured again
    after each release: a heap that stays fragmented is not trimmed again and again.
    """

    def __init__(self, clock: Callable[[], float], limit: int, every: float = HEAP_CHECK_SECONDS):
        self.limit = limit
        self.every = every
        self._clock = clock
        self._next = clock()
        self._floor: int | None = None
        self._process = psutil.Process()
        self.releases = 0

    def _idle_bytes(self) -> int | None:
        if _mallinfo2 is None:
            return None
        info = _mallinfo2()
        return int(self._process.memory_info().rss - info.uordblks - info.hblkhd)

    def check(self) -> bool:
        """Whether the heap was given back on this look."""
        now = self._clock()
        if now < self._next:
            return False
        self._next = now + self.every
        idle = self._idle_bytes() if self.limit > 0 else None
        if idle is None:  # off, or not glibc
            return False
        if self._floor is None or idle <= self._floor + self.limit:
            self._floor = idle if self._floor is None else min(self._floor, idle)
            return False
        release(f"{(idle - self._floor) >> 20}_mib_idle")
        self.releases += 1
        self._floor = self._idle_bytes()
        return True
