"""Small DRF helpers for policies and routing."""

from __future__ import annotations

import re

from pacsys.drf import MAX_DRF_LENGTH, QUALIFIER_PROPERTY, DRFError, parse_cached, prepare_for_write

__all__ = ["get_device_name", "guess_device_name", "prepare_for_write"]

# Where a device name ends in a string that is not a valid DRF (searched from index 2, since the
# qualifier at index 1 may itself be '@').
_NAME_END_RE = re.compile(r"[.\[{@<,\s]")
_UNPRINTABLE_RE = re.compile(r"[^\x20-\x7e]")
_UNKNOWN_NAME = ("unknown property", "unknown field")


def get_device_name(drf: str) -> str:
    """The canonical, upper-cased device name of a DRF (``'m_outtmp.setting@p,1000'`` -> ``'M:OUTTMP'``).

    Raises ValueError, as the pacsys release does, for an empty DRF and for one that names an
    unknown property or field (``'M:OUTTMP.FOO'``). Any other string that does not parse gets
    the best guess of `guess_device_name`.
    """
    if not isinstance(drf, str) or not drf.strip():
        raise ValueError(f"{drf!r} is not a valid DRF: no device name")
    try:
        return parse_cached(drf).device
    except DRFError as exc:
        if exc.reason.startswith(_UNKNOWN_NAME):
            raise ValueError(str(exc)) from None
    return guess_device_name(drf)


def guess_device_name(drf: object) -> str:
    """The device name of a DRF, or a best-effort guess for any string; never raises.

    For anything that parses, the canonical name. Otherwise: characters other than printable
    ASCII dropped, then the text up to the first ``.``, ``[``, ``{``, ``@``, ``<``, ``,`` or space,
    upper-cased, qualifier replaced by ``:``; ``''`` for anything that is not a str. For
    policies and the audit reader, which look at whatever a client sent.
    """
    try:
        return parse_cached(drf).device  # type: ignore[arg-type]
    except Exception:  # DRFError, or anything on input that is not a str
        pass
    if not isinstance(drf, str):
        return ""
    text = _UNPRINTABLE_RE.sub("", drf[: 4 * MAX_DRF_LENGTH]).strip()
    if len(text) > 2:
        end = _NAME_END_RE.search(text, 2)
        if end is not None:
            text = text[: end.start()]
    if len(text) >= 2 and text[1] in QUALIFIER_PROPERTY:
        text = text[0] + ":" + text[2:]
    return text.upper()
