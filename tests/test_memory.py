"""The heap a flood left freed is given back (`_memory.HeapWatch`), once, not on every look."""

import psutil
import pytest

from pacsys.supervised import _memory

pytestmark = pytest.mark.skipif(
    _memory._mallinfo2 is None or _memory._malloc_trim is None, reason="needs glibc >= 2.33 (mallinfo2, malloc_trim)"
)


def test_a_fragmented_heap_is_given_back_once():
    process = psutil.Process()
    now = [0.0]
    watch = _memory.HeapWatch(lambda: now[0], limit=32 * 2**20, every=5.0)
    assert not watch.check()  # the first look sets the floor
    blocks = [bytearray(1000) for _ in range(200_000)]  # ~200 MB of small blocks on the heap
    kept = blocks[::50]  # one in 50 kept: the freed pages cannot shrink the heap's top
    del blocks
    grown = process.memory_info().rss
    assert not watch.check()  # within `every` of the last look: not looked at
    now[0] += 5.0
    assert watch.check()
    assert process.memory_info().rss < grown - 64 * 2**20
    now[0] += 5.0
    assert not watch.check()  # given back: the same fragmented heap is not trimmed again
    assert watch.releases == 1
    del kept


def test_a_threshold_of_zero_never_gives_back():
    now = [0.0]
    watch = _memory.HeapWatch(lambda: now[0], limit=0)
    blocks = [bytearray(1000) for _ in range(100_000)]
    del blocks[::2]
    for _ in range(3):
        now[0] += 10.0
        assert not watch.check()
    assert watch.releases == 0
