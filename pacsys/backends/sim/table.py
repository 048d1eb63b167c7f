"""The device table: TOML (or a mapping) checked key by key into DeviceSpec and DeviceFamily."""

from __future__ import annotations

import math
import numbers
import os
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from importlib import resources
from typing import Any

from .noise import auto_phase
from .values import STATUS_KEYS, check_alarm, coerce_alarm

DEFAULT_PERIOD_US = 1_000_000
"""Default event rate of a device when the table gives none (1 s)."""
MIN_PERIOD_US = 1_000
"""Shortest period streamed; a shorter @P/@Q period is clamped to it (1 kHz)."""

_DEVICE_KEYS = frozenset(
    {
        "description",
        "units",
        "period_ms",
        "base",
        "setting",
        "amplitude",
        "cycle_s",
        "phase",
        "noise",
        "length",
        "step",
        "status",
        "analog",
        "digital",
    }
)


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """One simulated device as the table describes it (its live state is the backend's)."""

    name: str
    index: int
    description: str = ""
    units: str | None = None
    period_us: int = DEFAULT_PERIOD_US
    base: float = 0.0
    setting: float | None = None
    amplitude: float = 0.0
    cycle_s: float = 60.0
    phase: float = 0.0
    noise: float = 0.0
    length: int | None = None
    step: float = 0.0
    status: Mapping[str, bool] | None = None
    analog: Mapping[str, Any] | None = None
    digital: Mapping[str, Any] | None = None

    @property
    def settable(self) -> bool:
        return self.setting is not None


@dataclass(frozen=True, slots=True)
class DeviceFamily:
    """Generated devices `prefix` + a zero-padded number of `digits` digits, below `count`."""

    prefix: str
    digits: int
    count: int
    first_index: int
    template: DeviceSpec

    def member(self, name: str) -> DeviceSpec | None:
        """The spec of `name` when it is a member of this family, else None."""
        prefix = self.prefix
        if len(name) != len(prefix) + self.digits or not name.startswith(prefix):
            return None
        number = name[len(prefix) :]
        if not (number.isascii() and number.isdigit()):
            return None
        i = int(number)
        if i >= self.count:
            return None
        template = self.template
        phase = auto_phase(name) if math.isnan(template.phase) else template.phase
        return replace(
            template,
            name=name,
            index=self.first_index + i,
            description=template.description.format(index=number, name=name),
            phase=phase,
        )


class DeviceTable:
    """The simulated devices: explicit ones by name, then the generated families."""

    def __init__(self, devices: Mapping[str, DeviceSpec], families: Iterable[DeviceFamily] = ()):
        self._devices = dict(devices)
        self._families = tuple(families)

    @classmethod
    def default_path(cls) -> Any:
        return resources.files("pacsys.backends.sim").joinpath("devices.toml")

    @classmethod
    def load(cls, source: str | os.PathLike[str] | Mapping[str, Any] | None = None) -> DeviceTable:
        """Load a table from a TOML file, an already-parsed mapping, or (None) the shipped one."""
        if source is None:
            data = tomllib.loads(cls.default_path().read_text(encoding="utf-8"))
        elif isinstance(source, Mapping):
            data = dict(source)
        else:
            with open(source, "rb") as f:
                data = tomllib.load(f)
        return cls.from_mapping(data)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> DeviceTable:
        unknown = set(data) - {"defaults", "devices", "families"}
        if unknown:
            raise ValueError(f"sim device table: unknown top-level key(s) {sorted(unknown)}")
        defaults = _table(data.get("defaults", {}), "[defaults]")
        bad = set(defaults) - {"period_ms"}
        if bad:
            raise ValueError(f"sim device table: unknown key(s) in [defaults]: {sorted(bad)}")
        default_period = _period_us(defaults.get("period_ms"), "[defaults] period_ms", DEFAULT_PERIOD_US)
        devices: dict[str, DeviceSpec] = {}
        for i, (raw_name, entry) in enumerate(_table(data.get("devices", {}), "[devices]").items(), start=1):
            name = _device_name(raw_name)
            if name in devices:
                raise ValueError(f"sim device table: device {name} listed twice")
            devices[name] = _spec(name, i, _table(entry, name), default_period)
        families = []
        raw_families = data.get("families", [])
        if not isinstance(raw_families, list):
            raise ValueError("sim device table: 'families' must be an array of tables ([[families]])")
        for k, raw in enumerate(raw_families):
            families.append(_family(_table(raw, f"families[{k}]"), 100_000 * (k + 1), default_period))
        return cls(devices, families)

    def lookup(self, name: str) -> DeviceSpec | None:
        """The spec of a canonical device name, or None when the device does not exist."""
        spec = self._devices.get(name)
        if spec is not None:
            return spec
        for family in self._families:
            spec = family.member(name)
            if spec is not None:
                return spec
        return None

    @property
    def names(self) -> list[str]:
        """The explicitly listed devices (family members are not enumerated)."""
        return list(self._devices)

    @property
    def families(self) -> tuple[DeviceFamily, ...]:
        return self._families


def _table(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"sim device table: {where} must be a table")
    return dict(value)


def _device_name(raw: object) -> str:
    if not isinstance(raw, str):
        raise ValueError(f"sim device table: device name {raw!r} is not a string")
    name = raw.upper()
    if len(name) < 3 or name[1] != ":":
        raise ValueError(f"sim device table: {raw!r} is not a canonical device name like 'M:OUTTMP'")
    return name


def _real(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"sim device table: {where} must be a number, got {value!r}")
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"sim device table: {where} must be finite")
    return result


def _period_us(value: object, where: str, default: int) -> int:
    if value is None:
        return default
    ms = _real(value, where)
    if ms <= 0:
        raise ValueError(f"sim device table: {where} must be positive")
    return max(MIN_PERIOD_US, round(ms * 1000))


def _flags(value: object, where: str, keys: Iterable[str], defaults: Mapping[str, Any]) -> dict[str, Any]:
    block = _table(value, where)
    unknown = set(block) - set(keys)
    if unknown:
        raise ValueError(f"sim device table: unknown key(s) in {where}: {sorted(unknown)}")
    return {**defaults, **block}


def _status(value: object, where: str) -> dict[str, bool]:
    block = _flags(value, where, STATUS_KEYS, dict.fromkeys(STATUS_KEYS, False))
    for key, v in block.items():
        if not isinstance(v, bool):
            raise ValueError(f"sim device table: {where}.{key} must be true or false")
    return block


def _alarm(value: object, where: str, digital: bool) -> dict[str, Any]:
    limits = ("nominal", "mask") if digital else ("minimum", "maximum")
    defaults: dict[str, Any] = {
        limits[0]: 0 if digital else 0.0,
        limits[1]: 0 if digital else 0.0,
        "alarm_enable": False,
        "abort": False,
        "abort_inhibit": False,
        "tries_needed": 1,
        "tries_now": 0,
    }
    block = _flags(value, where, defaults, defaults)
    error = check_alarm(block, digital)
    if error is not None:
        raise ValueError(f"sim device table: {where}: {error}")
    return coerce_alarm(block, digital)


def _spec(name: str, index: int, entry: dict[str, Any], default_period: int, *, family: bool = False) -> DeviceSpec:
    unknown = set(entry) - _DEVICE_KEYS
    if unknown:
        raise ValueError(f"sim device table: unknown key(s) for {name}: {sorted(unknown)}")
    length = entry.get("length")
    if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 1):
        raise ValueError(f"sim device table: {name}.length must be a positive integer")
    setting = entry.get("setting")
    if setting is not None and length is not None:
        raise ValueError(f"sim device table: {name}: an array device cannot be settable")
    cycle_s = _real(entry.get("cycle_s", 60.0), f"{name}.cycle_s")
    if cycle_s <= 0:
        raise ValueError(f"sim device table: {name}.cycle_s must be positive")
    raw_phase = entry.get("phase", 0.0)
    if raw_phase == "auto":
        # Family members get their own phase when built (NaN marks "derive it from the name").
        phase = math.nan if family else auto_phase(name)
    else:
        phase = _real(raw_phase, f"{name}.phase")
    description = entry.get("description", "")
    units = entry.get("units")
    if not isinstance(description, str) or (units is not None and not isinstance(units, str)):
        raise ValueError(f"sim device table: {name}: description and units must be strings")
    return DeviceSpec(
        name=name,
        index=index,
        description=description,
        units=units,
        period_us=_period_us(entry.get("period_ms"), f"{name}.period_ms", default_period),
        base=_real(entry.get("base", 0.0), f"{name}.base"),
        setting=None if setting is None else _real(setting, f"{name}.setting"),
        amplitude=_real(entry.get("amplitude", 0.0), f"{name}.amplitude"),
        cycle_s=cycle_s,
        phase=phase,
        noise=_real(entry.get("noise", 0.0), f"{name}.noise"),
        length=length,
        step=_real(entry.get("step", 0.0), f"{name}.step"),
        status=None if "status" not in entry else _status(entry["status"], f"{name}.status"),
        analog=None if "analog" not in entry else _alarm(entry["analog"], f"{name}.analog", digital=False),
        digital=None if "digital" not in entry else _alarm(entry["digital"], f"{name}.digital", digital=True),
    )


def _family(entry: dict[str, Any], first_index: int, default_period: int) -> DeviceFamily:
    prefix = entry.pop("prefix", None)
    digits = entry.pop("digits", 3)
    if not isinstance(prefix, str) or len(prefix) < 2 or prefix[1] != ":":
        raise ValueError(f"sim device table: family prefix {prefix!r} must start like 'Z:'")
    if isinstance(digits, bool) or not isinstance(digits, int) or not 1 <= digits <= 9:
        raise ValueError(f"sim device table: family {prefix} digits must be 1 to 9")
    count = entry.pop("count", 10**digits)
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= 10**digits:
        raise ValueError(f"sim device table: family {prefix} count must be 0 to {10**digits}")
    prefix = prefix.upper()
    template = _spec(prefix + "0" * digits, first_index, entry, default_period, family=True)
    try:
        template.description.format(index="0", name=prefix)
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"sim device table: family {prefix} description: only {{index}} and {{name}}") from exc
    return DeviceFamily(prefix, digits, count, first_index, template)
