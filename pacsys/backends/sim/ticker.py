"""When each subscribed DRF is due: events mapped to periods, and one ticker per period."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pacsys.aio._subscription import AsyncSubscriptionHandle
from pacsys.drf import Event

from .properties import Target
from .table import MIN_PERIOD_US, DeviceSpec

STATE_EVENT_PERIOD_US = 5_000_000
"""How often a simulated state event (@S) fires."""
CLOCK_EVENT_PERIODS_US: dict[int, int] = {
    0x02: 66_667,  # 15 Hz
    0x0F: 66_667,  # 15 Hz (Booster reset)
    0x8F: 66_667,  # 15 Hz
    0x00: 5_000_000,  # supercycle start, simulated as every 5 s
}
"""Simulated clock-event (@E) rates; unknown events use DEFAULT_CLOCK_EVENT_PERIOD_US."""
DEFAULT_CLOCK_EVENT_PERIOD_US = 1_000_000


def schedule(event: Event | None, spec: DeviceSpec) -> tuple[int | None, bool, bool]:
    """(period in µs or None for one reading only, immediate, only-on-change) of an event."""
    if event is None or event.kind == "U":
        return spec.period_us, False, False
    kind = event.kind
    if kind == "P" or kind == "Q":
        period = event.period if event.period is not None else 1_000_000
        return max(MIN_PERIOD_US, period), bool(event.immediate), kind == "Q"
    if kind == "E":
        rate = CLOCK_EVENT_PERIODS_US.get(event.clock_event or 0, DEFAULT_CLOCK_EVENT_PERIOD_US)
        return rate, False, False
    if kind == "S":
        return STATE_EVENT_PERIOD_US, False, False
    return None, True, False  # I, N: one reading now


async def run_ticker(ticker: Ticker, tick: Callable[[Ticker], None]) -> None:
    """Call `tick(ticker)` on every multiple of its period on the loop clock, until cancelled."""
    loop = asyncio.get_running_loop()
    period = ticker.period_us / 1_000_000
    deadline = (loop.time() // period + 1) * period
    while True:
        await _sleep_until(loop, deadline)
        tick(ticker)
        deadline += period
        now = loop.time()
        if deadline <= now:  # fell behind by a whole period or more: skip, do not burst
            deadline += math.ceil((now - deadline) / period) * period
            if deadline <= now:
                deadline += period


async def _sleep_until(loop: asyncio.AbstractEventLoop, when: float) -> None:
    """Sleep until the loop clock reads `when` (an absolute deadline: no drift)."""
    future = loop.create_future()
    timer = loop.call_at(when, _wake, future)
    try:
        await future
    finally:
        timer.cancel()


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


_UNSET: Any = object()


@dataclass(slots=True, eq=False)
class Entry:
    """One DRF of one subscription on a ticker."""

    target: Target
    on_change: bool
    last: Any = _UNSET


class Sub:
    """One backend subscription: a handle and the periods its DRFs are on."""

    __slots__ = ("handle", "callback", "on_error", "periods")

    def __init__(self, handle: AsyncSubscriptionHandle, callback: Any, on_error: Any):
        self.handle = handle
        self.callback = callback
        self.on_error = on_error
        self.periods: list[int] = []


class Ticker:
    """Every subscribed DRF of one period, and the task that streams them."""

    __slots__ = ("period_us", "subs", "task")

    def __init__(self, period_us: int):
        self.period_us = period_us
        self.subs: dict[Sub, list[Entry]] = {}
        self.task: asyncio.Task[None] | None = None
