"""Fakes for tests: an in-memory sync backend and its async twin.

They behave as the pacsys release's fakes do, so that tests written against the release
pass against these:

- One value per device and property (READING and SETTING are two values): `set_reading`
  or a write stores it, a read returns it. A device never configured reads as ACNET 1/-1
  "No reading configured for DRF"; a property never set of a configured device reads as
  DBM 16/-13 "No such property for DEVICE".
- A reading set for an event (`set_reading("M:OUTTMP@p,500", ...)`) answers reads with
  that event exactly, and also becomes the device's plain value. A read with another event
  gets the plain value, when it is a float or a numpy array of floats, shifted by a fixed
  offset per event, and its timestamp by as many milliseconds, so a test can tell which
  event a reading answers (`event_offset`). `@N` cannot be read. A write replaces the
  value for every event: a read with the write's event, or with an event a reading was
  set for, gets it exactly.
- Ranges: `B:HS23T[0:2]` reads elements 0 to 2, `[3]` the element alone; a ranged write
  changes just those elements of the stored array.
- `set_write_result(drf, ...)`: later writes to that device answer the given error.
- `emit_reading` pushes a reading to every live subscription naming the same device and
  property group (READING/SETTING, STATUS/CONTROL...), under the DRF it subscribed with.
  `emit_error(exception)` ends every subscription with it (its `exc`, and `on_error` when
  given); `emit_error(drf, code, message)` sends an error reading instead (this project's
  own addition). Subscription handles have `ref_ids` (0, 1, ... per DRF), and the backend
  lists its live ones in `_subscriptions`, the release's name, which its tests read.
- They say they are authenticated, as `test-user@FNAL.GOV`.
"""

from __future__ import annotations

import queue
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

from pacsys.aio._backends import AsyncBackend as _AsyncBackend
from pacsys.aio._subscription import AsyncSubscriptionHandle
from pacsys.backends import Backend
from pacsys.backends._subscription import ErrorCallback, ReadingCallback, SubscriptionHandle
from pacsys.drf import DRF, DRFError, Property, parse_cached
from pacsys.status import ACNET, ACNET_RETRY, DBM, DBM_NO_SUCH_PROPERTY, DPM, DPM_BAD_RANGE, DPM_NO_SUCH_DEVICE
from pacsys.types import (
    BackendCapability,
    DeviceMeta,
    DispatchMode,
    Reading,
    Value,
    ValueType,
    WriteResult,
    infer_value_type,
)

PRINCIPAL = "test-user@FNAL.GOV"

_GROUP = {
    Property.READING: "value",
    Property.SETTING: "value",
    Property.STATUS: "status",
    Property.CONTROL: "status",
    Property.ANALOG: "analog",
    Property.DIGITAL: "digital",
}


def _key(drf: str) -> tuple[str, str]:
    """(device, property group) of a DRF, for subscriptions and the was_* helpers."""
    try:
        parsed = parse_cached(drf)
    except DRFError:
        return (drf.upper(), "value")
    return (parsed.device, _GROUP.get(parsed.property, parsed.property.name.lower()))


def event_offset(drf: str) -> float:
    """What a read with this DRF's event adds to a float value (and, in ms, to its timestamp).

    No event, ``@U`` or ``@I``: 0. Periodic ``@p,N`` / ``@q,N``: N/1000 (N in ms). Clock
    ``@e,E[,t,D]``: -(E + D/1000)/100. State events: 2 plus the sum of the character codes of
    the event text as written, modulo 1000, divided by 1000.
    """
    event = parse_cached(drf).event
    if event is None:
        return 0.0
    if event.kind in ("P", "Q"):
        return (event.period or 1_000_000) / 1_000_000
    if event.kind == "E":
        return -((event.clock_event or 0) + (event.delay or 0) / 1_000_000) / 100
    if event.kind == "S":
        text = drf[drf.index("@", 2) + 1 :].split("<-", 1)[0]
        return 2 + (sum(map(ord, text)) % 1000) / 1000
    return 0.0


def _slice(value: object, parsed: DRF) -> tuple[object, bool] | None:
    """The elements an array range names ((value, single)), None when it does not fit the value."""
    rng = parsed.range
    if rng is None or rng.kind != "array" or rng.is_whole:
        return value, False
    if not _is_array(value):
        return None
    items = list(value)  # type: ignore[call-overload]
    start = rng.start or 0
    if rng.single:
        return (items[start], True) if start < len(items) else None
    end = len(items) - 1 if rng.end is None else min(rng.end, len(items) - 1)
    return (items[start : end + 1], False) if start <= end else None


def _is_array(value: object) -> bool:
    return isinstance(value, list | tuple) or hasattr(value, "tolist")


def _shifts(value: object) -> bool:
    """Whether a read with an event shifts this value: a float, or a numpy array of floats."""
    return isinstance(value, float) or getattr(getattr(value, "dtype", None), "kind", None) == "f"


def _meta(device: str, units: str | None, description: str | None) -> DeviceMeta:
    return DeviceMeta(0, device, description or f"Test device {device}", units)


class FakeSubscriptionHandle(SubscriptionHandle):
    """A FakeBackend subscription; `keys` are the (device, group) pairs it listens to."""

    def __init__(self, drfs, callback=None, on_error=None, on_stop=None):
        super().__init__(drfs, callback=callback, on_error=on_error, on_stop=on_stop)
        self.keys = {_key(d): d for d in drfs}


class FakeBackend(Backend):
    def __init__(self, dispatch_mode: DispatchMode = DispatchMode.DIRECT):
        self._dispatch_mode = dispatch_mode
        self._lock = threading.RLock()
        # (device, property name) -> the reading last stored for it, whatever its event
        self._state: dict[tuple[str, str], Reading] = {}
        # (device, property name, canonical event) -> a reading set for that event
        self._by_event: dict[tuple[str, str, str], Reading] = {}
        self._write_results: dict[str, tuple[int, int, str | None]] = {}  # device -> answer
        self._subscriptions: list[FakeSubscriptionHandle] = []  # the release's name: its tests read it
        self._reads: list[str] = []
        self._writes: list[tuple[str, Value]] = []
        self._closed = False
        self._worker_queue: queue.SimpleQueue | None = None

    @property
    def capabilities(self) -> BackendCapability:
        return BackendCapability.READ | BackendCapability.WRITE | BackendCapability.STREAM | BackendCapability.BATCH

    @property
    def authenticated(self) -> bool:
        return True

    @property
    def principal(self) -> str:
        return PRINCIPAL

    # -- state set-up ------------------------------------------------------------------

    def _store(self, drf: str, reading: Reading) -> None:
        parsed = parse_cached(drf)
        with self._lock:
            self._state[(parsed.device, parsed.property.name)] = reading
            if parsed.event is not None:
                self._by_event[(parsed.device, parsed.property.name, str(parsed.event))] = reading

    def set_reading(
        self,
        drf: str,
        value: Value,
        value_type: ValueType | None = None,
        units: str | None = None,
        description: str | None = None,
        timestamp: datetime | None = None,
        cycle: int | None = None,
        *,
        error_code: int = 0,
        facility_code: int = 0,
        message: str | None = None,
    ) -> None:
        """What reads of `drf` answer (with an event in `drf`: reads with that event exactly)."""
        device = parse_cached(drf).device
        self._store(
            drf,
            Reading(
                drf=drf,
                value_type=value_type or infer_value_type(value),
                value=value,
                error_code=error_code,
                facility_code=facility_code,
                message=message,
                timestamp=timestamp,
                cycle=cycle,
                meta=_meta(device, units, description),
            ),
        )

    def set_error(self, drf: str, error_code: int, message: str | None = None, facility_code: int = DPM) -> None:
        self._store(drf, Reading(drf=drf, facility_code=facility_code, error_code=error_code, message=message))

    def set_write_result(
        self,
        drf: str,
        success: bool = True,
        error_code: int | None = None,
        message: str | None = None,
        facility_code: int = DPM,
    ) -> None:
        """What later writes to this device answer: success, or the error given.

        An `error_code` other than 0 is a failure even with `success` left True; a failure
        without one answers -1.
        """
        if error_code is None:
            error_code = 0 if success else -1
        elif error_code == 0 and not success:
            error_code = -1
        with self._lock:
            self._write_results[parse_cached(drf).device] = (
                (0, 0, None) if error_code == 0 else (facility_code, error_code, message)
            )

    def set_analog_alarm(self, drf: str, alarm: dict) -> None:
        name = _key(drf)[0]
        self.set_reading(f"{name}.ANALOG", dict(alarm), value_type=ValueType.ANALOG_ALARM)

    def set_digital_alarm(self, drf: str, alarm: dict) -> None:
        name = _key(drf)[0]
        self.set_reading(f"{name}.DIGITAL", dict(alarm), value_type=ValueType.DIGITAL_ALARM)

    def reset(self) -> None:
        with self._lock:
            self._state.clear()
            self._by_event.clear()
            self._write_results.clear()
            self._reads.clear()
            self._writes.clear()
            handles, self._subscriptions = self._subscriptions, []
        for h in handles:
            h.stop()

    # -- what happened -----------------------------------------------------------------

    @property
    def reads(self) -> list[str]:
        with self._lock:
            return list(self._reads)

    @property
    def writes(self) -> list[tuple[str, Value]]:
        with self._lock:
            return list(self._writes)

    def was_read(self, drf: str) -> bool:
        key = _key(drf)
        return any(_key(d) == key for d in self.reads)

    def was_written(self, drf: str) -> bool:
        key = _key(drf)
        return any(_key(d) == key for d, _ in self.writes)

    def get_written_value(self, drf: str) -> Value | None:
        key = _key(drf)
        for d, v in reversed(self.writes):
            if _key(d) == key:
                return v
        return None

    # -- Backend -----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("Backend is closed")

    def _reading_for(self, drf: str) -> Reading:
        try:
            parsed = parse_cached(drf)
        except DRFError as exc:
            return Reading(drf=drf, facility_code=DPM, error_code=DPM_NO_SUCH_DEVICE, message=str(exc))
        device, prop, event = parsed.device, parsed.property.name, parsed.event
        if event is not None and event.kind == "N":
            return Reading(drf=drf, facility_code=ACNET, error_code=ACNET_RETRY, message=_NEVER_MESSAGE)
        exact = event is not None and (device, prop, str(event)) in self._by_event
        stored = self._by_event[(device, prop, str(event))] if exact else self._state.get((device, prop))
        if stored is None:
            if any(d == device for d, _ in self._state):
                return Reading(
                    drf=drf,
                    facility_code=DBM,
                    error_code=DBM_NO_SUCH_PROPERTY,
                    message=f"No such property for {device}",
                )
            return Reading(
                drf=drf, facility_code=ACNET, error_code=ACNET_RETRY, message=f"No reading configured for {drf}"
            )
        if stored.value is None:  # a configured error
            return Reading(
                drf=drf, facility_code=stored.facility_code, error_code=stored.error_code, message=stored.message
            )
        sliced = _slice(stored.value, parsed)
        if sliced is None:
            return Reading(drf=drf, facility_code=DPM, error_code=DPM_BAD_RANGE, message=f"range of {drf} does not fit")
        value: Any
        value, single = sliced
        timestamp = stored.timestamp or datetime.now(UTC)
        offset = event_offset(drf) if event is not None and not exact and _shifts(value) else 0.0
        if offset:
            value = value + offset  # a new value: += would change a stored numpy array in place
            timestamp += timedelta(milliseconds=abs(offset))
        return Reading(
            drf=drf,
            value_type=ValueType.SCALAR if single else stored.value_type,
            value=value,
            facility_code=stored.facility_code,
            error_code=stored.error_code,
            message=stored.message,
            timestamp=timestamp,
            cycle=stored.cycle,
            meta=stored.meta,
        )

    def get_many(self, drfs: list[str], timeout: float | None = None) -> list[Reading]:
        self._check_open()
        with self._lock:
            self._reads.extend(drfs)
            return [self._reading_for(d) for d in drfs]

    def _write_one(self, drf: str, value: Any) -> WriteResult:
        self._writes.append((drf, value))
        try:
            parsed = parse_cached(drf)
        except DRFError as exc:
            return WriteResult(drf=drf, facility_code=DPM, error_code=DPM_NO_SUCH_DEVICE, message=str(exc))
        facility, error, message = self._write_results.get(parsed.device, (0, 0, None))
        if error:
            return WriteResult(drf=drf, facility_code=facility, error_code=error, message=message)
        key = (parsed.device, parsed.property.name)
        old = self._state.get(key)
        rng = parsed.range
        value_type = infer_value_type(value)
        if rng is not None and rng.kind == "array" and not rng.is_whole:
            # A ranged write changes just those elements of the stored array.
            if old is None or not _is_array(old.value):
                why = f"no stored array of {parsed.device} to write {drf} into: set the whole value first"
                return WriteResult(drf=drf, error_code=ACNET_RETRY, message=why)
            items = list(old.value)  # type: ignore[arg-type]
            new = list(value) if _is_array(value) else [value]
            start = rng.start or 0
            wanted = 1 if rng.single else None if rng.end is None else rng.end - start + 1
            if start + len(new) > len(items) or wanted not in (None, len(new)):
                why = f"{len(new)} values do not fit {drf} (the array has {len(items)})"
                return WriteResult(drf=drf, facility_code=DPM, error_code=DPM_BAD_RANGE, message=why)
            items[start : start + len(new)] = new
            value, value_type = items, old.value_type or ValueType.SCALAR_ARRAY
        meta = old.meta if old is not None else _meta(parsed.device, None, None)
        written = Reading(drf=drf, value_type=value_type, value=value, meta=meta)
        # Every read sees what was written: a read with the write's own event, or with one a
        # reading was set for, gets it exactly; other events get it shifted.
        self._state[key] = written
        for event_key in [k for k in self._by_event if k[:2] == key]:
            self._by_event[event_key] = written
        if parsed.event is not None:
            self._by_event[(*key, str(parsed.event))] = written
        return WriteResult(drf=drf)

    def write_many(self, settings: list[tuple[str, Value]], timeout: float | None = None) -> list[WriteResult]:
        self._check_open()
        with self._lock:
            return [self._write_one(drf, value) for drf, value in settings]

    def subscribe(
        self,
        drfs: list[str],
        callback: ReadingCallback | None = None,
        on_error: ErrorCallback | None = None,
    ) -> FakeSubscriptionHandle:
        self._check_open()
        handle = FakeSubscriptionHandle(drfs, callback=callback, on_error=on_error, on_stop=self._forget)
        with self._lock:
            self._subscriptions.append(handle)
        return handle

    def _forget(self, handle: SubscriptionHandle) -> None:
        with self._lock:
            if handle in self._subscriptions:
                self._subscriptions.remove(handle)

    def stop_streaming(self) -> None:
        with self._lock:
            handles, self._subscriptions = self._subscriptions, []
        for h in handles:
            h.stop()

    @property
    def subscription_count(self) -> int:
        with self._lock:
            return len(self._subscriptions)

    def emit_reading(
        self,
        drf: str,
        value: Value,
        value_type: ValueType | None = None,
        units: str | None = None,
        description: str | None = None,
        **fields,
    ) -> None:
        """Push a reading to every subscription of this device and property group."""
        fields.setdefault("timestamp", datetime.now(UTC))
        fields.setdefault("meta", _meta(_key(drf)[0], units, description))
        self._emit(drf, dict(value_type=value_type or infer_value_type(value), value=value, **fields))

    def emit_error(
        self,
        error: BaseException | str,
        error_code: int | None = None,
        message: str | None = None,
        facility_code: int = DPM,
    ) -> None:
        """`emit_error(exception)`: end every subscription with it (its `exc`; `on_error` is called).

        `emit_error(drf, error_code, message)`: send an error reading to the subscriptions of
        that device instead; they stay open.
        """
        if isinstance(error, BaseException):
            with self._lock:
                handles = list(self._subscriptions)
            for handle in handles:
                handle.signal_error(error)  # type: ignore[arg-type]
            return
        if error_code is None:
            raise TypeError("emit_error(drf, ...) needs an error_code")
        self._emit(error, dict(facility_code=facility_code, error_code=error_code, message=message))

    def _emit(self, drf: str, fields: dict) -> None:
        key = _key(drf)
        with self._lock:
            targets = [(h, h.keys[key]) for h in self._subscriptions if key in h.keys]
        for handle, subscribed_drf in targets:
            reading = Reading(drf=subscribed_drf, **fields)
            if self._dispatch_mode is DispatchMode.DIRECT:
                handle.dispatch(reading)
            else:
                self._worker().put((handle, reading))

    def _worker(self) -> queue.SimpleQueue:
        """The callback thread of WORKER dispatch: one thread, readings in emit order."""
        with self._lock:
            if self._worker_queue is None:
                q: queue.SimpleQueue = queue.SimpleQueue()

                def run() -> None:
                    while (item := q.get()) is not None:
                        item[0].dispatch(item[1])

                threading.Thread(target=run, name="fake-dispatch", daemon=True).start()
                self._worker_queue = q
            return self._worker_queue

    def close(self) -> None:
        if self._closed:
            return
        self.stop_streaming()
        self._closed = True
        if self._worker_queue is not None:
            self._worker_queue.put(None)


_NEVER_MESSAGE = "Cannot read with @N (never) event"


class AsyncFakeBackend(_AsyncBackend):
    """The async twin of FakeBackend: the same state and helpers, awaited directly."""

    def __init__(self):
        self._sync = FakeBackend(dispatch_mode=DispatchMode.DIRECT)
        self._closed = False
        self._handles: list[AsyncSubscriptionHandle] = []

    # -- state set-up and inspection, delegated ----------------------------------------

    def set_reading(self, drf, value, **kwargs):
        self._sync.set_reading(drf, value, **kwargs)

    def set_error(self, drf, error_code, message=None, **kwargs):
        self._sync.set_error(drf, error_code, message, **kwargs)

    def set_write_result(self, drf, **kwargs):
        self._sync.set_write_result(drf, **kwargs)

    def set_analog_alarm(self, drf, alarm):
        self._sync.set_analog_alarm(drf, alarm)

    def set_digital_alarm(self, drf, alarm):
        self._sync.set_digital_alarm(drf, alarm)

    def reset(self):
        self._sync.reset()
        self._handles.clear()

    def was_read(self, drf):
        return self._sync.was_read(drf)

    def was_written(self, drf):
        return self._sync.was_written(drf)

    def get_written_value(self, drf):
        return self._sync.get_written_value(drf)

    @property
    def reads(self):
        return self._sync.reads

    @property
    def writes(self):
        return self._sync.writes

    @property
    def subscription_count(self) -> int:
        return self._sync.subscription_count

    def emit_reading(self, drf, value, **kwargs):
        self._sync.emit_reading(drf, value, **kwargs)

    def emit_error(self, error, error_code=None, message=None, **kwargs):
        self._sync.emit_error(error, error_code, message, **kwargs)

    # -- AsyncBackend ------------------------------------------------------------------

    @property
    def capabilities(self) -> BackendCapability:
        return self._sync.capabilities

    @property
    def authenticated(self) -> bool:
        return True

    @property
    def principal(self) -> str:
        return PRINCIPAL

    def _check_closed(self):
        if self._closed:
            raise RuntimeError("Backend is closed")

    async def read(self, drf, timeout=None):
        self._check_closed()
        return self._sync.read(drf, timeout=timeout)

    async def get(self, drf, timeout=None):
        self._check_closed()
        return self._sync.get(drf, timeout=timeout)

    async def get_many(self, drfs, timeout=None):
        self._check_closed()
        return self._sync.get_many(drfs, timeout=timeout)

    async def write(self, drf, value, timeout=None):
        self._check_closed()
        return self._sync.write(drf, value, timeout=timeout)

    async def write_many(self, settings, timeout=None):
        self._check_closed()
        return self._sync.write_many(settings, timeout=timeout)

    async def subscribe(self, drfs, callback=None, on_error=None):
        self._check_closed()
        sync_handle: SubscriptionHandle | None = None

        async def remove(_handle: AsyncSubscriptionHandle) -> None:
            if sync_handle is not None:
                sync_handle.stop()

        handle = AsyncSubscriptionHandle(remover=remove)
        self._handles.append(handle)
        # The sync fake calls back on the emitter's thread; dispatch hands it to our loop.
        sync_handle = self._sync.subscribe(
            drfs,
            callback=lambda reading, _h: handle.dispatch(reading),
            on_error=lambda exc, _h: handle.signal_error(exc),
        )
        return handle

    async def close(self):
        if self._closed:
            return
        self._closed = True
        for h in self._handles:
            await h.stop()
        self._handles.clear()
        self._sync.close()


def demo_backend() -> FakeBackend:
    """The `fake` backend spec of the command: a FakeBackend with M:OUTTMP=72.5 and G:AMANDA=42.0."""
    fb = FakeBackend()
    fb.set_reading("M:OUTTMP", 72.5)
    fb.set_reading("G:AMANDA", 42.0)
    return fb


__all__ = ["PRINCIPAL", "AsyncFakeBackend", "FakeBackend", "FakeSubscriptionHandle", "demo_backend", "event_offset"]
