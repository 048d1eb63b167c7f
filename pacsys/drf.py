"""DRF (data request format) parser.

A DRF names what to read or set on ACNET and when::

    DEVICE[.PROPERTY][RANGE][.FIELD][@EVENT][<-EXTRA]

The grammar it accepts is described in ``docs/drf.md``.  This
module turns a DRF string into an immutable :class:`DRF` value, or raises :class:`DRFError` -- the
only exception :func:`parse` ever raises, whatever it is given.

Design notes
------------
* Speed: the gRPC front parses every DRF of every request, so :func:`parse` is a hand-written
  scanner driven by a few precompiled regular expressions anchored at a position (``match(text,
  pos, endpos)``), without slicing the input more than needed.  Valid events take a one-regex fast
  path; only invalid ones go through the slower code that explains what is wrong.  Results are
  built without the frozen dataclasses' costly ``__init__`` (see "Fast construction" below).
  :func:`parse_cached` adds a bounded LRU cache on top, since the same DRFs come again and again.
  ``benchmarks/bench_drf.py`` measures it.
* Canonical form (:attr:`DRF.canonical`, also ``str(drf)``) is one spelling per meaning:

  - the device with ``:`` as qualifier, upper-cased (``m_outtmp`` -> ``M:OUTTMP``);
  - the property always written, by its full name (``.READING``, ``.SETTING``...);
  - the range as written, except that the whole range is always ``[]`` / ``{}``;
  - the field by its full name, and **omitted when it is the property's default** (``SCALED`` for
    READING/SETTING, ``ALL`` for ANALOG/DIGITAL).  The parser stores such a field as ``None`` too,
    so ``M:OUTTMP`` and ``M:OUTTMP.READING.SCALED`` are equal DRFs;
  - events upper-cased with times in milliseconds when whole (``@P,10H`` -> ``@P,100``), else with
    the ``U`` unit (``@P,3H`` -> ``@P,333333U``); ``@P`` alone -> ``@P,1000``; the immediate flag
    as ``TRUE``/``FALSE`` only when it was given; clock events in upper-case hex;
  - ``@U`` is kept when written (it is not folded into "no event"), both mean the device default;
  - the extra's name upper-cased, its parameters verbatim.

  Parsing the canonical form gives back an equal :class:`DRF`, and canonicalisation is idempotent.
* Stricter than the spec, on purpose (the spec leaves these open): the whole DRF must be printable
  ASCII; every integer literal (range bounds, times, clock event numbers, state values) and every
  duration after unit conversion is capped at 2**31-1 (milliseconds for durations); an array range
  whose end precedes its start is refused; a frequency of 0 (``0H``/``0K``) is refused.
* Lenient where the spec is silent: fields are not checked against the property (``.MIN`` on a
  READING is accepted), and an extra's parameters are passed on verbatim (the backend judges them).
* ``VOLTS`` is an alias of ``PRIMARY`` and ``COMMON`` of ``SCALED`` (as in the DRF2 reference
  implementation), so they share a :class:`Field` member.
"""

from __future__ import annotations

import builtins
import dataclasses
import functools
import re
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal, NoReturn, cast

__all__ = [
    "DEFAULT_FIELD",
    "DRF",
    "EXTRA_NAMES",
    "FIELD_ALIASES",
    "MAX_DRF_LENGTH",
    "PROPERTY_ALIASES",
    "QUALIFIER_PROPERTY",
    "DRFError",
    "Event",
    "Extra",
    "Field",
    "Property",
    "Range",
    "canonical",
    "is_oneshot",
    "parse",
    "parse_cached",
    "prepare_for_write",
]

#: Longest DRF accepted (our own limit, not part of DRF itself).
MAX_DRF_LENGTH = 512

#: Largest integer literal / duration (in ms) accepted anywhere in a DRF (Java ``int`` range).
_MAX_INT = 2**31 - 1
_MAX_DIGITS = 10  # more digits than this can never fit _MAX_INT (leading zeros aside)


# --------------------------------------------------------------------------------------------
# Error


class DRFError(ValueError):
    """A DRF could not be parsed.

    ``drf`` is the offending input (a ``repr`` of it when it was not a string), ``position`` the
    index into it where the problem was found (``None`` when it concerns the whole string), and
    ``reason`` a short human-readable explanation.
    """

    drf: str
    reason: str
    position: int | None

    def __init__(self, drf: str, reason: str, position: int | None = None) -> None:
        self.drf = drf
        self.reason = reason
        self.position = position
        shown = drf if len(drf) <= 100 else drf[:100] + "..."
        where = "" if position is None else f" (at {position})"
        super().__init__(f"invalid DRF {shown!r}: {reason}{where}")

    def __reduce__(self) -> tuple[type[DRFError], tuple[str, str, int | None]]:
        # Keeps the error picklable (it crosses process boundaries with the workers).
        return (type(self), (self.drf, self.reason, self.position))


def _fail(text: str, reason: str, position: int | None) -> NoReturn:
    raise DRFError(text, reason, position)


# --------------------------------------------------------------------------------------------
# Enumerations


class Property(Enum):
    """The DRF properties; the value is the canonical spelling."""

    READING = "READING"
    SETTING = "SETTING"
    STATUS = "STATUS"
    CONTROL = "CONTROL"
    ANALOG = "ANALOG"
    DIGITAL = "DIGITAL"
    DESCRIPTION = "DESCRIPTION"
    INDEX = "INDEX"
    LONG_NAME = "LONG_NAME"
    ALARM_LIST_NAME = "ALARM_LIST_NAME"
    BIT_STATUS = "BIT_STATUS"


class Field(Enum):
    """The DRF fields; the value is the canonical spelling.  Aliases (``VOLTS``, ``MINIMUM``,
    ``ENABLE``, ``STATUS`` after a property...) map onto these members, see ``FIELD_ALIASES``."""

    # reading / setting
    RAW = "RAW"
    PRIMARY = "PRIMARY"  # alias VOLTS
    SCALED = "SCALED"  # alias COMMON
    UNITS = "UNITS"
    # status
    ALL = "ALL"
    TEXT = "TEXT"
    EXTENDED_TEXT = "EXTENDED_TEXT"
    ON = "ON"
    READY = "READY"
    REMOTE = "REMOTE"
    POSITIVE = "POSITIVE"
    RAMP = "RAMP"
    BIT_VALUE = "BIT_VALUE"
    BIT_NAMES = "BIT_NAMES"
    BIT_VALUES = "BIT_VALUES"
    # alarm blocks
    MIN = "MIN"
    MAX = "MAX"
    NOM = "NOM"
    TOL = "TOL"
    RAW_MIN = "RAW_MIN"
    RAW_MAX = "RAW_MAX"
    RAW_NOM = "RAW_NOM"
    RAW_TOL = "RAW_TOL"
    ALARM_ENABLE = "ALARM_ENABLE"
    ALARM_STATUS = "ALARM_STATUS"
    TRIES_NEEDED = "TRIES_NEEDED"
    TRIES_NOW = "TRIES_NOW"
    ALARM_FTD = "ALARM_FTD"
    ABORT = "ABORT"
    ABORT_INHIBIT = "ABORT_INHIBIT"
    FLAGS = "FLAGS"
    MASK = "MASK"


#: Every accepted spelling (upper case) of each property.
PROPERTY_ALIASES: dict[str, Property] = {
    "READING": Property.READING,
    "READ": Property.READING,
    "PRREAD": Property.READING,
    "SETTING": Property.SETTING,
    "SET": Property.SETTING,
    "PRSET": Property.SETTING,
    "STATUS": Property.STATUS,
    "BASIC_STATUS": Property.STATUS,
    "STS": Property.STATUS,
    "PRBSTS": Property.STATUS,
    "CONTROL": Property.CONTROL,
    "BASIC_CONTROL": Property.CONTROL,
    "CTRL": Property.CONTROL,
    "PRBCTL": Property.CONTROL,
    "ANALOG": Property.ANALOG,
    "ANALOG_ALARM": Property.ANALOG,
    "AA": Property.ANALOG,
    "PRANAB": Property.ANALOG,
    "DIGITAL": Property.DIGITAL,
    "DIGITAL_ALARM": Property.DIGITAL,
    "DA": Property.DIGITAL,
    "PRDABL": Property.DIGITAL,
    "DESCRIPTION": Property.DESCRIPTION,
    "DESC": Property.DESCRIPTION,
    "PRDESC": Property.DESCRIPTION,
    "INDEX": Property.INDEX,
    "IDX": Property.INDEX,
    "PRIDX": Property.INDEX,
    "LONG_NAME": Property.LONG_NAME,
    "LNGNAM": Property.LONG_NAME,
    "PRLNAM": Property.LONG_NAME,
    "ALARM_LIST_NAME": Property.ALARM_LIST_NAME,
    "LSTNAM": Property.ALARM_LIST_NAME,
    "PRALNM": Property.ALARM_LIST_NAME,
    "BIT_STATUS": Property.BIT_STATUS,
    "BITSTATUS": Property.BIT_STATUS,
}

#: Every accepted spelling (upper case) of each field.
FIELD_ALIASES: dict[str, Field] = {member.value: member for member in Field}
FIELD_ALIASES.update(
    {
        "VOLTS": Field.PRIMARY,
        "COMMON": Field.SCALED,
        "MINIMUM": Field.MIN,
        "MAXIMUM": Field.MAX,
        "NOMINAL": Field.NOM,
        "TOLERANCE": Field.TOL,
        "ENABLE": Field.ALARM_ENABLE,
        "STATUS": Field.ALARM_STATUS,
        "FTD": Field.ALARM_FTD,
    }
)

#: The property implied by the qualifier (second character of the device name).
QUALIFIER_PROPERTY: dict[str, Property] = {
    ":": Property.READING,
    "?": Property.READING,
    "_": Property.SETTING,
    "|": Property.STATUS,
    "&": Property.CONTROL,
    "@": Property.ANALOG,
    "$": Property.DIGITAL,
    "~": Property.DESCRIPTION,
    "^": Property.INDEX,
    "#": Property.LONG_NAME,
    "!": Property.ALARM_LIST_NAME,
}

#: The field a property means when none is written; such a field is stored as ``None``.
DEFAULT_FIELD: dict[Property, Field] = {
    Property.READING: Field.SCALED,
    Property.SETTING: Field.SCALED,
    Property.ANALOG: Field.ALL,
    Property.DIGITAL: Field.ALL,
}

# Keyed by the property's value (a str): Enum hashing is slow.
_WRITE_PROPERTY: dict[str, Property] = {
    "READING": Property.SETTING,
    "STATUS": Property.CONTROL,
}


def _is_default_field(prop: Property, field: Field) -> bool:
    """Whether ``field`` is what ``prop`` means without a field (identity tests: Enum hashing is
    slow, so this avoids a DEFAULT_FIELD lookup on the hot path)."""
    if field is Field.SCALED:
        return prop is Property.READING or prop is Property.SETTING
    if field is Field.ALL:
        return prop is Property.ANALOG or prop is Property.DIGITAL
    return False


#: Names accepted after ``<-``.
EXTRA_NAMES: frozenset[str] = frozenset(
    {"FTP", "LIVEDATA", "LOGGER", "LOGGERSINGLE", "LOGGERDURATION", "SRFILE", "SDAFILE", "REDIR", "MIRROR"}
)

_STATE_OPS: frozenset[str] = frozenset({"=", "!=", "*", ">", "<", "<=", ">="})
_BOOLS: dict[str, bool] = {"T": True, "TRUE": True, "F": False, "FALSE": False}


# --------------------------------------------------------------------------------------------
# Value types


@dataclass(frozen=True, slots=True)
class Range:
    """An array range ``[...]`` or a byte range ``{...}``.

    * whole (``[]``, ``[:]``, ``{}``, ``{:}``): ``start`` and ``end`` are ``None``;
    * one element (``[n]``) or an offset alone (``{off}``): ``start=n``, ``end=None``, ``single=True``;
    * a slice (``[a:b]``, ``[a:]``, ``[:b]``, ``{off:len}``...): ``start``/``end`` as written
      (``None`` where omitted), ``single=False``.  For byte ranges ``end`` holds the *length*.
    """

    kind: Literal["array", "byte"]
    start: int | None = None
    end: int | None = None
    single: bool = False

    @property
    def is_whole(self) -> bool:
        return self.start is None and self.end is None

    def __str__(self) -> str:
        opening, closing = ("[", "]") if self.kind == "array" else ("{", "}")
        if self.single:
            return f"{opening}{self.start}{closing}"
        if self.start is None and self.end is None:
            return opening + closing
        first = "" if self.start is None else str(self.start)
        second = "" if self.end is None else str(self.end)
        return f"{opening}{first}:{second}{closing}"


@dataclass(frozen=True, slots=True)
class Event:
    """When data is wanted (``@...``).

    ``kind`` is one of ``U`` (device default), ``I`` (immediate), ``N`` (never), ``P`` (periodic),
    ``Q`` (periodic when changed), ``E`` (clock event), ``S`` (state event).  Times are integers in
    microseconds.

    * P/Q: ``period`` (µs; 1 s when not written) and ``immediate`` (the optional T/F flag, ``None``
      when not written).
    * E: ``clock_event`` (the event number), ``clock_type`` (``'H'``, ``'S'``, ``'E'`` or ``None``)
      and ``delay`` (µs or ``None``).
    * S: ``device`` (canonical name), ``value``, ``delay`` (µs) and ``op`` (``= != * > < <= >=``).
    """

    kind: str
    period: int | None = None
    immediate: bool | None = None
    clock_event: int | None = None
    clock_type: str | None = None
    delay: int | None = None
    device: str | None = None
    value: int | None = None
    op: str | None = None

    @property
    def is_oneshot(self) -> bool:
        """True for ``@I`` and ``@N`` (one reply, or none); every other event is a subscription."""
        return self.kind == "I" or self.kind == "N"

    def __str__(self) -> str:
        """The canonical spelling, without the leading ``@``."""
        kind = self.kind
        if kind == "P" or kind == "Q":
            text = f"{kind},{_format_time(self.period if self.period is not None else 1_000_000)}"
            if self.immediate is not None:
                text += ",TRUE" if self.immediate else ",FALSE"
            return text
        if kind == "E":
            text = f"E,{self.clock_event or 0:X}"
            if self.clock_type is not None:
                text += "," + self.clock_type
                if self.delay is not None:
                    text += "," + _format_time(self.delay)
            return text
        if kind == "S":
            return f"S,{self.device},{self.value},{_format_time(self.delay or 0)},{self.op}"
        return kind


@dataclass(frozen=True, slots=True)
class Extra:
    """``<-NAME...``: ``name`` upper-cased, ``params`` everything after the name, verbatim
    (e.g. ``':1000:2000'`` for ``<-LOGGER:1000:2000``, ``''`` when there is none)."""

    name: str
    params: str = ""

    def __str__(self) -> str:
        return self.name + self.params


@dataclass(frozen=True, slots=True)
class DRF:
    """A parsed DRF.  Build one with :func:`parse` (the constructor does not validate)."""

    device: str
    """Canonical device name: qualifier replaced by ``:``, upper-cased (``M:OUTTMP``)."""
    property: Property
    range: Range | None = None
    field: Field | None = None
    """``None`` means the property's default field."""
    event: Event | None = None
    """``None`` means no event was written: the device default, a subscription."""
    extra: Extra | None = None

    # ``property`` is a field name here, so the decorator is spelled ``builtins.property``.
    @builtins.property
    def is_oneshot(self) -> bool:
        """True only for ``@I`` and ``@N``."""
        event = self.event
        return event is not None and (event.kind == "I" or event.kind == "N")

    @builtins.property
    def canonical(self) -> str:
        """One canonical spelling (see the module notes); parses back to an equal DRF."""
        text = self.device + "." + self.property.value
        if self.range is not None:
            text += str(self.range)
        field = self.field
        if field is not None and not _is_default_field(self.property, field):
            text += "." + field.value
        if self.event is not None:
            text += "@" + str(self.event)
        if self.extra is not None:
            text += "<-" + self.extra.name + self.extra.params
        return text

    def for_write(self) -> DRF:
        """This DRF prepared for a write: READING -> SETTING, STATUS -> CONTROL, event ``@N``.

        A status field other than RAW (``.ON``, ``.READY``...) names a bit to read; a CONTROL
        write takes the whole command, so the field is dropped (``M:OUTTMP.STATUS.ON`` ->
        ``M:OUTTMP.CONTROL@N``), as the pacsys release does.
        """
        prop = _WRITE_PROPERTY.get(self.property.value, self.property)
        field = self.field
        if prop is Property.CONTROL and field is not None and field is not Field.RAW:
            field = None
        return _make_drf(self.device, prop, self.range, field, _NEVER, self.extra)

    def __str__(self) -> str:
        return self.canonical


# Fast construction.  A frozen dataclass's __init__ assigns every field through
# object.__setattr__, which costs about as much as all the scanning of a parse.  The parser builds
# instances through a mutable "builder" twin instead: a plain class with the very same __slots__,
# whose ordinary __init__ fills them, and whose instance is then re-tagged as the frozen class
# (``__class__`` assignment, allowed between classes of identical slot layout).  The result is
# exactly what the dataclass __init__ would have produced -- same class, same field values -- so
# equality, hashing, repr and pickling are unaffected; _check_builder() verifies this at import.


class _DRFBuilder:
    __slots__ = ("device", "property", "range", "field", "event", "extra")

    def __init__(
        self,
        device: str,
        prop: Property,
        rng: Range | None,
        field: Field | None,
        event: Event | None,
        extra: Extra | None,
    ) -> None:
        self.device = device
        self.property = prop
        self.range = rng
        self.field = field
        self.event = event
        self.extra = extra


class _EventBuilder:
    __slots__ = ("kind", "period", "immediate", "clock_event", "clock_type", "delay", "device", "value", "op")

    def __init__(
        self,
        kind: str,
        period: int | None,
        immediate: bool | None,
        clock_event: int | None,
        clock_type: str | None,
        delay: int | None,
        device: str | None,
        value: int | None,
        op: str | None,
    ) -> None:
        self.kind = kind
        self.period = period
        self.immediate = immediate
        self.clock_event = clock_event
        self.clock_type = clock_type
        self.delay = delay
        self.device = device
        self.value = value
        self.op = op


class _RangeBuilder:
    __slots__ = ("kind", "start", "end", "single")

    def __init__(self, kind: str, start: int | None, end: int | None, single: bool) -> None:
        self.kind = kind
        self.start = start
        self.end = end
        self.single = single


def _make_drf(
    device: str, prop: Property, rng: Range | None, field: Field | None, event: Event | None, extra: Extra | None
) -> DRF:
    obj: Any = _DRFBuilder(device, prop, rng, field, event, extra)
    obj.__class__ = DRF
    return cast(DRF, obj)


def _make_event(
    kind: str,
    period: int | None,
    immediate: bool | None,
    clock_event: int | None,
    clock_type: str | None,
    delay: int | None,
    device: str | None,
    value: int | None,
    op: str | None,
) -> Event:
    obj: Any = _EventBuilder(kind, period, immediate, clock_event, clock_type, delay, device, value, op)
    obj.__class__ = Event
    return cast(Event, obj)


def _make_range(kind: Literal["array", "byte"], start: int | None, end: int | None, single: bool) -> Range:
    obj: Any = _RangeBuilder(kind, start, end, single)
    obj.__class__ = Range
    return cast(Range, obj)


def _check_builder(cls: type, builder: type, make: Any, values: tuple[Any, ...]) -> None:
    names = tuple(f.name for f in dataclasses.fields(cls))
    if getattr(builder, "__slots__", None) != names or getattr(cls, "__slots__", None) != names:
        raise RuntimeError(f"{builder.__name__} no longer matches {cls.__name__}")  # guards future edits
    built = make(*values)
    if type(built) is not cls or built != cls(*values) or hash(built) != hash(cls(*values)):
        raise RuntimeError(f"{builder.__name__} does not build {cls.__name__} faithfully")


_check_builder(Range, _RangeBuilder, _make_range, ("array", 1, 2, False))
_check_builder(Event, _EventBuilder, _make_event, ("S", None, None, None, None, 5, "G:AMANDA", 1, "="))
_check_builder(DRF, _DRFBuilder, _make_drf, ("M:OUTTMP", Property.READING, Range("byte"), Field.RAW, None, None))


# Shared immutable instances (no need to build them on every parse).
_NEVER = Event("N")
_SIMPLE_EVENTS: dict[str, Event] = {"U": Event("U"), "I": Event("I"), "N": _NEVER}
_SIMPLE_EVENTS.update({letter.lower(): event for letter, event in _SIMPLE_EVENTS.items()})
_DEFAULT_PERIODIC: dict[str, Event] = {"P": Event("P", period=1_000_000), "Q": Event("Q", period=1_000_000)}
_WHOLE_ARRAY = Range("array")
_WHOLE_BYTES = Range("byte")


# --------------------------------------------------------------------------------------------
# Scanner

_BAD_CHAR_RE = re.compile(r"[^\x20-\x7e]")
_DEVICE_RE = re.compile(r"[A-Za-z0#][:?_|&@$~^#!][A-Za-z0-9_:\-]*")
_WORD_RE = re.compile(r"[A-Za-z0-9_]+")
_ARRAY_RE = re.compile(r"\[([0-9]*)(?:(:)([0-9]*))?\]")
_BYTE_RE = re.compile(r"\{([0-9]*)(?:(:)([0-9]*))?\}")
_TIME_RE = re.compile(r"([0-9]+)([MmSsUuHhKk]?)")
_HEX_RE = re.compile(r"[0-9A-Fa-f]+")
_DIGITS_RE = re.compile(r"[0-9]+")
# Whole events, for the fast path; when one does not match, _event_error() finds out why.
_PQ_RE = re.compile(r"[PpQq](?:,([0-9]+)([MmSsUuHhKk]?)(?:,([Tt]|[Ff]|[Tt][Rr][Uu][Ee]|[Ff][Aa][Ll][Ss][Ee]))?)?")
_E_RE = re.compile(r"[Ee],([0-9A-Fa-f]+)(?:,([HhSsEe])(?:,([0-9]+)([MmSsUuHhKk]?))?)?")
_S_RE = re.compile(
    r"[Ss],([A-Za-z0#][:?_|&@$~^#!][A-Za-z0-9_:\-]{1,62}),([0-9]+),([0-9]+)([MmSsUuHhKk]?),(!=|<=|>=|[=*<>])"
)

_MAX_NAME = 62  # characters after the qualifier
_FIRST_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0#")
_USEC_PER_UNIT = {"": 1000, "M": 1000, "m": 1000, "S": 1_000_000, "s": 1_000_000, "U": 1, "u": 1}
_USEC_PER_CYCLE = {"H": 1_000_000, "h": 1_000_000, "K": 1000, "k": 1000}  # period = this / frequency


def _format_time(us: int) -> str:
    return str(us // 1000) if us % 1000 == 0 else f"{us}U"


def _number(text: str, at: int, digits: str, what: str) -> int:
    """A decimal literal (already known to be digits), capped at 2**31-1."""
    if len(digits) > _MAX_DIGITS:
        digits = digits.lstrip("0") or "0"
        if len(digits) > _MAX_DIGITS:
            _fail(text, f"{what} too large (at most {_MAX_INT})", at)
    value = int(digits)
    if value > _MAX_INT:
        _fail(text, f"{what} too large (at most {_MAX_INT})", at)
    return value


def _to_us(text: str, at: int, digits: str, unit: str, what: str) -> int:
    """Digits with an optional unit (none/M ms, S s, U µs, H Hz, K kHz) -> microseconds."""
    n = _number(text, at, digits, what)
    scale = _USEC_PER_UNIT.get(unit)
    if scale is not None:
        us = n * scale
    else:
        if n == 0:
            _fail(text, f"{what}: a frequency of 0 has no period", at)
        per_cycle = _USEC_PER_CYCLE[unit]
        us = (2 * per_cycle + n) // (2 * n)  # per_cycle / n, rounded half up
    if us > _MAX_INT * 1000:
        _fail(text, f"{what} too long (at most {_MAX_INT} ms)", at)
    return us


def _time(text: str, start: int, stop: int, what: str) -> int:
    m = _TIME_RE.fullmatch(text, start, stop)
    if m is None:
        _fail(
            text, f"invalid {what} {text[start:stop]!r} (expected digits and an optional unit M, S, U, H or K)", start
        )
    return _to_us(text, start, m.group(1), m.group(2), what)


def _device_error(text: str, start: int, stop: int, what: str) -> NoReturn:
    """Explain why text[start:stop] does not begin with a valid device name."""
    if start >= stop or text[start] not in _FIRST_CHARS:
        _fail(text, f"{what} must start with a letter, '0' or '#'", start)
    m = _DEVICE_RE.match(text, start, stop)
    if m is None:
        if stop - start < 3:
            _fail(text, f"{what} too short (at least 3 characters)", start)
        _fail(text, f"invalid qualifier {text[start + 1]!r} in {what}", start + 1)
    if m.end() - start < 3:
        _fail(text, f"{what} too short (at least 3 characters)", start)
    _fail(text, f"{what} too long (at most {_MAX_NAME} characters after the qualifier)", start + 2 + _MAX_NAME)


def _parse_range(text: str, pos: int, stop: int) -> tuple[Range, int]:
    """Parse the range starting at text[pos] ('[' or '{'); return it and where it ends."""
    if text[pos] == "[":
        m = _ARRAY_RE.match(text, pos, stop)
        kind: Literal["array", "byte"] = "array"
        whole = _WHOLE_ARRAY
    else:
        m = _BYTE_RE.match(text, pos, stop)
        kind = "byte"
        whole = _WHOLE_BYTES
    if m is None:
        closing = "]" if kind == "array" else "}"
        shape = "[n], [a:b], [a:], [:b] or []" if kind == "array" else "{off}, {off:len}, {off:} or {}"
        if text.find(closing, pos, stop) < 0:
            _fail(text, f"unclosed {kind} range (missing {closing!r})", pos)
        _fail(text, f"malformed {kind} range (expected {shape} with non-negative decimals)", pos)
    first, colon, second = m.groups()
    if colon is None:
        if not first:
            return whole, m.end()
        index = int(first) if len(first) < _MAX_DIGITS else _number(text, pos + 1, first, "range index")
        return _make_range(kind, index, None, True), m.end()
    if not first and not second:
        return whole, m.end()
    # (fewer than 10 digits always fit: int() directly, the checked _number() otherwise)
    start = None if not first else int(first) if len(first) < _MAX_DIGITS else _number(text, pos + 1, first, "range")
    end = None
    if second:
        end = int(second) if len(second) < _MAX_DIGITS else _number(text, pos + 2 + len(first), second, "range")
    if kind == "array" and start is not None and end is not None and end < start:
        _fail(text, f"array range end {end} precedes its start {start}", pos)
    return _make_range(kind, start, end, False), m.end()


def _parse_event(text: str, pos: int, stop: int) -> Event:
    """Parse the event text[pos:stop] (pos is just after '@')."""
    if pos < stop:
        letter = text[pos]
        if letter in "PpQq":
            m = _PQ_RE.fullmatch(text, pos, stop)
            if m is not None:
                kind = letter.upper()
                digits, unit, flag = m.groups()
                if digits is None:
                    return _DEFAULT_PERIODIC[kind]
                if not unit and len(digits) < _MAX_DIGITS:  # plain milliseconds, always in range
                    period = int(digits) * 1000
                else:
                    period = _to_us(text, pos + 2, digits, unit, "period")
                immediate = None if flag is None else (flag[0] == "T" or flag[0] == "t")
                return _make_event(kind, period, immediate, None, None, None, None, None, None)
        elif letter in "Ee":
            m = _E_RE.fullmatch(text, pos, stop)
            if m is not None:
                number_text, clock_type, delay_digits, delay_unit = m.groups()
                number = _clock_event_number(text, pos + 2, number_text)
                delay = None
                if delay_digits is not None:
                    delay = _to_us(text, m.start(3), delay_digits, delay_unit, "delay")
                if clock_type is not None:
                    clock_type = clock_type.upper()
                return _make_event("E", None, None, number, clock_type, delay, None, None, None)
        elif letter in "Ss":
            m = _S_RE.fullmatch(text, pos, stop)
            if m is not None:
                device_text, value_digits, delay_digits, delay_unit, op = m.groups()
                device = (device_text[0] + ":" + device_text[2:]).upper()
                if len(value_digits) < _MAX_DIGITS:
                    value = int(value_digits)
                else:
                    value = _number(text, m.start(2), value_digits, "state value")
                if not delay_unit and len(delay_digits) < _MAX_DIGITS:
                    delay = int(delay_digits) * 1000
                else:
                    delay = _to_us(text, m.start(3), delay_digits, delay_unit, "delay")
                return _make_event("S", None, None, None, None, delay, device, value, op)
        elif pos + 1 == stop:
            simple = _SIMPLE_EVENTS.get(letter)
            if simple is not None:
                return simple
    _event_error(text, pos, stop)


def _clock_event_number(text: str, at: int, hex_digits: str) -> int:
    hex_digits = hex_digits.lstrip("0") or "0"
    number = int(hex_digits, 16) if len(hex_digits) <= 8 else _MAX_INT + 1
    if number > _MAX_INT:
        _fail(text, f"clock event number too large (at most {_MAX_INT:X})", at)
    return number


def _split_params(text: str, start: int, stop: int) -> list[tuple[int, int]]:
    spans = []
    while True:
        comma = text.find(",", start, stop)
        if comma < 0:
            spans.append((start, stop))
            return spans
        spans.append((start, comma))
        start = comma + 1


def _event_error(text: str, pos: int, stop: int) -> NoReturn:
    """Explain why the event text[pos:stop] is invalid (the slow path of _parse_event)."""
    if pos >= stop:
        _fail(text, "missing event after '@'", pos)
    letter = text[pos].upper()
    if letter in ("U", "I", "N"):
        _fail(text, f"event '@{letter}' takes no parameters", pos + 1)
    if letter not in ("P", "Q", "E", "S"):
        _fail(text, f"unknown event {text[pos]!r} (expected U, I, N, P, Q, E or S)", pos)
    if pos + 1 == stop:
        _fail(text, f"event '@{letter}' needs parameters", pos + 1)
    if text[pos + 1] != ",":
        _fail(text, f"expected ',' after event letter {text[pos]!r}", pos + 1)
    spans = _split_params(text, pos + 2, stop)
    count = len(spans)
    if letter == "P" or letter == "Q":
        if count > 2:
            _fail(text, f"too many parameters for '@{letter}' (expected frequency and optional T/F)", spans[2][0] - 1)
        _time(text, spans[0][0], spans[0][1], "period")
        if count == 2:
            a, b = spans[1]
            if text[a:b].upper() not in _BOOLS:
                _fail(text, f"invalid immediate flag {text[a:b]!r} (expected T, TRUE, F or FALSE)", a)
    elif letter == "E":
        if count > 3:
            _fail(text, "too many parameters for '@E' (expected event, clock type, delay)", spans[3][0] - 1)
        a, b = spans[0]
        if _HEX_RE.fullmatch(text, a, b) is None:
            _fail(text, f"invalid clock event number {text[a:b]!r} (expected hexadecimal digits)", a)
        if count >= 2:
            a, b = spans[1]
            if text[a:b].upper() not in ("H", "S", "E"):
                _fail(text, f"invalid clock type {text[a:b]!r} (expected H, S or E)", a)
            if count == 3:
                _time(text, spans[2][0], spans[2][1], "delay")
    else:  # S
        if count != 4:
            _fail(text, "state event needs exactly '@S,device,value,delay,op'", spans[4][0] - 1 if count > 4 else stop)
        a, b = spans[0]
        m = _DEVICE_RE.match(text, a, b)
        if m is None or not 3 <= m.end() - a <= 2 + _MAX_NAME:
            _device_error(text, a, b, "state-event device")
        if m.end() != b:
            _fail(text, f"unexpected character {text[m.end()]!r} in state-event device", m.end())
        a, b = spans[1]
        if _DIGITS_RE.fullmatch(text, a, b) is None:
            _fail(text, f"invalid state value {text[a:b]!r} (expected an unsigned decimal)", a)
        _time(text, spans[2][0], spans[2][1], "delay")
        a, b = spans[3]
        if text[a:b] not in _STATE_OPS:
            _fail(text, f"invalid state operator {text[a:b]!r} (expected = != * > < <= >=)", a)
    _fail(text, "malformed event", pos)  # not reached unless the fast path and this one disagree


def _parse_extra(text: str, pos: int, stop: int) -> Extra:
    """Parse the extra text[pos:stop] (pos is just after '<-')."""
    again = text.find("<-", pos, stop)
    if again >= 0:
        _fail(text, "more than one '<-'", again)
    m = _WORD_RE.match(text, pos, stop)
    if m is None:
        _fail(text, "missing extra name after '<-'", pos)
    name = m.group().upper()
    if name not in EXTRA_NAMES:
        _fail(text, f"unknown extra {m.group()!r} (expected one of {', '.join(sorted(EXTRA_NAMES))})", pos)
    return Extra(name, text[m.end() : stop])


def _describe(value: object) -> str:
    try:
        shown = repr(value)
    except Exception:  # a hostile __repr__ must not escape parse()
        shown = f"<{type(value).__name__}>"
    return shown[:100]


def parse(text: str) -> DRF:
    """Parse a DRF string.  Raises :class:`DRFError` (and nothing else) when it is not valid."""
    if type(text) is not str:
        if not isinstance(text, str):
            raise DRFError(_describe(text), f"a DRF must be a str, not {type(text).__name__}")
        text = str.__str__(text)  # plain str copy of a str subclass
    n = len(text)
    if n == 0:
        _fail(text, "empty", None)
    if n > MAX_DRF_LENGTH:
        _fail(text, f"longer than {MAX_DRF_LENGTH} characters", MAX_DRF_LENGTH)
    if not (text.isascii() and text.isprintable()):
        bad = _BAD_CHAR_RE.search(text)
        where = bad.start() if bad is not None else 0
        _fail(text, f"illegal character {text[where]!r} (only printable ASCII is allowed)", where)

    stop = text.find("<-")  # the extra, if any, is parsed last so errors come out left to right
    if stop < 0:
        stop = n

    # DEVICE
    m = _DEVICE_RE.match(text, 0, stop)
    if m is None:
        _device_error(text, 0, stop, "device name")
    pos = m.end()
    if pos < 3 or pos > 2 + _MAX_NAME:
        _device_error(text, 0, stop, "device name")
    device = (text[0] + ":" + text[2:pos]).upper()
    prop = QUALIFIER_PROPERTY[text[1]]
    rng = None
    field = None
    event = None

    if pos < stop:
        # [.PROPERTY or .FIELD] [RANGE] [.FIELD]
        first_word = None
        first_at = 0
        if text[pos] == ".":
            m = _WORD_RE.match(text, pos + 1, stop)
            if m is None:
                _fail(text, "expected a property or field name after '.'", pos + 1)
            first_word = m.group().upper()
            first_at = pos + 1
            pos = m.end()
        if pos < stop and (text[pos] == "[" or text[pos] == "{"):
            rng, pos = _parse_range(text, pos, stop)
        second_word = None
        second_at = 0
        if pos < stop and text[pos] == ".":
            m = _WORD_RE.match(text, pos + 1, stop)
            if m is None:
                _fail(text, "expected a field name after '.'", pos + 1)
            second_word = m.group().upper()
            second_at = pos + 1
            pos = m.end()

        if first_word is not None:
            explicit = PROPERTY_ALIASES.get(first_word)
            if explicit is not None:
                prop = explicit
            elif second_word is not None:
                if first_word in FIELD_ALIASES:
                    _fail(text, f"{first_word!r} is not a property, so no field may follow it", second_at - 1)
                _fail(text, f"unknown property {text[first_at : first_at + len(first_word)]!r}", first_at)
            else:
                field = FIELD_ALIASES.get(first_word)
                if field is None:
                    _fail(text, f"unknown field {text[first_at : first_at + len(first_word)]!r}", first_at)
        if second_word is not None:
            field = FIELD_ALIASES.get(second_word)
            if field is None:
                _fail(text, f"unknown field {text[second_at : second_at + len(second_word)]!r}", second_at)
        if field is not None and _is_default_field(prop, field):
            field = None  # the property's default field is stored as None

        # [@EVENT]
        if pos < stop and text[pos] == "@":
            event = _parse_event(text, pos + 1, stop)
            pos = stop
        if pos != stop:
            _fail(text, f"unexpected character {text[pos]!r}", pos)

    # [<-EXTRA]
    extra = None if stop == n else _parse_extra(text, stop + 2, n)
    return _make_drf(device, prop, rng, field, event, extra)


_parse_lru = functools.lru_cache(maxsize=4096)(parse)


def parse_cached(text: str) -> DRF:
    """:func:`parse` behind a bounded LRU cache (4096 entries).  Invalid DRFs are not cached."""
    if type(text) is not str:
        return parse(text)  # never put unhashable or odd objects into the cache
    return _parse_lru(text)


def is_oneshot(text: str) -> bool:
    """True when the DRF's event is ``@I`` or ``@N``; raises :class:`DRFError` when invalid."""
    return parse_cached(text).is_oneshot


def canonical(text: str) -> str:
    """The canonical spelling of a DRF; raises :class:`DRFError` when invalid."""
    return parse_cached(text).canonical


def prepare_for_write(text: str) -> str:
    """Canonical DRF for a write (``'M:OUTTMP'`` -> ``'M:OUTTMP.SETTING@N'``)."""
    return parse_cached(text).for_write().canonical
