"""A device: one DRF and a backend, read and set by property (the pacsys release's device API).

    dev = Device("M:OUTTMP", backend=backend)
    dev.read()            # reads M:OUTTMP.READING@I; the value, or DeviceError with its status
    dev.setting()         # M:OUTTMP.SETTING@I
    dev.get()             # the whole Reading of the device's own DRF
    dev.write(72.5)       # M:OUTTMP.SETTING@N; the WriteResult
    dev.with_event("p,1000").subscribe()

What a call keeps of the DRF the device was made with: its range, its extra (``<-FTP``) and
its field when that field suits the property asked for. The event is the call's: a read is
``@I`` (except from a logger, ``<-LOGGER...``, which picks its data by event: there the
device's own event is kept), a write ``@N``, a subscription the event given or the device's.
The DRFs sent are this project's canonical spelling (see pacsys.drf).

A Device is immutable: ``with_*`` and ``without_*`` give a new one of the same class. It
needs a backend (this project opens no connection of its own), so one made without refuses
to read, naming the fix. ScalarDevice, ArrayDevice and TextDevice check what ``read`` gives;
ArrayDevice alone imports numpy, when it returns an array.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from typing import TYPE_CHECKING, Any, Self

from pacsys.drf import DEFAULT_FIELD, FIELD_ALIASES, PROPERTY_ALIASES, DRFError, Event, Field, Property, Range, parse
from pacsys.types import Reading, Value, WriteResult

if TYPE_CHECKING:
    from pacsys.backends import Backend, ErrorCallback, ReadingCallback, SubscriptionHandle
    from pacsys.drf import DRF

_IMMEDIATE = Event("I")
_NEVER = Event("N")
# Extras that read logged data, which a logger selects by event: a read from one keeps the device's.
_HISTORICAL_EXTRAS = frozenset({"LOGGER", "LOGGERSINGLE", "LOGGERDURATION"})
# Status fields that are one bit: status() answers them as bool.
_BIT_FIELDS = frozenset({Field.ON, Field.READY, Field.REMOTE, Field.POSITIVE, Field.RAMP})


def _fields(names: str) -> frozenset[Field]:
    return frozenset(Field[name] for name in names.split())


# Which fields each property has (pacsys.drf's parser leaves this to the backend; a Device
# checks it, so that a wrong field is refused before anything is sent).
_VALUE_FIELDS = _fields("RAW PRIMARY SCALED UNITS MIN MAX")
_STATUS_FIELDS = _fields("RAW ALL TEXT EXTENDED_TEXT ON READY REMOTE POSITIVE RAMP BIT_VALUE BIT_NAMES BIT_VALUES")
_ALARM_FIELDS = _fields(
    "RAW ALL TEXT ALARM_ENABLE ALARM_STATUS TRIES_NEEDED TRIES_NOW ALARM_FTD ABORT ABORT_INHIBIT FLAGS"
)
_FIELDS: dict[Property, frozenset[Field]] = {
    Property.READING: _VALUE_FIELDS,
    Property.SETTING: _VALUE_FIELDS,
    Property.STATUS: _STATUS_FIELDS,
    Property.BIT_STATUS: _STATUS_FIELDS - {Field.EXTENDED_TEXT},
    Property.CONTROL: _fields("RAW SCALED"),
    Property.ANALOG: _ALARM_FIELDS | _fields("MIN MAX NOM TOL RAW_MIN RAW_MAX RAW_NOM RAW_TOL"),
    Property.DIGITAL: _ALARM_FIELDS | _fields("NOM MASK"),
}
_TEXT_FIELDS = _fields("SCALED")  # DESCRIPTION, INDEX, LONG_NAME, ALARM_LIST_NAME


def _check_callback(name: str, fn: object, arguments: str) -> None:
    """Refuse, at subscribe time, a callback that could not be called with its two arguments."""
    if fn is None:
        return
    if not callable(fn):
        hint = f" (for an event, write subscribe(event={fn!r}))" if isinstance(fn, str) else ""
        raise TypeError(f"{name} must be callable, not {type(fn).__name__}{hint}")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # no signature to look at (some builtins): it is called as it is
    try:
        signature.bind(None, None)
    except TypeError:
        raise TypeError(f"{name} must accept 2 arguments ({arguments}); {fn!r} does not") from None


class Device:
    """One device request, bound to a backend. Immutable."""

    __slots__ = ("_backend", "_drf")
    _drf: DRF
    _backend: Backend | None

    def __init__(self, drf: str, backend: Backend | None = None) -> None:
        """`drf` is parsed now: a malformed one raises DRFError (a ValueError) here, not at read time."""
        if not isinstance(drf, str):
            raise TypeError(f"a Device's DRF is a str, not {type(drf).__name__}")
        object.__setattr__(self, "_drf", parse(drf))
        object.__setattr__(self, "_backend", backend)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable: its with_* methods give a changed copy")

    def __delattr__(self, name: str) -> None:
        self.__setattr__(name, None)

    # -- what it is ----------------------------------------------------------------------------

    @property
    def drf(self) -> str:
        """The device's DRF, canonical."""
        return self._drf.canonical

    @property
    def name(self) -> str:
        return self._drf.device

    @property
    def request(self) -> DRF:
        """The parsed DRF (a frozen pacsys.drf.DRF)."""
        return self._drf

    @property
    def has_event(self) -> bool:
        """Whether the DRF names an event other than the device's default (none, or ``@U``)."""
        event = self._drf.event
        return event is not None and event.kind != "U"

    @property
    def is_periodic(self) -> bool:
        event = self._drf.event
        return event is not None and event.kind in ("P", "Q")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.drf!r})"

    def __eq__(self, other: object) -> bool:
        return self.drf == other.drf if isinstance(other, Device) else NotImplemented

    def __hash__(self) -> int:
        return hash(self.drf)

    # -- reads ---------------------------------------------------------------------------------

    def read(self, *, field: str | None = None, timeout: float | None = None) -> Value:
        """The READING's value; DeviceError when the device answers an error."""
        return self._backend_or_fail().read(self._oneshot(Property.READING, field), timeout)

    def setting(self, *, field: str | None = None, timeout: float | None = None) -> Value:
        return self._backend_or_fail().read(self._oneshot(Property.SETTING, field), timeout)

    def status(self, *, field: str | None = None, timeout: float | None = None) -> Value:
        """The basic status; a one-bit field (``on``, ``ready``, ``remote``, ``positive``, ``ramp``) as a bool."""
        value = self._backend_or_fail().read(self._oneshot(Property.STATUS, field), timeout)
        return bool(value) if self._field(Property.STATUS, field) in _BIT_FIELDS else value

    def analog_alarm(self, *, field: str | None = None, timeout: float | None = None) -> Value:
        return self._backend_or_fail().read(self._oneshot(Property.ANALOG, field), timeout)

    def digital_alarm(self, *, field: str | None = None, timeout: float | None = None) -> Value:
        return self._backend_or_fail().read(self._oneshot(Property.DIGITAL, field), timeout)

    def description(self, *, field: str | None = None, timeout: float | None = None) -> str:
        value = self._backend_or_fail().read(self._oneshot(Property.DESCRIPTION, field), timeout)
        if not isinstance(value, str):
            raise TypeError(f"Expected text from {self.name}'s DESCRIPTION, got {type(value).__name__}")
        return value

    def get(self, *, prop: str | None = None, field: str | None = None, timeout: float | None = None) -> Reading:
        """The whole Reading (status, timestamp, meta): of the device's own DRF, or of `prop` at ``@I``."""
        if prop is None:
            if field is not None:
                raise ValueError(f"field requires prop: get(prop=..., field={field!r}) for {self.name}")
            return self._backend_or_fail().get(self.drf, timeout)
        drf = self._oneshot(self._property(prop), field)
        return self._backend_or_fail().get(drf, timeout)

    # -- writes --------------------------------------------------------------------------------

    def write(self, value: Value, *, field: str | None = None, timeout: float | None = None) -> WriteResult:
        """Set the SETTING; a refused write is a WriteResult with its error, not an exception."""
        drf = self._request(Property.SETTING, self._field(Property.SETTING, field), _NEVER)
        return self._backend_or_fail().write(drf, value, timeout=timeout)

    def set_analog_alarm(self, settings: dict, *, timeout: float | None = None) -> WriteResult:
        """Write the analog alarm block (a dict such as ``{"minimum": 40, "maximum": 80}``)."""
        drf = self._request(Property.ANALOG, None, _NEVER)
        return self._backend_or_fail().write(drf, settings, timeout=timeout)

    def set_digital_alarm(self, settings: dict, *, timeout: float | None = None) -> WriteResult:
        """Write the digital alarm block (a dict such as ``{"nominal": 1, "mask": 255}``)."""
        drf = self._request(Property.DIGITAL, None, _NEVER)
        return self._backend_or_fail().write(drf, settings, timeout=timeout)

    # -- streams -------------------------------------------------------------------------------

    def subscribe(
        self,
        callback: ReadingCallback | None = None,
        on_error: ErrorCallback | None = None,
        *,
        prop: str | None = None,
        field: str | None = None,
        event: str | None = None,
    ) -> SubscriptionHandle:
        """Stream `prop` (READING by default) on `event`, or on the device's own event."""
        _check_callback("callback", callback, "reading, handle")
        _check_callback("on_error", on_error, "exception, handle")
        drf = self._streamed("subscribe", prop, field, event)
        return self._backend_or_fail().subscribe([drf], callback, on_error)

    def await_next(
        self, *, prop: str | None = None, field: str | None = None, event: str | None = None, timeout: float = 5.0
    ) -> Reading:
        """The next reading of a subscription made for it; TimeoutError when none comes within `timeout` s."""
        drf = self._streamed("await_next", prop, field, event)
        with self._backend_or_fail().subscribe([drf]) as handle:
            for reading, _ in handle.readings(timeout=timeout):
                return reading
        raise TimeoutError(f"no reading of {drf} within {timeout} s")

    # -- changed copies ------------------------------------------------------------------------

    def with_backend(self, backend: Backend) -> Self:
        return type(self)(self.drf, backend)

    def with_event(self, event: str) -> Self:
        return self._replaced(event=self._event(event))

    def without_event(self) -> Self:
        return self._replaced(event=None)

    def with_range(self, start: int | None = None, end: int | None = None, *, at: int | None = None) -> Self:
        """An array range: ``[start:end]`` (either may be left open), ``[at]``, or the whole array (no argument)."""
        if at is not None and (start is not None or end is not None):
            raise ValueError("with_range takes either at= or start/end, not both")
        rng = Range("array", at, None, True) if at is not None else Range("array", start, end)
        return self._replaced(range=rng)

    def without_range(self) -> Self:
        return self._replaced(range=None)

    def with_extra(self, extra: str | None) -> Self:
        """Another extra (``"FTP"``, ``"LOGGER:1000:2000"``...), or none."""
        if extra is None:
            return self._replaced(extra=None)
        try:
            parsed = parse(f"{self.name}<-{extra}")
        except DRFError as exc:
            raise ValueError(f"Invalid extra {extra!r} for {self.name}: {exc.reason}") from None
        return self._replaced(extra=parsed.extra)

    # -- the DRFs it sends ---------------------------------------------------------------------

    def _replaced(self, **changes: Any) -> Self:
        # Through the text and the parser again, so that the new DRF is checked like any other.
        return type(self)(dataclasses.replace(self._drf, **changes).canonical, self._backend)

    def _request(self, prop: Property, field: Field | None, event: Event | None) -> str:
        return dataclasses.replace(self._drf, property=prop, field=field, event=event).canonical

    def _oneshot(self, prop: Property, field: str | None) -> str:
        extra = self._drf.extra
        event = self._drf.event if extra is not None and extra.name in _HISTORICAL_EXTRAS else _IMMEDIATE
        return self._request(prop, self._field(prop, field), event)

    def _streamed(self, what: str, prop: str | None, field: str | None, event: str | None) -> str:
        if prop is None and field is not None:
            raise ValueError(f"field requires prop: {what}(prop=..., field={field!r}) for {self.name}")
        chosen_prop = Property.READING if prop is None else self._property(prop)
        chosen_field = self._field(chosen_prop, field)
        chosen = self._event(event) if event is not None else self._drf.event
        if chosen is None or (event is None and not self.has_event):
            raise ValueError(f"{what} requires an event for {self.name}: pass event=... or use with_event()")
        if chosen.kind == "N":
            raise ValueError(f"{what} cannot use @N (never) for {self.name}: it delivers nothing")
        return self._request(chosen_prop, chosen_field, chosen)

    def _property(self, prop: str) -> Property:
        found = PROPERTY_ALIASES.get(prop.upper()) if isinstance(prop, str) else None
        if found is None:
            raise ValueError(f"unknown property {prop!r} for {self.name} (READING, SETTING, STATUS, ANALOG...)")
        return found

    def _field(self, prop: Property, field: str | None) -> Field | None:
        """The field to ask `prop` for: the one named; else the device's own if it suits `prop`; else the default (None)."""
        allowed = _FIELDS.get(prop, _TEXT_FIELDS)
        if field is None:
            own = self._drf.field
            return own if own in allowed else None
        found = FIELD_ALIASES.get(field.upper()) if isinstance(field, str) else None
        if found is None:
            raise ValueError(f"unknown field {field!r} for {self.name}")
        if found not in allowed:
            raise ValueError(f"Field {field!r} not allowed for {prop.value} (of {self.name})")
        return None if DEFAULT_FIELD.get(prop) is found else found

    def _event(self, text: str) -> Event:
        """An event as written after ``@`` (``"p,1000"``, ``"E,0F"``, ``"I"``...), checked by the parser."""
        if not isinstance(text, str) or "<-" in text:
            raise ValueError(f"invalid event {text!r} for {self.name}")
        event = parse(f"{self.name}@{text}").event
        assert event is not None  # the parser always gives one after '@'
        return event

    def _backend_or_fail(self) -> Backend:
        if self._backend is None:
            raise RuntimeError(
                f"{self!r} has no backend: give one (Device(drf, backend=...) or .with_backend(backend));"
                " this project opens no default connection"
            )
        return self._backend


class ScalarDevice(Device):
    """A Device whose read() gives a float (an int is converted; anything else is a TypeError)."""

    def read(self, *, field: str | None = None, timeout: float | None = None) -> float:
        value = super().read(field=field, timeout=timeout)
        if not isinstance(value, int | float):
            raise TypeError(f"Expected scalar from {self.drf}, got {type(value).__name__}")
        return float(value)


class ArrayDevice(Device):
    """A Device whose read() gives a numpy array (a list or tuple is converted). Needs numpy."""

    def read(self, *, field: str | None = None, timeout: float | None = None) -> Any:
        value = super().read(field=field, timeout=timeout)
        numpy_now = sys.modules.get("numpy")  # an ndarray can only come from a numpy already imported
        if numpy_now is not None and isinstance(value, numpy_now.ndarray):
            return value
        if not isinstance(value, list | tuple):
            raise TypeError(f"Expected array from {self.drf}, got {type(value).__name__}")
        try:
            import numpy  # only here: numpy is optional, and heavy to import
        except ImportError:
            raise ImportError(
                f"ArrayDevice.read returns numpy arrays and numpy is not installed (pip install numpy);"
                f" Device({self.drf!r}).read() gives the value as a list"
            ) from None
        return numpy.asarray(value)


class TextDevice(Device):
    """A Device whose read() gives a str (anything else is a TypeError)."""

    def read(self, *, field: str | None = None, timeout: float | None = None) -> str:
        value = super().read(field=field, timeout=timeout)
        if not isinstance(value, str):
            raise TypeError(f"Expected string from {self.drf}, got {type(value).__name__}")
        return value


__all__ = ["ArrayDevice", "Device", "ScalarDevice", "TextDevice"]
