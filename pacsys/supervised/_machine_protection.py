"""Machine protection: the policies that bound where a Set may put a device and how fast.

`ValueRangePolicy` keeps a device's value inside ``[lo, hi]``; `SlewRatePolicy` bounds how far
(``max_step``) and how fast (``max_rate``) a Set may move it.
"""

from __future__ import annotations

import math
import numbers
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeGuard

from pacsys.supervised._policies import _ALLOW, Policy, PolicyDecision, RequestContext, _Patterns

__all__ = ["SlewLimit", "SlewRatePolicy", "ValueRangePolicy"]


def _is_number(value: object) -> TypeGuard[float]:
    # bool is an int subclass, but True is not a setting of 1.0 anyone means to range-check.
    # numbers.Real also admits numpy scalars and Fraction, which compare like floats.
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class ValueRangePolicy(Policy):
    """Deny a Set whose numeric value lies outside ``[lo, hi]`` (inclusive) for its device.

    Args:
        limits: Glob pattern -> ``(lo, hi)``. A device matching several patterns must satisfy
            all of them. Non-numeric values (text, arrays, bool) and unmatched devices pass;
            NaN is denied for a range-limited device.
    """

    def __init__(self, limits: dict[str, tuple[float, float]]):
        if not limits:
            raise ValueError("limits must not be empty")
        for pattern, (lo, hi) in limits.items():
            if not lo <= hi:
                raise ValueError(f"limits[{pattern!r}]: lo {lo} is above hi {hi}")
        self._patterns = _Patterns(list(limits))
        self._bounds = list(limits.values())

    def check(self, ctx: RequestContext) -> PolicyDecision:
        if ctx.rpc_method != "Set":
            return _ALLOW
        for drf, value in ctx.values:
            if not _is_number(value):
                continue
            name = ctx.device_name(drf)
            for i in self._patterns.matching(name):
                lo, hi = self._bounds[i]
                if not lo <= value <= hi:
                    return PolicyDecision(allowed=False, reason=f"Value {value} for {name} outside [{lo}, {hi}]")
        return _ALLOW


@dataclass(frozen=True)
class SlewLimit:
    """How fast one device may be moved by :class:`SlewRatePolicy`; at least one field is required.

    Attributes:
        max_step: Largest absolute change from the previous written value.
        max_rate: Largest change per second since the previous write.
    """

    max_step: float | None = None
    max_rate: float | None = None

    def __post_init__(self) -> None:
        if self.max_step is None and self.max_rate is None:
            raise ValueError("SlewLimit needs max_step, max_rate or both")
        for attr in ("max_step", "max_rate"):
            limit = getattr(self, attr)
            if limit is not None and not limit >= 0:
                raise ValueError(f"{attr} must be >= 0, got {limit}")


class SlewRatePolicy(Policy):
    """Deny Sets that move a device too far or too fast from the value last written through here.

    The first write to a device is free (nothing to compare with). All numeric values of a
    request are checked first, against the history and against earlier slots of the same request;
    the history is updated only when the whole chain allows the request (``on_allowed``), so a
    request denied here or by any other policy leaves it alone. A write that
    the backend later fails still counts as the last value. Non-finite values are denied for
    slew-limited devices because they would poison every later comparison.

    Args:
        limits: Glob pattern -> :class:`SlewLimit`; a device matching several must satisfy all.
        clock: Monotonic time source in seconds (tests inject a fake one).
    """

    def __init__(self, limits: dict[str, SlewLimit], *, clock: Callable[[], float] = time.monotonic):
        if not limits:
            raise ValueError("limits must not be empty")
        self._patterns = _Patterns(list(limits))
        self._limits = list(limits.values())
        self._clock = clock
        self._lock = threading.Lock()
        self._history: dict[str, tuple[float, float]] = {}  # device -> (value, time written)

    def check(self, ctx: RequestContext) -> PolicyDecision:
        if ctx.rpc_method != "Set":
            return _ALLOW
        with self._lock:
            now = self._clock()
            staged: dict[str, tuple[float, float]] = {}
            for drf, value in ctx.values:
                if not _is_number(value):
                    continue
                name = ctx.device_name(drf)
                matched = self._patterns.matching(name)
                if not matched:
                    continue
                new = float(value)
                if not math.isfinite(new):
                    return PolicyDecision(allowed=False, reason=f"Value {new} for {name} is not finite")
                prev = staged.get(name) or self._history.get(name)
                if prev is not None:
                    denial = self._violation(name, new, prev, now, matched)
                    if denial is not None:
                        return PolicyDecision(allowed=False, reason=denial)
                staged[name] = (new, now)
        return _ALLOW

    def on_allowed(self, ctx: RequestContext) -> None:
        """Record the values the whole chain let through as each device's last write."""
        if ctx.rpc_method != "Set":
            return
        with self._lock:
            now = self._clock()
            for drf, value in ctx.values:
                name = ctx.device_name(drf)
                if _is_number(value) and self._patterns.matching(name):
                    self._history[name] = (float(value), now)

    def _violation(
        self, name: str, new: float, prev: tuple[float, float], now: float, matched: tuple[int, ...]
    ) -> str | None:
        prev_value, prev_time = prev
        step = abs(new - prev_value)
        elapsed = now - prev_time
        for i in matched:
            limit = self._limits[i]
            if limit.max_step is not None and step > limit.max_step:
                return f"Step {step:g} for {name} exceeds max_step {limit.max_step:g}"
            if limit.max_rate is not None and step > limit.max_rate * elapsed:
                rate = step / elapsed if elapsed > 0 else math.inf
                return f"Rate {rate:g}/s for {name} exceeds max_rate {limit.max_rate:g}/s"
        return None
