"""Backends for the benchmarks, importable as `--backend benchmarks.backends:NAME` in workers.

    memory          AsyncBackend answering at once from a dict (one scalar per device)
    memory_sync     the same as a sync Backend (runs through a thread pool)
    blocking_10ms   sync Backend: every get_many/write_many sleeps 10 ms, then answers from memory
    cpu_1ms         sync Backend: every get_many/write_many burns ~1 ms of CPU (holding the GIL)

All accept writes (the value is stored and read back). Unknown devices read 0.0.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from pacsys.aio import AsyncBackend
from pacsys.backends import Backend
from pacsys.drf_utils import get_device_name
from pacsys.types import BackendCapability, Reading, Value, ValueType, WriteResult

CAPABILITIES = BackendCapability.READ | BackendCapability.WRITE | BackendCapability.BATCH


class Memory:
    """Device name -> scalar; Z:SIM000..Z:SIM099 start at 0.0..99.0."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {f"Z:SIM{i:03d}": float(i) for i in range(100)}

    def get_many(self, drfs: list[str]) -> list[Reading]:
        now = datetime.now(UTC)
        values = self.values
        return [
            Reading(drf, value_type=ValueType.SCALAR, value=values.get(get_device_name(drf), 0.0), timestamp=now)
            for drf in drfs
        ]

    def write_many(self, settings: list[tuple[str, Value]]) -> list[WriteResult]:
        for drf, value in settings:
            self.values[get_device_name(drf)] = float(value)  # type: ignore[arg-type]
        return [WriteResult(drf=drf) for drf, _ in settings]


class MemoryBackend(AsyncBackend):
    def __init__(self) -> None:
        self.memory = Memory()

    @property
    def capabilities(self) -> BackendCapability:
        return CAPABILITIES

    async def get_many(self, drfs: list[str], timeout: float | None = None) -> list[Reading]:
        return self.memory.get_many(drfs)

    async def write_many(self, settings: list[tuple[str, Value]], timeout: float | None = None) -> list[WriteResult]:
        return self.memory.write_many(settings)

    async def close(self) -> None:
        pass


class SyncMemoryBackend(Backend):
    """Sync memory backend; `delay()` runs before every call (nothing here)."""

    def __init__(self) -> None:
        self.memory = Memory()

    @property
    def capabilities(self) -> BackendCapability:
        return CAPABILITIES

    def delay(self) -> None:
        pass

    def get_many(self, drfs: list[str], timeout: float | None = None) -> list[Reading]:
        self.delay()
        return self.memory.get_many(drfs)

    def write_many(self, settings: list[tuple[str, Value]], timeout: float | None = None) -> list[WriteResult]:
        self.delay()
        return self.memory.write_many(settings)

    def close(self) -> None:
        pass


class BlockingBackend(SyncMemoryBackend):
    def delay(self) -> None:
        time.sleep(0.010)


class CpuBackend(SyncMemoryBackend):
    def delay(self) -> None:
        end = time.perf_counter() + 0.001
        while time.perf_counter() < end:
            pass


def memory() -> MemoryBackend:
    return MemoryBackend()


def memory_sync() -> SyncMemoryBackend:
    return SyncMemoryBackend()


def blocking_10ms() -> BlockingBackend:
    return BlockingBackend()


def cpu_1ms() -> CpuBackend:
    return CpuBackend()
