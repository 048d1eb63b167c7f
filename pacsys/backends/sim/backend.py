"""SimBackend: the AsyncBackend over the simulated devices (docs/sim.md)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from pacsys import status as st
from pacsys.aio._backends import AsyncBackend
from pacsys.aio._subscription import AsyncSubscriptionHandle
from pacsys.types import BackendCapability, Reading, Value, WriteResult

from .device import Device
from .properties import Problem, compute, error_reading, resolve
from .table import DeviceTable
from .ticker import Entry, Sub, Ticker, run_ticker, schedule
from .writes import apply_write

# The package's name, as before it was split: log lines keep their logger.
logger = logging.getLogger(__package__)


def _timestamp(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


class SimBackend(AsyncBackend):
    """Simulated devices (docs/sim.md): reads, writes and subscriptions."""

    def __init__(
        self,
        devices: str | os.PathLike[str] | Mapping[str, Any] | DeviceTable | None = None,
        seed: int | str = 0,
        clock: Callable[[], float] | None = None,
    ):
        self.table = devices if isinstance(devices, DeviceTable) else DeviceTable.load(devices)
        self.seed = seed
        self._clock: Callable[[], float] = clock if clock is not None else time.time
        self._devices: dict[str, Device] = {}
        self._tickers: dict[int, Ticker] = {}
        self._subs: dict[AsyncSubscriptionHandle, Sub] = {}
        self._closed = False

    # -- introspection ---------------------------------------------------------------

    @property
    def capabilities(self) -> BackendCapability:
        return BackendCapability.READ | BackendCapability.WRITE | BackendCapability.STREAM | BackendCapability.BATCH

    @property
    def subscription_count(self) -> int:
        """Live subscriptions (handles not yet stopped) of this backend."""
        return len(self._subs)

    @property
    def ticker_count(self) -> int:
        """Running ticker tasks: one per distinct period that some subscription needs."""
        return len(self._tickers)

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("backend is closed")

    # -- devices and DRFs ------------------------------------------------------------

    def _device(self, name: str) -> Device | None:
        dev = self._devices.get(name)
        if dev is None:
            spec = self.table.lookup(name)
            if spec is None:
                return None
            dev = self._devices[name] = Device(spec, self.seed)
        return dev

    async def get_many(self, drfs: list[str], timeout: float | None = None) -> list[Reading]:
        """One reading per DRF, in order, all at one clock time; the event is ignored."""
        self._check_open()
        t = self._clock()
        ts = _timestamp(t)
        out = []
        for drf in drfs:
            try:
                out.append(compute(resolve(drf, self._device), t, ts))
            except Problem as problem:
                out.append(error_reading(drf, problem, ts))
            except Exception as exc:  # a bug here must not fail the other DRFs of the batch
                logger.exception("event=sim_compute_failed during=read drf=%s", drf)
                out.append(error_reading(drf, Problem(st.DPM_INTERNAL, f"simulation failed: {exc}"), ts))
        return out

    # -- writes ----------------------------------------------------------------------

    async def write_many(self, settings: list[tuple[str, Value]], timeout: float | None = None) -> list[WriteResult]:
        """Apply the settings one after another, in order; one WriteResult each."""
        self._check_open()
        results = []
        for drf, value in settings:
            try:
                apply_write(drf, value, self._device)
                results.append(WriteResult(drf))
            except Problem as problem:
                results.append(WriteResult(drf, st.DPM, problem.code, problem.message))
        return results

    async def subscribe(self, drfs: list[str], callback: Any = None, on_error: Any = None) -> AsyncSubscriptionHandle:
        """Stream every DRF at its event's rate (docs/sim.md).

        Iterate `handle.readings()`; or pass `callback(reading, handle)`, called on the loop for
        each reading instead of buffering it (an exception it raises goes to
        `on_error(exc, handle)`, or the log). Stop with `handle.stop()`.
        """
        self._check_open()
        handle = AsyncSubscriptionHandle(remover=self._remove)
        sub = Sub(handle, callback, on_error)
        t = self._clock()
        ts = _timestamp(t)
        initial: list[Reading] = []
        by_period: dict[int, list[Entry]] = {}
        for drf in drfs:
            try:
                target = resolve(drf, self._device)
            except Problem as problem:
                initial.append(error_reading(drf, problem, ts))
                continue
            period, immediate, on_change = schedule(target.parsed.event, target.dev.spec)
            entry = Entry(target, on_change)
            if immediate:
                reading = compute(target, t, ts)
                initial.append(reading)
                entry.last = reading.value
            if period is not None:
                by_period.setdefault(period, []).append(entry)
        self._subs[handle] = sub
        for period, entries in by_period.items():
            ticker = self._tickers.get(period)
            if ticker is None:
                ticker = self._tickers[period] = Ticker(period)
                ticker.task = asyncio.get_running_loop().create_task(
                    run_ticker(ticker, self._tick), name=f"sim-ticker-{period}us"
                )
            ticker.subs[sub] = entries
            sub.periods.append(period)
        if initial:
            self._deliver(sub, initial)
        return handle

    async def _remove(self, handle: AsyncSubscriptionHandle) -> None:
        self._forget(handle)

    def _forget(self, handle: AsyncSubscriptionHandle) -> None:
        sub = self._subs.pop(handle, None)
        if sub is None:
            return
        for period in sub.periods:
            ticker = self._tickers.get(period)
            if ticker is None:
                continue
            ticker.subs.pop(sub, None)
            if not ticker.subs:
                del self._tickers[period]
                if ticker.task is not None:
                    ticker.task.cancel()

    async def stop_streaming(self) -> None:
        """Stop every subscription of this backend."""
        for handle in list(self._subs):
            await handle.stop()

    def _tick(self, ticker: Ticker) -> None:
        t = self._clock()
        ts = _timestamp(t)
        cache: dict[str, Reading] = {}
        for sub, entries in list(ticker.subs.items()):
            if sub.handle.stopped:  # ended without stop() (e.g. by an error): let it go
                self._forget(sub.handle)
                continue
            out = []
            for entry in entries:
                drf = entry.target.drf
                reading = cache.get(drf)
                if reading is None:
                    try:
                        reading = compute(entry.target, t, ts)
                    except Exception as exc:  # a bug here must not kill the ticker
                        logger.exception("event=sim_compute_failed during=subscription drf=%s", drf)
                        reading = error_reading(drf, Problem(st.DPM_INTERNAL, f"simulation failed: {exc}"), ts)
                    cache[drf] = reading
                if entry.on_change:
                    if reading.value == entry.last:
                        continue
                    entry.last = reading.value
                out.append(reading)
            if out:
                self._deliver(sub, out)

    def _deliver(self, sub: Sub, readings: list[Reading]) -> None:
        callback = sub.callback
        if callback is None:
            sub.handle.dispatch_many(readings)
            return
        for reading in readings:
            try:
                callback(reading, sub.handle)
            except Exception as exc:
                if sub.on_error is not None:
                    sub.on_error(exc, sub.handle)
                else:
                    logger.exception("event=sim_callback_failed")

    # -- lifecycle -------------------------------------------------------------------

    async def close(self) -> None:
        """Stop every ticker and end every subscription; later calls raise RuntimeError."""
        if self._closed:
            return
        self._closed = True
        tasks = [ticker.task for ticker in self._tickers.values() if ticker.task is not None]
        self._tickers.clear()
        handles = list(self._subs)
        self._subs.clear()
        for task in tasks:
            task.cancel()
        for handle in handles:
            handle.signal_stop()
        current = asyncio.current_task()
        await asyncio.gather(*(task for task in tasks if task is not current), return_exceptions=True)
