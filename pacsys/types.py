"""Core value types shared by every backend, the gateway and the workers.

`Reading` and `WriteResult` are frozen: a reading may be fanned out to many client
streams and must never be changed by one of them.
"""

from __future__ import annotations

import base64
import sys
from dataclasses import dataclass
from datetime import datetime
from enum import Enum, Flag, auto
from typing import Any

from pacsys.drf_utils import guess_device_name

# A device value: a scalar, text, raw bytes, a list of floats or strings (a numpy
# array is accepted, and kept, where a list of floats is) or a dict (alarm blocks, basic status).
Value = float | int | str | bytes | list | dict | Any


def __getattr__(name: str) -> object:
    # The subscription callback types and CombinedStream live beside the handles they are
    # about (pacsys.backends); the pacsys release exports them here too.
    if name in ("ReadingCallback", "ErrorCallback", "CombinedStream"):
        import pacsys.backends

        return getattr(pacsys.backends, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class DispatchMode(Enum):
    """Where a sync backend runs subscription callbacks.

    WORKER: on a dedicated thread (a slow callback cannot stall the backend).
    DIRECT: inline on the thread that produced the reading.
    """

    WORKER = "worker"
    DIRECT = "direct"


class BackendCapability(Flag):
    """What a backend can do. The gateway answers UNIMPLEMENTED for what it cannot."""

    READ = auto()
    WRITE = auto()
    STREAM = auto()
    AUTH_KERBEROS = auto()
    AUTH_JWT = auto()
    BATCH = auto()


class ValueType(Enum):
    """The type of a reading's value; the names are the wire's `Value` oneof names."""

    SCALAR = "scalar"
    SCALAR_ARRAY = "scalarArr"
    TIMED_SCALAR_ARRAY = "timedScalarArr"
    RAW = "raw"
    TEXT = "text"
    TEXT_ARRAY = "textArr"
    ANALOG_ALARM = "anaAlarm"
    DIGITAL_ALARM = "digAlarm"
    BASIC_STATUS = "basicStatus"


@dataclass(frozen=True)
class DeviceMeta:
    """Device metadata as the DAQ services describe it."""

    device_index: int
    name: str
    description: str
    units: str | None = None
    format_hint: int | None = None

    def to_dict(self) -> dict:
        d: dict = {"device_index": self.device_index, "name": self.name, "description": self.description}
        if self.units is not None:
            d["units"] = self.units
        if self.format_hint is not None:
            d["format_hint"] = self.format_hint
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DeviceMeta:
        return cls(d["device_index"], d["name"], d["description"], d.get("units"), d.get("format_hint"))


def _is_ndarray(value: object) -> bool:
    # Only look for numpy if it is already imported: numpy is optional and heavy.
    np = sys.modules.get("numpy")
    return np is not None and isinstance(value, np.ndarray)


def normalize_value(value: object) -> object:
    """A numpy array becomes a list so values compare, hash and serialize plainly."""
    if _is_ndarray(value):
        return value.tolist()  # type: ignore[attr-defined]
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, bytearray):
        return bytes(value)
    return value


def _value_to_json(value: object) -> object:
    """`value` as JSON data: bytes as base64; numpy arrays and scalars, also inside dicts and lists, as lists and numbers."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, dict):
        return {k: _value_to_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_value_to_json(v) for v in value]
    if value is None or isinstance(value, str | int | float):
        return value
    tolist = getattr(value, "tolist", None)  # numpy, without importing it
    return tolist() if callable(tolist) else value


def _frozen(value: object) -> object:
    """A hashable stand-in for a value that compares equal exactly when the values are equal."""
    if isinstance(value, dict):
        return ("dict", frozenset((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return ("list", tuple(_frozen(v) for v in value))
    if _is_ndarray(value):
        return ("list", tuple(_frozen(v) for v in value.tolist()))  # type: ignore[attr-defined]
    return value


def _value_from_json(value: object, value_type: ValueType | None) -> object:
    if value_type is ValueType.RAW and isinstance(value, str):
        return base64.b64decode(value)
    return value


@dataclass(frozen=True, slots=True, eq=False)
class Reading:
    """One device reading: a status (facility + signed error code) and, when usable, a value.

    error_code 0 is success, above 0 a warning, below 0 an error. A numpy array value is
    kept as it is (numpy is optional: nothing here imports it); readings still compare and
    hash by value, arrays and dicts included.
    """

    drf: str
    value_type: ValueType | None = None
    facility_code: int = 0
    error_code: int = 0
    value: Value | None = None
    message: str | None = None
    timestamp: datetime | None = None
    cycle: int | None = None
    meta: DeviceMeta | None = None

    def __post_init__(self) -> None:
        value = self.value
        if value is not None:
            if self.value_type is None:
                raise ValueError("value_type is required when value is set")
            if isinstance(value, tuple | bytearray):
                object.__setattr__(self, "value", normalize_value(value))

    def _key(self) -> tuple:
        return (
            self.drf,
            self.value_type,
            self.facility_code,
            self.error_code,
            _frozen(self.value),
            self.message,
            self.timestamp,
            self.cycle,
            self.meta,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Reading):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    @property
    def is_success(self) -> bool:
        return self.error_code == 0

    @property
    def is_warning(self) -> bool:
        return self.error_code > 0

    @property
    def is_error(self) -> bool:
        return self.error_code < 0

    @property
    def ok(self) -> bool:
        """True when the data is usable: success or warning, and a value."""
        return self.error_code >= 0 and self.value is not None

    @property
    def name(self) -> str:
        return self.meta.name if self.meta else guess_device_name(self.drf)

    @property
    def units(self) -> str | None:
        return self.meta.units if self.meta else None

    def to_dict(self) -> dict:
        """A JSON-safe dict; `Reading.from_dict` restores an equal reading."""
        d: dict = {"drf": self.drf, "facility_code": self.facility_code, "error_code": self.error_code}
        if self.value_type is not None:
            d["value_type"] = self.value_type.value
        if self.value is not None:
            d["value"] = _value_to_json(self.value)
        if self.message is not None:
            d["message"] = self.message
        if self.timestamp is not None:
            d["timestamp"] = self.timestamp.isoformat()
        if self.cycle is not None:
            d["cycle"] = self.cycle
        if self.meta is not None:
            d["meta"] = self.meta.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Reading:
        vt = ValueType(d["value_type"]) if "value_type" in d else None
        return cls(
            drf=d["drf"],
            value_type=vt,
            facility_code=d.get("facility_code", 0),
            error_code=d.get("error_code", 0),
            value=_value_from_json(d.get("value"), vt),
            message=d.get("message"),
            timestamp=datetime.fromisoformat(d["timestamp"]) if "timestamp" in d else None,
            cycle=d.get("cycle"),
            meta=DeviceMeta.from_dict(d["meta"]) if "meta" in d else None,
        )


@dataclass(frozen=True, slots=True)
class WriteResult:
    """The outcome of one setting."""

    drf: str
    facility_code: int = 0
    error_code: int = 0
    message: str | None = None
    verified: bool | None = None
    readback: Value | None = None
    skipped: bool = False
    attempts: int = 0

    def __post_init__(self) -> None:
        if self.readback is not None:
            object.__setattr__(self, "readback", normalize_value(self.readback))

    @property
    def ok(self) -> bool:
        return self.error_code == 0

    @property
    def success(self) -> bool:
        return self.ok

    def to_dict(self) -> dict:
        """A JSON-safe dict, as the pacsys release writes it; `WriteResult.from_dict` restores an equal result.

        Bytes read back are written as base64 with ``"readback_type": "raw"`` to say so.
        """
        d: dict = {"drf": self.drf, "facility_code": self.facility_code, "error_code": self.error_code}
        for key in ("message", "verified", "readback"):
            if (v := getattr(self, key)) is not None:
                d[key] = _value_to_json(v)
        if isinstance(self.readback, bytes):
            d["readback_type"] = ValueType.RAW.value
        if self.skipped:
            d["skipped"] = True
        if self.attempts:
            d["attempts"] = self.attempts
        return d

    @classmethod
    def from_dict(cls, d: dict) -> WriteResult:
        """The result `to_dict` wrote (also the release's: its arrays come back as lists)."""
        readback_type = ValueType(d["readback_type"]) if "readback_type" in d else None
        return cls(
            drf=d["drf"],
            facility_code=d.get("facility_code", 0),
            error_code=d.get("error_code", 0),
            message=d.get("message"),
            verified=d.get("verified"),
            readback=_value_from_json(d.get("readback"), readback_type),
            skipped=d.get("skipped", False),
            attempts=d.get("attempts", 0),
        )


def infer_value_type(value: object) -> ValueType:
    """The ValueType a plain Python value is sent as."""
    value = normalize_value(value)
    if isinstance(value, bool | int | float):
        return ValueType.SCALAR
    if isinstance(value, str):
        return ValueType.TEXT
    if isinstance(value, bytes):
        return ValueType.RAW
    if isinstance(value, list):
        if value and all(isinstance(v, str) for v in value):
            return ValueType.TEXT_ARRAY
        return ValueType.SCALAR_ARRAY
    if isinstance(value, dict):
        if "nominal" in value or "mask" in value:
            return ValueType.DIGITAL_ALARM
        if "minimum" in value or "maximum" in value:
            return ValueType.ANALOG_ALARM
        return ValueType.BASIC_STATUS
    raise TypeError(f"unsupported value type {type(value).__name__}")
