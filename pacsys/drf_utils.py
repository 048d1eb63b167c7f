"""Small DRF helpers for policies and routing."""

from __future__ import annotations

import re

from pacsys.drf import MAX_DRF_LENGTH, QUALIFIER_PROPERTY, DRFError, parse_cached

__all__ = ["get_device_name"]

# Where a device name ends in a string that is not a valid DRF (searched from index 2, since the
# qualifier at index 1 may itself be '@').
_NAME_END_RE = re.compile(r"[.\[{@<,\s]")
_UNPRINTABLE_RE = re.compile(r"[^\x20-\x7e]")


def get_device_name(drf: str) -> str:
    """The canonical, upper-cased device name of a DRF (``'m_outtmp.setting@p,1000'`` -> ``'M:OUTTMP'``).

    Never raises: for a string that does not parse, it returns a best-effort guess (characters other
    than printable ASCII dropped, then the text up to the first ``.``, ``[``, ``{``, ``@``, ``<``,
    ``,`` or space, upper-cased, qualifier replaced by ``:``), and ``''`` for anything that is not
    a str.
    """
    try:
        return parse_cached(drf).device
    except DRFError:
        pass
    except Exception:  # defensive: policies call this on arbitrary input
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
