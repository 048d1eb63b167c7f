"""Value checks and the status/alarm vocabulary, shared by the table loader and writes."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any, TypeGuard

STATUS_KEYS = ("on", "ready", "remote", "positive", "ramp")
STATUS_BITS = {"on": 1, "ready": 2, "remote": 4, "positive": 8, "ramp": 16}
ALARM_FLAG_KEYS = ("alarm_enable", "abort", "abort_inhibit")
ALARM_COUNT_KEYS = ("tries_needed", "tries_now")
ANALOG_KEYS = (
    "minimum",
    "maximum",
    "alarm_enable",
    "alarm_status",
    "abort",
    "abort_inhibit",
    "tries_needed",
    "tries_now",
)
DIGITAL_KEYS = (
    "nominal",
    "mask",
    "alarm_enable",
    "alarm_status",
    "abort",
    "abort_inhibit",
    "tries_needed",
    "tries_now",
)


def is_real(value: object) -> TypeGuard[numbers.Real]:
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(float(value))


def is_integral(value: object) -> TypeGuard[numbers.Real]:
    return is_real(value) and float(value).is_integer()


def is_flag(value: object) -> bool:
    return isinstance(value, bool) or (is_real(value) and float(value) in (0.0, 1.0))


def check_alarm(block: Mapping[str, Any], digital: bool) -> str | None:
    """Why a complete alarm block is not valid, or None."""
    for key in ALARM_FLAG_KEYS:
        if not is_flag(block[key]):
            return f"{key} must be a bool"
    for key in ALARM_COUNT_KEYS:
        if not (is_integral(block[key]) and float(block[key]) >= 0):
            return f"{key} must be a non-negative integer"
    if digital:
        if not is_integral(block["nominal"]):
            return "nominal must be an integer"
        if not (is_integral(block["mask"]) and float(block["mask"]) >= 0):
            return "mask must be a non-negative integer"
    else:
        if not (is_real(block["minimum"]) and is_real(block["maximum"])):
            return "minimum and maximum must be finite numbers"
        if float(block["minimum"]) > float(block["maximum"]):
            return "minimum must not exceed maximum"
    return None


def coerce_alarm(block: Mapping[str, Any], digital: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if digital:
        out["nominal"] = int(block["nominal"])
        out["mask"] = int(block["mask"])
    else:
        out["minimum"] = float(block["minimum"])
        out["maximum"] = float(block["maximum"])
    for key in ALARM_FLAG_KEYS:
        out[key] = bool(block[key])
    for key in ALARM_COUNT_KEYS:
        out[key] = int(block[key])
    return out


def describe(value: object) -> str:
    """A client value for an error message, bounded in length."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"
