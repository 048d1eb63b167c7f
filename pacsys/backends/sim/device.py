"""A simulated device's live state in one backend, and the values it reads at a clock time."""

from __future__ import annotations

import math
from typing import Any

from pacsys.types import DeviceMeta

from .noise import NOISE_QUANTUM_PER_S, TWO_PI, name_key, unit_noise
from .table import DeviceSpec
from .values import ANALOG_KEYS, DIGITAL_KEYS, STATUS_BITS


class Device:
    """A device's live state in one backend: its setting, status and alarm blocks."""

    __slots__ = ("spec", "key", "meta", "setting", "status", "analog", "digital", "elem_phase")

    def __init__(self, spec: DeviceSpec, seed: object):
        self.spec = spec
        self.key = name_key("noise", seed, spec.name)
        self.meta = DeviceMeta(spec.index, spec.name, spec.description, spec.units)
        self.setting = spec.setting
        self.status = None if spec.status is None else dict(spec.status)
        self.analog = None if spec.analog is None else dict(spec.analog)
        self.digital = None if spec.digital is None else dict(spec.digital)
        self.elem_phase = TWO_PI / spec.length if spec.length else 0.0

    def element(self, t: float, tick: int, i: int) -> float:
        status = self.status
        if status is not None and not status["on"]:
            return 0.0
        spec = self.spec
        setting = self.setting
        v = (spec.base if setting is None else setting) + i * spec.step
        if spec.amplitude:
            v += spec.amplitude * math.sin(TWO_PI * t / spec.cycle_s + spec.phase + i * self.elem_phase)
        if spec.noise:
            v += spec.noise * unit_noise(self.key, tick, i)
        return v

    def values(self, t: float) -> list[float]:
        """The READING at clock time t, one float per element (a scalar device has one)."""
        tick = math.floor(t * NOISE_QUANTUM_PER_S)
        return [self.element(t, tick, i) for i in range(self.spec.length or 1)]

    def status_bits(self) -> int:
        status = self.status
        if status is None:
            return 0
        return sum(bit for key, bit in STATUS_BITS.items() if status[key])

    def analog_block(self, t: float) -> dict[str, Any]:
        assert self.analog is not None
        block = dict(self.analog)
        lo, hi = block["minimum"], block["maximum"]
        block["alarm_status"] = block["alarm_enable"] and any(v < lo or v > hi for v in self.values(t))
        return {key: block[key] for key in ANALOG_KEYS}

    def digital_block(self) -> dict[str, Any]:
        assert self.digital is not None
        block = dict(self.digital)
        block["alarm_status"] = block["alarm_enable"] and ((self.status_bits() ^ block["nominal"]) & block["mask"]) != 0
        return {key: block[key] for key in DIGITAL_KEYS}
