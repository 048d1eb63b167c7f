"""Machine protection: the policies that bound where a Set may put a device and how fast.

`ValueRangePolicy` keeps a device's setting inside ``[lo, hi]``; `SlewRatePolicy` bounds how
far (``max_step``) and how fast (``max_rate``) one request may move it. They are what keeps a
magnet or an RF station safe, so they hold for any shape of request:

- **What is limited.** A limit names devices; it holds their SETTING property, the one a Set
  of ``Z:ACLTST``, ``Z:ACLTST.SETTING``, ``Z_ACLTST`` or ``Z:ACLTST[0]`` writes (a DRF names a
  property: `docs/drf.md`). Writes to a device's other properties (``Z|ACLTST`` is its CONTROL,
  ``Z:ACLTST.ANALOG.MAX`` an alarm limit) are outside the limit: not judged by it, and they
  never move its history.
- **What it can judge.** A finite scalar in the setting's scaled units, written to the whole
  setting. Anything else for a limited device is refused, naming the setting: an array, text,
  raw bytes, a bool, an alarm block, a non-finite number; a byte range (``{0:8}``, raw bytes);
  an element range other than the one element of a scalar (``[7]``, ``[1:2]``); a field other
  than the scaled value (``.RAW``, ``.PRIMARY``); an extra (``<-LOGGER``).
- **From where a step is measured.** From the device's current value, which the gateway reads
  through the backend just before the chain runs (`needs_current`); when that read fails the
  Set is refused (fail closed). Several settings of one device in one request are judged as a
  sequence from that value, each from the one before; the gateway then sends each only if the
  backend accepted the one before it (`_protected_writes`).
- **What moves the history.** Only settings the backend accepted, or whose outcome is unknown
  (they may have reached the device), as the gateway reports them after the write
  (`on_written`). ``max_rate`` is judged from the time of the last such write through this
  policy object; before the first one there is no time to judge it from, and ``max_step``
  alone holds.
"""

from __future__ import annotations

import math
import numbers
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pacsys.drf import DRF, DRFError, Field, Property, Range, parse_cached
from pacsys.supervised._policy_base import (
    _ALLOW,
    CurrentValue,
    Policy,
    PolicyDecision,
    RequestContext,
    _Patterns,
)

__all__ = ["SlewLimit", "SlewRatePolicy", "ValueRangePolicy", "setting_of"]


def setting_of(parsed: DRF) -> str | None:
    """The setting a Set with this DRF writes (``Z:ACLTST.SETTING``); None for another property."""
    if parsed.for_write().property is not Property.SETTING:
        return None
    return f"{parsed.device}.{Property.SETTING.value}"


def _whole_scalar(rng: Range) -> bool:
    """An array range that names the one element of a scalar: [], [:], [0], [0:0], [:0], [0:]."""
    return rng.kind == "array" and (rng.is_whole or (rng.start in (None, 0) and (rng.single or rng.end in (None, 0))))


def kind_of(value: object) -> str:
    """What a value is, in words, for a reason (never the value itself: it may be large)."""
    if value is None:
        return "no value"
    if isinstance(value, bool):
        return "a bool"
    if isinstance(value, str):
        return "text"
    if isinstance(value, bytes | bytearray):
        return "raw bytes"
    if isinstance(value, dict):
        return "a structured value (an alarm block or a status)"
    if isinstance(value, list | tuple) or hasattr(value, "tolist"):
        return "an array"
    if isinstance(value, numbers.Real):
        return f"a non-finite number ({value})"
    return f"a {type(value).__name__}"


def finite_scalar(value: object) -> float | None:
    """`value` as a float when it is a finite real number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _unjudgeable(parsed: DRF, value: object) -> str | None:
    """Why a limit cannot judge this write to a setting, or None when it can."""
    rng = parsed.range
    if rng is not None and rng.kind == "byte":
        return f"a byte range ({rng}) writes raw bytes"
    if rng is not None and not _whole_scalar(rng):
        return f"an element range ({rng}) writes part of an array"
    if parsed.field is not None and parsed.field is not Field.SCALED:
        return f"the {parsed.field.value} field is not in the scaled units the limit is in"
    if parsed.extra is not None:
        return f"an extra (<-{parsed.extra.name}) is not a setting"
    if finite_scalar(value) is None:
        return f"the value is {kind_of(value)}"
    return None


@dataclass(frozen=True, slots=True)
class _Setting:
    """One write to a limited device's setting, as a limit judges it."""

    index: int  # its slot in ctx.values
    drf: str
    device: str
    setting: str  # Z:ACLTST.SETTING
    value: float
    matched: tuple[int, ...]  # the limits (pattern indices) that hold it


def _limited(ctx: RequestContext, patterns: _Patterns, limit: str) -> list[_Setting] | PolicyDecision:
    """The writes of `ctx` to settings that `patterns` limit, or the denial of one it cannot judge."""
    found = []
    for i, (drf, value) in enumerate(ctx.values):
        try:
            parsed = ctx.parsed.get(drf) or parse_cached(drf)
        except DRFError as exc:  # only a DRF a policy rewrote can get here: the gate parsed the rest
            return PolicyDecision(allowed=False, reason=f"Setting {i} ({drf}) cannot be parsed: {exc}")
        matched = patterns.matching(parsed.device)
        if not matched:
            continue
        setting = setting_of(parsed)
        if setting is None:
            continue  # another property of the device: outside the limit
        why = _unjudgeable(parsed, value)
        if why is not None:
            reason = f"Setting {i} ({drf}) cannot be judged by the {limit} limit of {parsed.device}: {why}"
            return PolicyDecision(allowed=False, reason=reason)
        found.append(_Setting(i, drf, parsed.device, setting, float(value), matched))  # type: ignore[arg-type]
    return found


class ValueRangePolicy(Policy):
    """Deny a Set that would put a limited device's setting outside ``[lo, hi]`` (inclusive).

    Args:
        limits: Glob pattern -> ``(lo, hi)``. A device matching several patterns must satisfy
            all of them. What the limit holds and what it refuses: the module notes.
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
        judged = _limited(ctx, self._patterns, "range")
        if isinstance(judged, PolicyDecision):
            return judged
        for s in judged:
            for i in s.matched:
                lo, hi = self._bounds[i]
                if not lo <= s.value <= hi:
                    return PolicyDecision(allowed=False, reason=f"Value {s.value} for {s.device} outside [{lo}, {hi}]")
        return _ALLOW


@dataclass(frozen=True)
class SlewLimit:
    """How fast one device may be moved by :class:`SlewRatePolicy`; at least one field is required.

    Attributes:
        max_step: Largest absolute change from the device's value before the setting.
        max_rate: Largest change per second since the last write the backend accepted.
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
    """Deny a Set that moves a limited device's setting too far or too fast (the module notes).

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
        self._written: dict[str, float] = {}  # setting -> when the backend last accepted a write of it

    def needs_current(self, ctx: RequestContext) -> Sequence[str]:
        if ctx.rpc_method != "Set":
            return ()
        wanted: dict[str, None] = {}
        for drf, _ in ctx.values:
            try:
                parsed = ctx.parsed.get(drf) or parse_cached(drf)
            except DRFError:
                continue  # `check` denies it
            setting = setting_of(parsed)
            if setting is not None and self._patterns.matching(parsed.device):
                wanted[setting] = None
        return list(wanted)

    def check(self, ctx: RequestContext) -> PolicyDecision:
        return self._check(ctx, movement=True)

    def check_without_current(self, ctx: RequestContext) -> PolicyDecision:
        """Everything `check` judges but the steps and rates, which need the device's current
        value and this object's history (what ``pacsys-supervisor explain`` can show)."""
        return self._check(ctx, movement=False)

    def on_written(self, ctx: RequestContext, outcomes: Sequence[bool | None]) -> None:
        """Record when the backend accepted (or may have accepted) each limited setting."""
        if ctx.rpc_method != "Set":
            return
        judged = _limited(ctx, self._patterns, "slew")
        if isinstance(judged, PolicyDecision):
            return
        now = self._clock()
        with self._lock:
            for s in judged:
                if s.index < len(outcomes) and outcomes[s.index] is not False:
                    self._written[s.setting] = now

    def _check(self, ctx: RequestContext, *, movement: bool) -> PolicyDecision:
        if ctx.rpc_method != "Set":
            return _ALLOW
        judged = _limited(ctx, self._patterns, "slew")
        if isinstance(judged, PolicyDecision) or not movement:
            return judged if isinstance(judged, PolicyDecision) else _ALLOW
        now = self._clock()
        with self._lock:
            written = {s.setting: self._written.get(s.setting) for s in judged}
        reached: dict[str, _Setting] = {}  # setting -> the last write of it earlier in this request
        for s in judged:
            before = reached.get(s.setting)
            if before is None:
                current = _current_number(ctx.current.get(s.setting), s)
                if isinstance(current, str):
                    return PolicyDecision(allowed=False, reason=current)
                since = written[s.setting]
                elapsed = None if since is None else now - since
                denial = self._violation(s, current, f"its current value {current:g}", elapsed)
            else:
                origin = f"setting {before.index}'s {before.value:g} in this request"
                denial = self._violation(s, before.value, origin, 0.0)
            if denial is not None:
                return PolicyDecision(allowed=False, reason=denial)
            reached[s.setting] = s
        return _ALLOW

    def _violation(self, s: _Setting, prev: float, origin: str, elapsed: float | None) -> str | None:
        """Why moving `s.setting` from `prev` to `s.value` after `elapsed` s breaks a limit, or None."""
        step = abs(s.value - prev)
        for i in s.matched:
            limit = self._limits[i]
            if limit.max_step is not None and step > limit.max_step:
                return f"Step {step:g} for {s.setting} (setting {s.index}) from {origin} exceeds max_step {limit.max_step:g}"
            if limit.max_rate is not None and elapsed is not None and step > limit.max_rate * elapsed:
                if elapsed <= 0:
                    return (
                        f"Step {step:g} for {s.setting} (setting {s.index}) from {origin} takes no time: "
                        f"it exceeds max_rate {limit.max_rate:g}/s"
                    )
                return (
                    f"Rate {step / elapsed:g}/s for {s.setting} (setting {s.index}) from {origin} "
                    f"exceeds max_rate {limit.max_rate:g}/s"
                )
        return None


def _current_number(current: CurrentValue | None, s: _Setting) -> float | str:
    """The device's current value to judge `s` from, or the reason the Set is refused without it."""
    if current is None:
        return f"The current value of {s.setting} was not read: setting {s.index} ({s.drf}) cannot be judged"
    if current.error is not None:
        return f"The current value of {s.setting} cannot be read ({current.error}): setting {s.index} ({s.drf}) refused"
    number = finite_scalar(current.value)
    if number is None:
        return (
            f"The current value of {s.setting} is {kind_of(current.value)}, not a finite number: "
            f"setting {s.index} ({s.drf}) cannot be judged"
        )
    return number
