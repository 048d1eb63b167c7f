"""Backends for the benchmarks, importable as `--backend benchmarks.backends:NAME` in workers.

    memory          AsyncBackend answering at once from a dict (one scalar per device)
    memory_sync     the same as a sync Backend (runs through a thread pool)
    blocking_10ms   sync Backend: every get_many/write_many sleeps 10 ms, then answers from memory
    cpu_1ms         sync Backend: every get_many/write_many burns ~1 ms of CPU (holding the GIL)
    chaos_sync      sync Backend for bench_chaos: memory reads, periodic subscriptions (a thread
                    each), and every write applied is appended to $CHAOS_WRITE_LOG before it is
                    answered, so a benchmark can tell writes lost or applied twice

All accept writes (the value is stored and read back). Unknown devices read 0.0.
"""

from __future__ import annotations

import os
import threading
import time
from datetime import UTC, datetime

from pacsys.aio import AsyncBackend
from pacsys.backends import Backend, SubscriptionHandle
from pacsys.drf import parse_cached
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


class ChaosBackend(SyncMemoryBackend):
    """Writes are logged as they are applied; `@p,N` subscriptions tick on their own threads."""

    def __init__(self) -> None:
        super().__init__()
        path = os.environ.get("CHAOS_WRITE_LOG")
        # O_APPEND: each line is one write(2) that outlives a SIGKILL of this process.
        self._log = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if path else None
        self._lock = threading.Lock()

    @property
    def capabilities(self) -> BackendCapability:
        return CAPABILITIES | BackendCapability.STREAM

    def write_many(self, settings: list[tuple[str, Value]], timeout: float | None = None) -> list[WriteResult]:
        results = super().write_many(settings, timeout)
        if self._log is not None:
            lines = "".join(f"{get_device_name(drf)} {value!r}\n" for drf, value in settings)
            with self._lock:
                os.write(self._log, lines.encode())
        return results

    def subscribe(self, drfs: list[str], callback=None, on_error=None) -> SubscriptionHandle:  # type: ignore[no-untyped-def]
        handle = SubscriptionHandle(drfs, callback=callback, on_error=on_error)
        event = parse_cached(drfs[0]).event
        period = (event.period or 1_000_000) / 1e6 if event is not None and event.period else 1.0

        def tick() -> None:
            while not handle.stopped:
                time.sleep(period - time.monotonic() % period)  # on multiples of the period
                for reading in self.memory.get_many(drfs):
                    handle.dispatch(reading)

        threading.Thread(target=tick, daemon=True).start()
        return handle

    def close(self) -> None:
        if self._log is not None:
            os.close(self._log)
            self._log = None


def chaos_sync() -> ChaosBackend:
    return ChaosBackend()


def memory() -> MemoryBackend:
    return MemoryBackend()


def memory_sync() -> SyncMemoryBackend:
    return SyncMemoryBackend()


def blocking_10ms() -> BlockingBackend:
    return BlockingBackend()


def cpu_1ms() -> CpuBackend:
    return CpuBackend()
