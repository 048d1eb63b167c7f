"""Writes: one setting applied to a device's live state, checked whole before anything changes."""

from __future__ import annotations

from collections.abc import Mapping

from pacsys import status as st
from pacsys.drf import Field, Property, Range
from pacsys.types import Value

from .properties import ANALOG_FIELDS, DIGITAL_FIELDS, DeviceLookup, Problem, lookup, parse
from .values import check_alarm, coerce_alarm, describe, is_integral, is_real

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


def apply_write(drf: str, value: Value, device: DeviceLookup) -> None:
    """Apply one setting, or raise Problem and change nothing."""
    parsed = parse(drf).for_write()  # READING -> SETTING, STATUS -> CONTROL
    dev = lookup(parsed, device)
    spec = dev.spec
    prop, fld, rng = parsed.property, parsed.field, parsed.range
    present = {
        Property.SETTING: spec.settable,
        Property.CONTROL: dev.status is not None,
        Property.ANALOG: dev.analog is not None,
        Property.DIGITAL: dev.digital is not None,
    }.get(prop)
    if present is None:
        raise Problem(st.DPM_NO_SUCH_PROPERTY, f"{prop.value} of {spec.name} cannot be set")
    if not present:
        raise Problem(st.DPM_NO_SUCH_PROPERTY, f"{spec.name} has no {prop.value} property")
    if rng is not None and not (prop is Property.SETTING and _scalar_range(rng)):
        raise Problem(st.DPM_BAD_RANGE, f"range {rng} cannot be set on {spec.name}.{prop.value}")
    if prop is Property.SETTING:
        if fld is not None and fld is not Field.PRIMARY:
            raise Problem(st.DPM_NO_SUCH_PROPERTY, f"field {fld.value} of SETTING cannot be set")
        if not is_real(value):
            raise Problem(st.DPM_BAD_RANGE, f"SETTING of {spec.name} takes a finite number, got {describe(value)}")
        dev.setting = float(value)
    elif prop is Property.CONTROL:
        assert dev.status is not None
        if fld is not None:
            raise Problem(st.DPM_NO_SUCH_PROPERTY, f"field {fld.value} does not apply to CONTROL")
        dev.status.update(_CONTROL_EFFECTS[_control_command(value)])
    else:
        digital = prop is Property.DIGITAL
        block = dev.digital if digital else dev.analog
        assert block is not None
        if fld is None:
            if not isinstance(value, Mapping):
                raise Problem(st.DPM_BAD_RANGE, f"{prop.value} takes a dict of alarm keys, got {describe(value)}")
            changes = dict(value)
        else:
            key = (DIGITAL_FIELDS if digital else ANALOG_FIELDS).get(fld)
            if key is None or key == "alarm_status":
                raise Problem(st.DPM_NO_SUCH_PROPERTY, f"field {fld.value} of {prop.value} cannot be set")
            changes = {key: value}
        unknown = set(changes) - set(block)  # alarm_status is computed: not in the block
        if unknown:
            raise Problem(st.DPM_BAD_RANGE, f"cannot set {sorted(map(str, unknown))} of {prop.value}")
        merged = {**block, **changes}
        error = check_alarm(merged, digital)
        if error is not None:
            raise Problem(st.DPM_BAD_RANGE, f"{prop.value}: {error}")
        block.update(coerce_alarm(merged, digital))


# -- subscriptions ---------------------------------------------------------------


def _scalar_range(rng: Range) -> bool:
    """A range that names the one element of a scalar setting: [], [:], [0], [0:0]."""
    if rng.kind != "array":
        return False
    return rng.is_whole or (rng.start in (None, 0) and (rng.single or rng.end in (None, 0)))


def _control_command(value: object) -> int:
    if isinstance(value, str):
        command = _CONTROL_NAMES.get(value.strip().upper())
        if command is None:
            raise Problem(st.DPM_BAD_RANGE, f"unknown control command {value!r}")
        return command
    if is_integral(value) and int(float(value)) in _CONTROL_EFFECTS:
        return int(float(value))
    raise Problem(st.DPM_BAD_RANGE, f"unknown control command {describe(value)}")
