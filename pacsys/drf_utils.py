"""Small DRF helpers for backends, policies and routing.

`get_device_name` and `prepare_for_write` behave as the pacsys release's do, also on a
string that is not a DRF at all: one that does not start with an ACNET device name (the
release takes it for an EPICS process variable, ``XF:31IDA-OP{Tbl-Ax:X1}Mtr``) is passed
on as written, neither upper-cased nor cut at a space. A string that starts with an ACNET
device name and does not parse is a malformed DRF: they raise ValueError (`DRFError`).
The gateway itself accepts DRFs only (`pacsys.drf`): these helpers are for code that
also handles other names. `guess_device_name` never raises, for policies and the audit
reader, which look at whatever a client sent.
"""

from __future__ import annotations

import re

from pacsys.drf import MAX_DRF_LENGTH, QUALIFIER_PROPERTY, DRFError, parse_cached
from pacsys.drf import prepare_for_write as prepare_drf_for_write

__all__ = ["get_device_name", "guess_device_name", "prepare_for_write"]

# An ACNET device name at the start of a string: a letter, 0 or #, a qualifier character,
# then name characters. Followed by the end or by where a DRF goes on (a property or field,
# a range, an event, an extra), it makes the string a DRF, well-formed or not.
_ACNET_START_RE = re.compile("[A-Za-z0#][" + re.escape("".join(QUALIFIER_PROPERTY)) + "][A-Za-z0-9_:-]+")
_DRF_GOES_ON = frozenset(".[{@<")
_SHORTEST_NAME = 3  # the release's shortest name (qualified ACNET names are at least this long)

# Where a device name ends in a string that is not a valid DRF (searched from index 2, since the
# qualifier at index 1 may itself be '@').
_NAME_END_RE = re.compile(r"[.\[{@<,\s]")
_UNPRINTABLE_RE = re.compile(r"[^\x20-\x7e]")


def _is_other_name(text: str) -> bool:
    """Whether a string that did not parse is no DRF at all, rather than a malformed one."""
    if len(text) < _SHORTEST_NAME or not text.strip():
        return False
    start = _ACNET_START_RE.match(text)
    return start is None or not (start.end() == len(text) or text[start.end()] in _DRF_GOES_ON)


def _split_other_name(text: str) -> tuple[str, str, str]:
    """(name, rest, extra) of a name that is no DRF: the rest (``.FIELD``, ``@EVENT``) starts at
    its first ``.`` or ``@`` after the shortest name, the extra at ``<-``. An event must be
    one a DRF could have: DRFError otherwise."""
    body, arrow, extra = text.partition("<-")
    ends = [i for i in (body.find(".", _SHORTEST_NAME), body.find("@", _SHORTEST_NAME)) if i >= 0]
    cut = min(ends, default=len(body))
    event = body[cut:].partition("@")[2]
    if event:
        try:
            parse_cached(f"Z:NAME@{event}")  # the event alone, checked by the DRF grammar
        except DRFError as exc:
            raise DRFError(text, exc.reason) from None
    return body[:cut], body[cut:], arrow + extra


def get_device_name(drf: str) -> str:
    """The device name of a DRF, canonical and upper-cased (``'m_outtmp.setting@p,1000'`` -> ``'M:OUTTMP'``).

    A string that is not a DRF gives its name as written (``'dev:pv_name.VAL'`` ->
    ``'dev:pv_name'``). ValueError for an empty string, one shorter than 3 characters, a
    malformed DRF (``'M:OUTTMP.FOO'``, ``'M:OUTTMP@X'``) and another name with a malformed
    event (``'dev:pv@X'``).
    """
    if not isinstance(drf, str) or not drf.strip():
        raise ValueError(f"{drf!r} is not a valid DRF: no device name")
    try:
        return parse_cached(drf).device
    except DRFError:
        if not _is_other_name(drf):
            raise
    return _split_other_name(drf)[0]


def prepare_for_write(drf: str) -> str:
    """The DRF to write to (``'M:OUTTMP'`` -> ``'M:OUTTMP.SETTING@N'``; see `pacsys.drf.prepare_for_write`).

    A string that is not a DRF keeps its name and field as written, its event replaced by
    ``@N`` (``'dev:pv.VAL@p,1000'`` -> ``'dev:pv.VAL@N'``). ValueError for a malformed DRF.
    """
    try:
        return prepare_drf_for_write(drf)
    except DRFError:
        if not isinstance(drf, str) or not _is_other_name(drf):
            raise
    name, rest, extra = _split_other_name(drf)
    return f"{name}{rest.partition('@')[0]}@N{extra}"


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
