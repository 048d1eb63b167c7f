"""SimBackend: simulated ACNET devices, no network, deterministic. The gateway's default backend.

Why async
---------
`SimBackend` is an `AsyncBackend`, not a sync `Backend`: reads and writes are pure computation
(no I/O to wait for), and subscriptions are timers. Timers on the event loop cost nothing while
they sleep and need no threads, locks or thread-safe hand-offs; a sync backend would need a
thread per timer (or a scheduler thread) and `call_soon_threadsafe` for every reading. All state
is touched only on the loop, so there is no locking anywhere.

Streaming uses one ticker task per distinct period, shared by every subscription that needs that
period. Each tick reads the clock once, computes every due reading (a DRF subscribed by several
handles is computed once per tick) and feeds each handle with one `_dispatch_many` call. A ticker
sleeps until an absolute deadline on the loop clock (`loop.call_at`), a multiple of its period
(the loop clock is the system's monotonic clock), so periods do not drift; a
ticker that falls behind by whole periods skips them instead of bursting. A ticker stops when no
subscription needs its period any more.

Device table
------------
Loaded from TOML: `sim_devices.toml` next to this module (package data) unless
`SimBackend(devices=...)` names another file (or passes the parsed mapping, or a `DeviceTable`)::

    [defaults]
    period_ms = 1000                  # default event rate (for @U and no event)

    [devices."M:OUTTMP"]              # canonical upper-case name
    description = "Outdoor temperature"   # DESCRIPTION property (TEXT)
    units = "DegF"                    # the .UNITS field, Reading.meta.units
    period_ms = 1000                  # this device's default event rate
    base = 0.0                        # READING centre of a read-only device
    setting = 72.5                    # initial SETTING: makes the device settable, and
                                      # its READING is then centred on the current setting
    amplitude = 2.0                   # READING = centre + amplitude*sin(2*pi*t/cycle_s + phase)
    cycle_s = 600.0                   #           + noise*u, u uniform in [-1, 1)
    phase = 0.0                       # radians, or "auto" (derived from the device name)
    noise = 0.05
    length = 16                       # present: a SCALAR_ARRAY device; element i is centred
    step = 0.5                        #   on centre + i*step, its sine shifted by 2*pi*i/length
    status = { on = true, ready = true, remote = true, positive = true, ramp = false }
    analog = { minimum = 40.0, maximum = 105.0, alarm_enable = true, abort = false,
               abort_inhibit = false, tries_needed = 2, tries_now = 0 }
    digital = { nominal = 3, mask = 3, alarm_enable = true, abort = false,
                abort_inhibit = false, tries_needed = 1, tries_now = 0 }

    [[families]]                      # generated devices, not listed one by one:
    prefix = "Z:SIM"                  # Z:SIM000 .. Z:SIM999
    digits = 3
    count = 1000
    description = "Load-test device {index}"   # {index} and {name} are filled in
    base = 5.0                        # ... and any other device key, shared by the members

Every key is optional; an unknown key is an error (it catches typos). A settable device cannot be
an array. The shipped table has M:OUTTMP (settable, sine around its setting, analog alarm),
G:AMANDA (~42.0), Z:ACLTST (settable, READING == SETTING exactly), B:HS23T (16-element array),
Z:SIMPS (power supply: status/control, analog and digital alarms) and the Z:SIM000..Z:SIM999
family.

Values
------
READING is SCALAR (a float) or SCALAR_ARRAY (a list of floats); SETTING a float; STATUS a
BASIC_STATUS dict of bools {on, ready, remote, positive, ramp}; ANALOG and DIGITAL dicts (ANALOG:
minimum, maximum, alarm_enable, alarm_status, abort, abort_inhibit, tries_needed, tries_now;
DIGITAL: nominal and mask instead of minimum and maximum); DESCRIPTION TEXT. CONTROL is write-only.
A device with a status reads 0.0 while it is off. `alarm_status` is computed at read time: analog,
enabled and any element of the READING outside [minimum, maximum]; digital, enabled and
`(status_bits ^ nominal) & mask != 0` with status bits on=1, ready=2, remote=4, positive=8,
ramp=16. The scaling is the identity: PRIMARY (VOLTS) equals SCALED (COMMON), RAW_MIN equals MIN.
RAW is the big-endian IEEE float64 of each element; a byte range `{off:len}` slices those bytes.
Array ranges `[n]`, `[a:b]` (inclusive), `[a:]`, `[:b]` select elements (a scalar device is a
one-element array). Status fields ON..RAMP read 1.0/0.0, BIT_VALUE the bits, TEXT/EXTENDED_TEXT a
summary, BIT_NAMES/BIT_VALUES text arrays. Alarm fields read scalars (NOM/TOL of an analog alarm
are the centre and half-width of [minimum, maximum]; FLAGS bits enable=1, status=2, abort=4,
abort_inhibit=8). `Reading.drf` is always the string the caller passed, `Reading.timestamp` a
timezone-aware UTC datetime from the clock, `Reading.meta` the device's DeviceMeta.

Determinism: the noise is a hash of (seed, device name, millisecond of the clock, element), not
a draw from a random generator. A generator's sequence depends on how many draws came before,
i.e. on the order and number of reads and subscriptions, which concurrency changes; the hash makes
every value a pure function of (seed, device state, clock time): the same seed and clock give the
same values whatever else happens, and two worker processes agree (a device that moves to another
worker keeps a continuous signal). The clock is injectable (`clock=`, a `time.time`-like callable
returning seconds since the epoch); it gives the values and timestamps. Tickers are scheduled on
the loop's own monotonic clock.

Reads
-----
`get_many` answers every DRF once, all at one clock time, whatever its event (the gateway sends
one-shot reads here; an @P DRF is read once too).

Writes
------
`write_many` applies the settings one after another, in call order. READING is written as SETTING
and STATUS as CONTROL (as `DRF.for_write` does); the event is ignored.

- SETTING: a real number (int or float, not bool, finite); later reads of SETTING return it and
  the READING is centred on it. No range, or one naming its single element (`[]`, `[0]`, `[0:0]`).
- CONTROL: a command as an int or a case-insensitive name, with the ordinals of pacsys's
  BasicControl: 0 RESET (ready), 1 ON, 2 OFF, 3 POSITIVE/POS, 4 NEGATIVE/NEG, 5 RAMP, 6 DC,
  7 LOCAL, 8 REMOTE, 9 TRIP (off and not ready).
- ANALOG / DIGITAL: a dict of some of the block's keys (alarm_status is computed and cannot be
  written), or a field (`Z:SIMPS.ANALOG.MAX`) with one value. Checked whole before it is applied.

Events (subscriptions)
----------------------
======================  ==========================================================================
`@P,f[,b]`              every period f (at least 1 ms: shorter periods are clamped)
`@Q,f[,b]`              every period f, only when the value changed (a constant sends once)
`b` TRUE                one reading at once, at subscribe time, then the periodic ones
`@U`, no event          the device's default period (`period_ms`, 1 s unless the table says)
`@E,02` `@E,0F` `@E,8F` 15 Hz (66.667 ms)  -- simulated clock-event rates; type and delay ignored
`@E,00`                 every 5 s
`@E,` anything else     1 Hz
`@S,...`                every 5 s (a simulated state transition; device/value/op are not checked)
`@I`, `@N`              one reading at subscribe time, then none
======================  ==========================================================================

Periodic ticks fall on whole multiples of the period on the monotonic clock, so the ticks of one
period coincide across subscriptions and across processes (a pool's workers send them together,
as a front-end would for one clock event). A DRF's first periodic reading comes at the next such
tick, within one period of subscribing; ask for `,TRUE` to get one at once.

Status codes (facility 17, DPM)
-------------------------------
A per-DRF problem is never an exception: it is an error `Reading` (or `WriteResult`). In a
subscription such a DRF gets one error reading and nothing more; the other DRFs go on.

- -26 no such device: unknown device; also a malformed DRF (except its event). The gateway refuses
  malformed DRFs before they reach a backend, so this only shows to direct library users.
- -33 bad event: a DRF whose event part is malformed.
- -27 no such property: the device lacks the property (SETTING of a read-only device, STATUS
  without a status...), CONTROL read, INDEX/LONG_NAME/ALARM_LIST_NAME/BIT_STATUS, a field that
  does not belong to the property, a data-source extra other than `<-LIVEDATA`.
- -28 bad range: a range outside the device's elements or on a property without elements; a
  written value of the wrong type, non-finite, or an unknown control command or alarm key.
- -45 internal: a bug in this module while computing a value (logged).

`close()` stops every ticker and ends every handle; afterwards `get_many`, `write_many` and
`subscribe` raise RuntimeError("backend is closed"). `close()` itself may be called again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import numbers
import os
import struct
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from importlib import resources
from typing import Any, TypeGuard

from pacsys import status as st
from pacsys.aio._backends import AsyncBackend
from pacsys.aio._subscription import AsyncSubscriptionHandle
from pacsys.drf import DRF, DRFError, Event, Field, Property, Range, parse_cached
from pacsys.types import BackendCapability, DeviceMeta, Reading, Value, ValueType, WriteResult

logger = logging.getLogger(__name__)

__all__ = [
    "CLOCK_EVENT_PERIODS_US",
    "DEFAULT_CLOCK_EVENT_PERIOD_US",
    "DEFAULT_PERIOD_US",
    "MIN_PERIOD_US",
    "STATE_EVENT_PERIOD_US",
    "DeviceFamily",
    "DeviceSpec",
    "DeviceTable",
    "SimBackend",
]

DEFAULT_PERIOD_US = 1_000_000
"""Default event rate of a device when the table gives none (1 s)."""
MIN_PERIOD_US = 1_000
"""Shortest period streamed; a shorter @P/@Q period is clamped to it (1 kHz)."""
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

_RAW_SIZE = 8  # bytes per element of the RAW field (a big-endian IEEE double)
_NOISE_QUANTUM_PER_S = 1000  # the noise changes once per millisecond of the clock
_TWO_PI = 2.0 * math.pi
_M64 = (1 << 64) - 1
_STATUS_KEYS = ("on", "ready", "remote", "positive", "ramp")
_STATUS_BITS = {"on": 1, "ready": 2, "remote": 4, "positive": 8, "ramp": 16}
_ALARM_FLAG_KEYS = ("alarm_enable", "abort", "abort_inhibit")
_ALARM_COUNT_KEYS = ("tries_needed", "tries_now")
_ANALOG_KEYS = (
    "minimum",
    "maximum",
    "alarm_enable",
    "alarm_status",
    "abort",
    "abort_inhibit",
    "tries_needed",
    "tries_now",
)
_DIGITAL_KEYS = (
    "nominal",
    "mask",
    "alarm_enable",
    "alarm_status",
    "abort",
    "abort_inhibit",
    "tries_needed",
    "tries_now",
)

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

# Basic control commands (ordinals of pacsys's BasicControl) and what each does to the status.
_CONTROL_NAMES: dict[str, int] = {
    "RESET": 0,
    "ON": 1,
    "OFF": 2,
    "POSITIVE": 3,
    "POS": 3,
    "NEGATIVE": 4,
    "NEG": 4,
    "RAMP": 5,
    "DC": 6,
    "LOCAL": 7,
    "REMOTE": 8,
    "TRIP": 9,
}
_CONTROL_EFFECTS: dict[int, dict[str, bool]] = {
    0: {"ready": True},
    1: {"on": True},
    2: {"on": False},
    3: {"positive": True},
    4: {"positive": False},
    5: {"ramp": True},
    6: {"ramp": False},
    7: {"remote": False},
    8: {"remote": True},
    9: {"on": False, "ready": False},
}

_STATUS_FIELDS = {
    Field.ON: "on",
    Field.READY: "ready",
    Field.REMOTE: "remote",
    Field.POSITIVE: "positive",
    Field.RAMP: "ramp",
}
_STATUS_ALL_FIELDS = frozenset(
    {
        None,
        Field.ALL,
        Field.TEXT,
        Field.EXTENDED_TEXT,
        Field.BIT_VALUE,
        Field.BIT_NAMES,
        Field.BIT_VALUES,
        *_STATUS_FIELDS,
    }
)
_VALUE_FIELDS = frozenset({None, Field.PRIMARY, Field.RAW, Field.UNITS})
# Alarm fields that name one key of the block, for reads and writes.
_ALARM_COMMON_FIELDS = {
    Field.ALARM_ENABLE: "alarm_enable",
    Field.ALARM_STATUS: "alarm_status",
    Field.ABORT: "abort",
    Field.ABORT_INHIBIT: "abort_inhibit",
    Field.TRIES_NEEDED: "tries_needed",
    Field.TRIES_NOW: "tries_now",
}
_ANALOG_FIELDS = {
    **_ALARM_COMMON_FIELDS,
    Field.MIN: "minimum",
    Field.RAW_MIN: "minimum",
    Field.MAX: "maximum",
    Field.RAW_MAX: "maximum",
}
_DIGITAL_FIELDS = {**_ALARM_COMMON_FIELDS, Field.NOM: "nominal", Field.MASK: "mask"}
_ANALOG_DERIVED_FIELDS = frozenset({Field.NOM, Field.RAW_NOM, Field.TOL, Field.RAW_TOL, Field.FLAGS})
_DIGITAL_DERIVED_FIELDS = frozenset({Field.FLAGS})


# --------------------------------------------------------------------------------------------
# The device table


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
        phase = _auto_phase(name) if math.isnan(template.phase) else template.phase
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
        return resources.files("pacsys.backends").joinpath("sim_devices.toml")

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
    block = _flags(value, where, _STATUS_KEYS, dict.fromkeys(_STATUS_KEYS, False))
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
    error = _check_alarm(block, digital)
    if error is not None:
        raise ValueError(f"sim device table: {where}: {error}")
    return _coerce_alarm(block, digital)


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
        phase = math.nan if family else _auto_phase(name)
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


def _name_key(*parts: object) -> int:
    text = "\x1f".join(repr(p) if not isinstance(p, str) else p for p in parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def _auto_phase(name: str) -> float:
    return (_name_key("phase", name) >> 11) / float(1 << 53) * _TWO_PI


def _unit_noise(key: int, tick: int, element: int) -> float:
    """A uniform value in [-1, 1): a splitmix64-style hash of (device key, tick, element)."""
    z = (key ^ (tick * 0x9E3779B97F4A7C15) ^ ((element + 1) * 0xC2B2AE3D27D4EB4F)) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    z ^= z >> 31
    return z / 9223372036854775808.0 - 1.0


# --------------------------------------------------------------------------------------------
# Value checks shared by the table loader and alarm writes


def _is_real(value: object) -> TypeGuard[numbers.Real]:
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(float(value))


def _is_integral(value: object) -> TypeGuard[numbers.Real]:
    return _is_real(value) and float(value).is_integer()


def _is_flag(value: object) -> bool:
    return isinstance(value, bool) or (_is_real(value) and float(value) in (0.0, 1.0))


def _check_alarm(block: Mapping[str, Any], digital: bool) -> str | None:
    """Why a complete alarm block is not valid, or None."""
    for key in _ALARM_FLAG_KEYS:
        if not _is_flag(block[key]):
            return f"{key} must be a bool"
    for key in _ALARM_COUNT_KEYS:
        if not (_is_integral(block[key]) and float(block[key]) >= 0):
            return f"{key} must be a non-negative integer"
    if digital:
        if not _is_integral(block["nominal"]):
            return "nominal must be an integer"
        if not (_is_integral(block["mask"]) and float(block["mask"]) >= 0):
            return "mask must be a non-negative integer"
    else:
        if not (_is_real(block["minimum"]) and _is_real(block["maximum"])):
            return "minimum and maximum must be finite numbers"
        if float(block["minimum"]) > float(block["maximum"]):
            return "minimum must not exceed maximum"
    return None


def _coerce_alarm(block: Mapping[str, Any], digital: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if digital:
        out["nominal"] = int(block["nominal"])
        out["mask"] = int(block["mask"])
    else:
        out["minimum"] = float(block["minimum"])
        out["maximum"] = float(block["maximum"])
    for key in _ALARM_FLAG_KEYS:
        out[key] = bool(block[key])
    for key in _ALARM_COUNT_KEYS:
        out[key] = int(block[key])
    return out


# --------------------------------------------------------------------------------------------
# Live state and resolved requests


class _Device:
    """A device's live state in one backend: its setting, status and alarm blocks."""

    __slots__ = ("spec", "key", "meta", "setting", "status", "analog", "digital", "elem_phase")

    def __init__(self, spec: DeviceSpec, seed: object):
        self.spec = spec
        self.key = _name_key("noise", seed, spec.name)
        self.meta = DeviceMeta(spec.index, spec.name, spec.description, spec.units)
        self.setting = spec.setting
        self.status = None if spec.status is None else dict(spec.status)
        self.analog = None if spec.analog is None else dict(spec.analog)
        self.digital = None if spec.digital is None else dict(spec.digital)
        self.elem_phase = _TWO_PI / spec.length if spec.length else 0.0

    def element(self, t: float, tick: int, i: int) -> float:
        status = self.status
        if status is not None and not status["on"]:
            return 0.0
        spec = self.spec
        setting = self.setting
        v = (spec.base if setting is None else setting) + i * spec.step
        if spec.amplitude:
            v += spec.amplitude * math.sin(_TWO_PI * t / spec.cycle_s + spec.phase + i * self.elem_phase)
        if spec.noise:
            v += spec.noise * _unit_noise(self.key, tick, i)
        return v

    def values(self, t: float) -> list[float]:
        """The READING at clock time t, one float per element (a scalar device has one)."""
        tick = math.floor(t * _NOISE_QUANTUM_PER_S)
        return [self.element(t, tick, i) for i in range(self.spec.length or 1)]

    def status_bits(self) -> int:
        status = self.status
        if status is None:
            return 0
        return sum(bit for key, bit in _STATUS_BITS.items() if status[key])

    def analog_block(self, t: float) -> dict[str, Any]:
        assert self.analog is not None
        block = dict(self.analog)
        lo, hi = block["minimum"], block["maximum"]
        block["alarm_status"] = block["alarm_enable"] and any(v < lo or v > hi for v in self.values(t))
        return {key: block[key] for key in _ANALOG_KEYS}

    def digital_block(self) -> dict[str, Any]:
        assert self.digital is not None
        block = dict(self.digital)
        block["alarm_status"] = block["alarm_enable"] and ((self.status_bits() ^ block["nominal"]) & block["mask"]) != 0
        return {key: block[key] for key in _DIGITAL_KEYS}


@dataclass(slots=True, eq=False)
class _Target:
    """A validated DRF: what to compute for it, every time it is due."""

    drf: str
    parsed: DRF
    dev: _Device
    prop: Property
    field: Field | None
    rng: Range | None
    plain_scalar: bool = False  # READING of a scalar device, no field, no range: the fast path


class _Problem(Exception):
    """A per-DRF failure: becomes an error reading or write result (never escapes)."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _timestamp(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


def _select(rng: Range | None, n: int, name: str) -> tuple[int, int, bool] | None:
    """(first, last, single) elements of an array range over n elements; None = whole."""
    if rng is None or rng.is_whole:
        return None
    start = rng.start if rng.start is not None else 0
    if rng.single:
        end = start
    else:
        end = rng.end if rng.end is not None else n - 1
    if start >= n or end >= n or end < start:
        raise _Problem(st.DPM_BAD_RANGE, f"range {rng} is outside {name}'s {n} element(s)")
    return start, end, rng.single


def _raw_bytes(values: list[float]) -> bytes:
    return struct.pack(f">{len(values)}d", *values)


def _flag_value(value: bool) -> float:
    return 1.0 if value else 0.0


def _alarm_flags(block: Mapping[str, Any]) -> float:
    return float(
        (1 if block["alarm_enable"] else 0)
        | (2 if block["alarm_status"] else 0)
        | (4 if block["abort"] else 0)
        | (8 if block["abort_inhibit"] else 0)
    )


def _status_text(status: Mapping[str, bool], extended: bool) -> str:
    if extended:
        words = [
            "On" if status["on"] else "Off",
            "Ready" if status["ready"] else "Tripped",
            "Remote" if status["remote"] else "Local",
            "Positive" if status["positive"] else "Negative",
            "Ramp" if status["ramp"] else "DC",
        ]
        return ", ".join(words)
    return "".join(
        [
            "." if status["on"] else "*",
            "." if status["ready"] else "T",
            "R" if status["remote"] else "L",
            "+" if status["positive"] else "-",
            "r" if status["ramp"] else "d",
        ]
    )


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
class _Entry:
    """One DRF of one subscription on a ticker."""

    target: _Target
    on_change: bool
    last: Any = _UNSET


class _Sub:
    """One backend subscription: a handle and the periods its DRFs are on."""

    __slots__ = ("handle", "callback", "on_error", "periods")

    def __init__(self, handle: AsyncSubscriptionHandle, callback: Any, on_error: Any):
        self.handle = handle
        self.callback = callback
        self.on_error = on_error
        self.periods: list[int] = []


class _Ticker:
    """Every subscribed DRF of one period, and the task that streams them."""

    __slots__ = ("period_us", "subs", "task")

    def __init__(self, period_us: int):
        self.period_us = period_us
        self.subs: dict[_Sub, list[_Entry]] = {}
        self.task: asyncio.Task[None] | None = None


# --------------------------------------------------------------------------------------------
# The backend


class SimBackend(AsyncBackend):
    """Simulated devices (see the module docstring): reads, writes and subscriptions."""

    def __init__(
        self,
        devices: str | os.PathLike[str] | Mapping[str, Any] | DeviceTable | None = None,
        seed: int | str = 0,
        clock: Callable[[], float] | None = None,
    ):
        self.table = devices if isinstance(devices, DeviceTable) else DeviceTable.load(devices)
        self.seed = seed
        self._clock: Callable[[], float] = clock if clock is not None else time.time
        self._devices: dict[str, _Device] = {}
        self._tickers: dict[int, _Ticker] = {}
        self._subs: dict[AsyncSubscriptionHandle, _Sub] = {}
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

    def _device(self, name: str) -> _Device | None:
        dev = self._devices.get(name)
        if dev is None:
            spec = self.table.lookup(name)
            if spec is None:
                return None
            dev = self._devices[name] = _Device(spec, self.seed)
        return dev

    def _parse(self, drf: str) -> DRF:
        try:
            return parse_cached(drf)
        except DRFError as exc:
            code = st.DPM_NO_SUCH_DEVICE
            if isinstance(drf, str) and exc.position is not None:
                at = drf.find("@", 2)  # the event's '@' (a '@' at 1 is the qualifier)
                extra = drf.find("<-")
                if 0 <= at < exc.position and (extra < 0 or exc.position < extra):
                    code = st.DPM_BAD_EVENT
            raise _Problem(code, str(exc)) from None

    def _lookup(self, parsed: DRF) -> _Device:
        if parsed.extra is not None and parsed.extra.name != "LIVEDATA":
            raise _Problem(st.DPM_NO_SUCH_PROPERTY, f"data source <-{parsed.extra.name} is not simulated")
        dev = self._device(parsed.device)
        if dev is None:
            raise _Problem(st.DPM_NO_SUCH_DEVICE, f"no such device {parsed.device}")
        return dev

    def _resolve(self, drf: str) -> _Target:
        """Validate a DRF for reading; raise _Problem when it can never be answered."""
        parsed = self._parse(drf)
        dev = self._lookup(parsed)
        spec = dev.spec
        prop, fld, rng = parsed.property, parsed.field, parsed.range

        def no_property() -> _Problem:
            return _Problem(st.DPM_NO_SUCH_PROPERTY, f"{spec.name} has no {prop.value} property")

        def bad_field() -> _Problem:
            return _Problem(st.DPM_NO_SUCH_PROPERTY, f"field {fld.value if fld else ''} does not apply to {prop.value}")

        if prop is Property.READING or prop is Property.SETTING:
            if prop is Property.SETTING and not spec.settable:
                raise no_property()
            if fld not in _VALUE_FIELDS:
                raise bad_field()
            if rng is not None:
                if fld is Field.UNITS:
                    raise _Problem(st.DPM_BAD_RANGE, "the UNITS field takes no range")
                n = spec.length or 1
                if rng.kind == "array":
                    _select(rng, n, spec.name)
                elif not rng.is_whole:
                    offset = rng.start or 0
                    size = _RAW_SIZE * n
                    length = (size - offset) if rng.single or rng.end is None else rng.end
                    if offset + length > size or offset >= size:
                        raise _Problem(st.DPM_BAD_RANGE, f"byte range {rng} is outside {spec.name}'s {size} bytes")
        elif prop is Property.STATUS:
            if dev.status is None:
                raise no_property()
            if fld not in _STATUS_ALL_FIELDS:
                raise bad_field()
        elif prop is Property.ANALOG:
            if dev.analog is None:
                raise no_property()
            if fld is not None and fld not in _ANALOG_FIELDS and fld not in _ANALOG_DERIVED_FIELDS:
                raise bad_field()
        elif prop is Property.DIGITAL:
            if dev.digital is None:
                raise no_property()
            if fld is not None and fld not in _DIGITAL_FIELDS and fld not in _DIGITAL_DERIVED_FIELDS:
                raise bad_field()
        elif prop is Property.DESCRIPTION:
            if fld is not None:
                raise bad_field()
        else:
            raise no_property()
        if rng is not None and prop is not Property.READING and prop is not Property.SETTING:
            raise _Problem(st.DPM_BAD_RANGE, f"{prop.value} takes no range")
        plain = prop is Property.READING and fld is None and rng is None and spec.length is None
        return _Target(drf, parsed, dev, prop, fld, rng, plain)

    def _compute(self, target: _Target, t: float, ts: datetime) -> Reading:
        """The reading of a validated DRF at clock time t."""
        dev, prop, fld = target.dev, target.prop, target.field
        drf, meta = target.drf, dev.meta
        if target.plain_scalar:
            value = dev.element(t, math.floor(t * _NOISE_QUANTUM_PER_S), 0)
            return Reading(drf, ValueType.SCALAR, value=value, timestamp=ts, meta=meta)
        if prop is Property.READING or prop is Property.SETTING:
            if fld is Field.UNITS:
                return Reading(drf, ValueType.TEXT, value=dev.spec.units or "", timestamp=ts, meta=meta)
            if prop is Property.READING:
                values = dev.values(t)
            else:
                assert dev.setting is not None
                values = [dev.setting]
            rng = target.rng
            if rng is not None and rng.kind == "byte":
                raw = _raw_bytes(values)
                if not rng.is_whole:
                    offset = rng.start or 0
                    raw = raw[offset:] if rng.single or rng.end is None else raw[offset : offset + rng.end]
                return Reading(drf, ValueType.RAW, value=raw, timestamp=ts, meta=meta)
            sel = _select(rng, len(values), dev.spec.name)
            if sel is not None:
                first, last, single = sel
                values = values[first : last + 1]
                scalar = single
            else:
                scalar = dev.spec.length is None
            if fld is Field.RAW:
                return Reading(drf, ValueType.RAW, value=_raw_bytes(values), timestamp=ts, meta=meta)
            if scalar:
                return Reading(drf, ValueType.SCALAR, value=values[0], timestamp=ts, meta=meta)
            return Reading(drf, ValueType.SCALAR_ARRAY, value=values, timestamp=ts, meta=meta)
        if prop is Property.STATUS:
            status = dev.status
            assert status is not None
            if fld is None or fld is Field.ALL:
                return Reading(drf, ValueType.BASIC_STATUS, value=dict(status), timestamp=ts, meta=meta)
            if fld in _STATUS_FIELDS:
                value = _flag_value(status[_STATUS_FIELDS[fld]])
                return Reading(drf, ValueType.SCALAR, value=value, timestamp=ts, meta=meta)
            if fld is Field.BIT_VALUE:
                return Reading(drf, ValueType.SCALAR, value=float(dev.status_bits()), timestamp=ts, meta=meta)
            if fld is Field.BIT_NAMES:
                return Reading(drf, ValueType.TEXT_ARRAY, value=list(_STATUS_KEYS), timestamp=ts, meta=meta)
            if fld is Field.BIT_VALUES:
                texts = [str(status[key]) for key in _STATUS_KEYS]
                return Reading(drf, ValueType.TEXT_ARRAY, value=texts, timestamp=ts, meta=meta)
            text = _status_text(status, extended=fld is Field.EXTENDED_TEXT)
            return Reading(drf, ValueType.TEXT, value=text, timestamp=ts, meta=meta)
        if prop is Property.ANALOG or prop is Property.DIGITAL:
            analog = prop is Property.ANALOG
            block = dev.analog_block(t) if analog else dev.digital_block()
            if fld is None:
                vt = ValueType.ANALOG_ALARM if analog else ValueType.DIGITAL_ALARM
                return Reading(drf, vt, value=block, timestamp=ts, meta=meta)
            fields = _ANALOG_FIELDS if analog else _DIGITAL_FIELDS
            if fld in fields:
                value = float(block[fields[fld]])
            elif fld is Field.FLAGS:
                value = _alarm_flags(block)
            elif fld is Field.NOM or fld is Field.RAW_NOM:
                value = (block["minimum"] + block["maximum"]) / 2.0
            else:  # TOL, RAW_TOL
                value = (block["maximum"] - block["minimum"]) / 2.0
            return Reading(drf, ValueType.SCALAR, value=value, timestamp=ts, meta=meta)
        # DESCRIPTION (the only other property _resolve lets through)
        return Reading(drf, ValueType.TEXT, value=dev.spec.description, timestamp=ts, meta=meta)

    @staticmethod
    def _error(drf: str, problem: _Problem, ts: datetime) -> Reading:
        return Reading(drf, facility_code=st.DPM, error_code=problem.code, message=problem.message, timestamp=ts)

    # -- reads -----------------------------------------------------------------------

    async def get_many(self, drfs: list[str], timeout: float | None = None) -> list[Reading]:
        """One reading per DRF, in order, all at one clock time; the event is ignored."""
        self._check_open()
        t = self._clock()
        ts = _timestamp(t)
        out = []
        for drf in drfs:
            try:
                out.append(self._compute(self._resolve(drf), t, ts))
            except _Problem as problem:
                out.append(self._error(drf, problem, ts))
            except Exception as exc:  # a bug here must not fail the other DRFs of the batch
                logger.exception("sim: reading %s failed", drf)
                out.append(self._error(drf, _Problem(st.DPM_INTERNAL, f"simulation failed: {exc}"), ts))
        return out

    # -- writes ----------------------------------------------------------------------

    async def write_many(self, settings: list[tuple[str, Value]], timeout: float | None = None) -> list[WriteResult]:
        """Apply the settings one after another, in order; one WriteResult each."""
        self._check_open()
        results = []
        for drf, value in settings:
            try:
                self._write(drf, value)
                results.append(WriteResult(drf))
            except _Problem as problem:
                results.append(WriteResult(drf, st.DPM, problem.code, problem.message))
        return results

    def _write(self, drf: str, value: Value) -> None:
        """Apply one setting, or raise _Problem and change nothing."""
        parsed = self._parse(drf).for_write()  # READING -> SETTING, STATUS -> CONTROL
        dev = self._lookup(parsed)
        spec = dev.spec
        prop, fld, rng = parsed.property, parsed.field, parsed.range
        present = {
            Property.SETTING: spec.settable,
            Property.CONTROL: dev.status is not None,
            Property.ANALOG: dev.analog is not None,
            Property.DIGITAL: dev.digital is not None,
        }.get(prop)
        if present is None:
            raise _Problem(st.DPM_NO_SUCH_PROPERTY, f"{prop.value} of {spec.name} cannot be set")
        if not present:
            raise _Problem(st.DPM_NO_SUCH_PROPERTY, f"{spec.name} has no {prop.value} property")
        if rng is not None and not (prop is Property.SETTING and _scalar_range(rng)):
            raise _Problem(st.DPM_BAD_RANGE, f"range {rng} cannot be set on {spec.name}.{prop.value}")
        if prop is Property.SETTING:
            if fld is not None and fld is not Field.PRIMARY:
                raise _Problem(st.DPM_NO_SUCH_PROPERTY, f"field {fld.value} of SETTING cannot be set")
            if not _is_real(value):
                raise _Problem(
                    st.DPM_BAD_RANGE, f"SETTING of {spec.name} takes a finite number, got {_describe(value)}"
                )
            dev.setting = float(value)
        elif prop is Property.CONTROL:
            assert dev.status is not None
            if fld is not None:
                raise _Problem(st.DPM_NO_SUCH_PROPERTY, f"field {fld.value} does not apply to CONTROL")
            dev.status.update(_CONTROL_EFFECTS[_control_command(value)])
        else:
            digital = prop is Property.DIGITAL
            block = dev.digital if digital else dev.analog
            assert block is not None
            if fld is None:
                if not isinstance(value, Mapping):
                    raise _Problem(st.DPM_BAD_RANGE, f"{prop.value} takes a dict of alarm keys, got {_describe(value)}")
                changes = dict(value)
            else:
                key = (_DIGITAL_FIELDS if digital else _ANALOG_FIELDS).get(fld)
                if key is None or key == "alarm_status":
                    raise _Problem(st.DPM_NO_SUCH_PROPERTY, f"field {fld.value} of {prop.value} cannot be set")
                changes = {key: value}
            unknown = set(changes) - set(block)  # alarm_status is computed: not in the block
            if unknown:
                raise _Problem(st.DPM_BAD_RANGE, f"cannot set {sorted(map(str, unknown))} of {prop.value}")
            merged = {**block, **changes}
            error = _check_alarm(merged, digital)
            if error is not None:
                raise _Problem(st.DPM_BAD_RANGE, f"{prop.value}: {error}")
            block.update(_coerce_alarm(merged, digital))

    # -- subscriptions ---------------------------------------------------------------

    def _schedule(self, event: Event | None, spec: DeviceSpec) -> tuple[int | None, bool, bool]:
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

    async def subscribe(self, drfs: list[str], callback: Any = None, on_error: Any = None) -> AsyncSubscriptionHandle:
        """Stream every DRF at its event's rate (see the module docstring).

        Iterate `handle.readings()`; or pass `callback(reading, handle)`, called on the loop for
        each reading instead of buffering it (an exception it raises goes to
        `on_error(exc, handle)`, or the log). Stop with `handle.stop()`.
        """
        self._check_open()
        handle = AsyncSubscriptionHandle(remover=self._remove)
        sub = _Sub(handle, callback, on_error)
        t = self._clock()
        ts = _timestamp(t)
        initial: list[Reading] = []
        by_period: dict[int, list[_Entry]] = {}
        for drf in drfs:
            try:
                target = self._resolve(drf)
            except _Problem as problem:
                initial.append(self._error(drf, problem, ts))
                continue
            period, immediate, on_change = self._schedule(target.parsed.event, target.dev.spec)
            entry = _Entry(target, on_change)
            if immediate:
                reading = self._compute(target, t, ts)
                initial.append(reading)
                entry.last = reading.value
            if period is not None:
                by_period.setdefault(period, []).append(entry)
        self._subs[handle] = sub
        for period, entries in by_period.items():
            ticker = self._tickers.get(period)
            if ticker is None:
                ticker = self._tickers[period] = _Ticker(period)
                ticker.task = asyncio.get_running_loop().create_task(
                    self._run_ticker(ticker), name=f"sim-ticker-{period}us"
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

    async def _run_ticker(self, ticker: _Ticker) -> None:
        loop = asyncio.get_running_loop()
        period = ticker.period_us / 1_000_000
        deadline = (loop.time() // period + 1) * period
        while True:
            await _sleep_until(loop, deadline)
            self._tick(ticker)
            deadline += period
            now = loop.time()
            if deadline <= now:  # fell behind by a whole period or more: skip, do not burst
                deadline += math.ceil((now - deadline) / period) * period
                if deadline <= now:
                    deadline += period

    def _tick(self, ticker: _Ticker) -> None:
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
                        reading = self._compute(entry.target, t, ts)
                    except Exception as exc:  # a bug here must not kill the ticker
                        logger.exception("sim: computing %s failed", drf)
                        reading = self._error(drf, _Problem(st.DPM_INTERNAL, f"simulation failed: {exc}"), ts)
                    cache[drf] = reading
                if entry.on_change:
                    if reading.value == entry.last:
                        continue
                    entry.last = reading.value
                out.append(reading)
            if out:
                self._deliver(sub, out)

    def _deliver(self, sub: _Sub, readings: list[Reading]) -> None:
        callback = sub.callback
        if callback is None:
            sub.handle._dispatch_many(readings)
            return
        for reading in readings:
            try:
                callback(reading, sub.handle)
            except Exception as exc:
                if sub.on_error is not None:
                    sub.on_error(exc, sub.handle)
                else:
                    logger.exception("sim: subscription callback failed")

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
            handle._signal_stop()
        current = asyncio.current_task()
        await asyncio.gather(*(task for task in tasks if task is not current), return_exceptions=True)


def _scalar_range(rng: Range) -> bool:
    """A range that names the one element of a scalar setting: [], [:], [0], [0:0]."""
    if rng.kind != "array":
        return False
    return rng.is_whole or (rng.start in (None, 0) and (rng.single or rng.end in (None, 0)))


def _control_command(value: object) -> int:
    if isinstance(value, str):
        command = _CONTROL_NAMES.get(value.strip().upper())
        if command is None:
            raise _Problem(st.DPM_BAD_RANGE, f"unknown control command {value!r}")
        return command
    if _is_integral(value) and int(float(value)) in _CONTROL_EFFECTS:
        return int(float(value))
    raise _Problem(st.DPM_BAD_RANGE, f"unknown control command {_describe(value)}")


def _describe(value: object) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"
