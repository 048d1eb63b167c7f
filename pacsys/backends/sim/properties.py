"""Property evaluation: a DRF checked against a device (resolve), then read at a clock time (compute)."""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pacsys import status as st
from pacsys.drf import DRF, DRFError, Field, Property, Range, parse_cached
from pacsys.types import Reading, ValueType

from .device import Device
from .noise import NOISE_QUANTUM_PER_S
from .values import STATUS_KEYS

DeviceLookup = Callable[[str], Device | None]
"""A backend's devices by canonical name (None: no such device)."""

_RAW_SIZE = 8  # bytes per element of the RAW field (a big-endian IEEE double)

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
ANALOG_FIELDS = {
    **_ALARM_COMMON_FIELDS,
    Field.MIN: "minimum",
    Field.RAW_MIN: "minimum",
    Field.MAX: "maximum",
    Field.RAW_MAX: "maximum",
}
DIGITAL_FIELDS = {**_ALARM_COMMON_FIELDS, Field.NOM: "nominal", Field.MASK: "mask"}
_ANALOG_DERIVED_FIELDS = frozenset({Field.NOM, Field.RAW_NOM, Field.TOL, Field.RAW_TOL, Field.FLAGS})
_DIGITAL_DERIVED_FIELDS = frozenset({Field.FLAGS})


@dataclass(slots=True, eq=False)
class Target:
    """A validated DRF: what to compute for it, every time it is due."""

    drf: str
    parsed: DRF
    dev: Device
    prop: Property
    field: Field | None
    rng: Range | None
    plain_scalar: bool = False  # READING of a scalar device, no field, no range: the fast path


class Problem(Exception):
    """A per-DRF failure: becomes an error reading or write result (never escapes)."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


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
        raise Problem(st.DPM_BAD_RANGE, f"range {rng} is outside {name}'s {n} element(s)")
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


def parse(drf: str) -> DRF:
    """The parsed DRF, or Problem (a malformed event is DPM_BAD_EVENT, anything else DPM_NO_SUCH_DEVICE)."""
    try:
        return parse_cached(drf)
    except DRFError as exc:
        code = st.DPM_NO_SUCH_DEVICE
        if isinstance(drf, str) and exc.position is not None:
            at = drf.find("@", 2)  # the event's '@' (a '@' at 1 is the qualifier)
            extra = drf.find("<-")
            if 0 <= at < exc.position and (extra < 0 or exc.position < extra):
                code = st.DPM_BAD_EVENT
        raise Problem(code, str(exc)) from None


def lookup(parsed: DRF, device: DeviceLookup) -> Device:
    if parsed.extra is not None and parsed.extra.name != "LIVEDATA":
        raise Problem(st.DPM_NO_SUCH_PROPERTY, f"data source <-{parsed.extra.name} is not simulated")
    dev = device(parsed.device)
    if dev is None:
        raise Problem(st.DPM_NO_SUCH_DEVICE, f"no such device {parsed.device}")
    return dev


def resolve(drf: str, device: DeviceLookup) -> Target:
    """Validate a DRF for reading; raise Problem when it can never be answered."""
    parsed = parse(drf)
    dev = lookup(parsed, device)
    spec = dev.spec
    prop, fld, rng = parsed.property, parsed.field, parsed.range

    def no_property() -> Problem:
        return Problem(st.DPM_NO_SUCH_PROPERTY, f"{spec.name} has no {prop.value} property")

    def bad_field() -> Problem:
        return Problem(st.DPM_NO_SUCH_PROPERTY, f"field {fld.value if fld else ''} does not apply to {prop.value}")

    if prop is Property.READING or prop is Property.SETTING:
        if prop is Property.SETTING and not spec.settable:
            raise no_property()
        if fld not in _VALUE_FIELDS:
            raise bad_field()
        if rng is not None:
            if fld is Field.UNITS:
                raise Problem(st.DPM_BAD_RANGE, "the UNITS field takes no range")
            n = spec.length or 1
            if rng.kind == "array":
                _select(rng, n, spec.name)
            elif not rng.is_whole:
                offset = rng.start or 0
                size = _RAW_SIZE * n
                length = (size - offset) if rng.single or rng.end is None else rng.end
                if offset + length > size or offset >= size:
                    raise Problem(st.DPM_BAD_RANGE, f"byte range {rng} is outside {spec.name}'s {size} bytes")
    elif prop is Property.STATUS:
        if dev.status is None:
            raise no_property()
        if fld not in _STATUS_ALL_FIELDS:
            raise bad_field()
    elif prop is Property.ANALOG:
        if dev.analog is None:
            raise no_property()
        if fld is not None and fld not in ANALOG_FIELDS and fld not in _ANALOG_DERIVED_FIELDS:
            raise bad_field()
    elif prop is Property.DIGITAL:
        if dev.digital is None:
            raise no_property()
        if fld is not None and fld not in DIGITAL_FIELDS and fld not in _DIGITAL_DERIVED_FIELDS:
            raise bad_field()
    elif prop is Property.DESCRIPTION:
        if fld is not None:
            raise bad_field()
    else:
        raise no_property()
    if rng is not None and prop is not Property.READING and prop is not Property.SETTING:
        raise Problem(st.DPM_BAD_RANGE, f"{prop.value} takes no range")
    plain = prop is Property.READING and fld is None and rng is None and spec.length is None
    return Target(drf, parsed, dev, prop, fld, rng, plain)


def compute(target: Target, t: float, ts: datetime) -> Reading:
    """The reading of a validated DRF at clock time t."""
    dev, prop, fld = target.dev, target.prop, target.field
    drf, meta = target.drf, dev.meta
    if target.plain_scalar:
        value = dev.element(t, math.floor(t * NOISE_QUANTUM_PER_S), 0)
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
            return Reading(drf, ValueType.TEXT_ARRAY, value=list(STATUS_KEYS), timestamp=ts, meta=meta)
        if fld is Field.BIT_VALUES:
            texts = [str(status[key]) for key in STATUS_KEYS]
            return Reading(drf, ValueType.TEXT_ARRAY, value=texts, timestamp=ts, meta=meta)
        text = _status_text(status, extended=fld is Field.EXTENDED_TEXT)
        return Reading(drf, ValueType.TEXT, value=text, timestamp=ts, meta=meta)
    if prop is Property.ANALOG or prop is Property.DIGITAL:
        analog = prop is Property.ANALOG
        block = dev.analog_block(t) if analog else dev.digital_block()
        if fld is None:
            vt = ValueType.ANALOG_ALARM if analog else ValueType.DIGITAL_ALARM
            return Reading(drf, vt, value=block, timestamp=ts, meta=meta)
        fields = ANALOG_FIELDS if analog else DIGITAL_FIELDS
        if fld in fields:
            value = float(block[fields[fld]])
        elif fld is Field.FLAGS:
            value = _alarm_flags(block)
        elif fld is Field.NOM or fld is Field.RAW_NOM:
            value = (block["minimum"] + block["maximum"]) / 2.0
        else:  # TOL, RAW_TOL
            value = (block["maximum"] - block["minimum"]) / 2.0
        return Reading(drf, ValueType.SCALAR, value=value, timestamp=ts, meta=meta)
    # DESCRIPTION (the only other property resolve lets through)
    return Reading(drf, ValueType.TEXT, value=dev.spec.description, timestamp=ts, meta=meta)


def error_reading(drf: str, problem: Problem, ts: datetime) -> Reading:
    return Reading(drf, facility_code=st.DPM, error_code=problem.code, message=problem.message, timestamp=ts)


# -- reads -----------------------------------------------------------------------
