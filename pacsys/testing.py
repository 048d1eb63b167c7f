"""Fakes for tests: an in-memory sync backend and its async twin.

`FakeBackend` holds one value per device and property group (READING and SETTING are
one group, so a write is seen by later reads; STATUS/CONTROL, ANALOG, DIGITAL and
DESCRIPTION are groups of their own). A DRF that was never set reads as DPM "no such
device". `emit_reading` pushes a reading to every live subscription that names the same
device and group; the subscriber sees it under the DRF it subscribed with.
"""

from __future__ import annotations

import queue
import threading
from datetime import UTC, datetime

from pacsys.aio._backends import AsyncBackend as _AsyncBackend
from pacsys.aio._subscription import AsyncSubscriptionHandle
from pacsys.backends import Backend
from pacsys.backends._subscription import SubscriptionHandle
from pacsys.drf import DRFError, Property, parse_cached
from pacsys.types import (
    BackendCapability,
    DispatchMode,
    ErrorCallback,
    Reading,
    ReadingCallback,
    Value,
    ValueType,
    WriteResult,
    infer_value_type,
)

DPM = 17
NO_SUCH_DEVICE = -26

_GROUP = {
    Property.READING: "value",
    Property.SETTING: "value",
    Property.STATUS: "status",
    Property.CONTROL: "status",
    Property.ANALOG: "analog",
    Property.DIGITAL: "digital",
}


def _key(drf: str) -> tuple[str, str]:
    """(device, property group) of a DRF; an unparseable string is its own key."""
    try:
        parsed = parse_cached(drf)
    except DRFError:
        return (drf.upper(), "value")
    return (parsed.device, _GROUP.get(parsed.property, parsed.property.name.lower()))


class FakeSubscriptionHandle(SubscriptionHandle):
    """A FakeBackend subscription; `keys` are the (device, group) pairs it listens to."""

    def __init__(self, drfs, callback=None, on_error=None, on_stop=None):
        super().__init__(drfs, callback=callback, on_error=on_error, on_stop=on_stop)
        self.keys = {_key(d): d for d in drfs}


class FakeBackend(Backend):
    def __init__(self, dispatch_mode: DispatchMode = DispatchMode.WORKER):
        self._dispatch_mode = dispatch_mode
        self._lock = threading.RLock()
        self._state: dict[tuple[str, str], Reading] = {}
        self._write_results: dict[tuple[str, str], tuple[int, int, str | None]] = {}
        self._handles: list[FakeSubscriptionHandle] = []
        self._reads: list[str] = []
        self._writes: list[tuple[str, Value]] = []
        self._closed = False
        self._worker_queue: queue.SimpleQueue | None = None

    @property
    def capabilities(self) -> BackendCapability:
        return BackendCapability.READ | BackendCapability.WRITE | BackendCapability.STREAM | BackendCapability.BATCH

    # -- state set-up ------------------------------------------------------------------

    def set_reading(
        self,
        drf: str,
        value: Value,
        value_type: ValueType | None = None,
        error_code: int = 0,
        facility_code: int = 0,
        message: str | None = None,
        timestamp: datetime | None = None,
        cycle: int | None = None,
    ) -> None:
        with self._lock:
            self._state[_key(drf)] = Reading(
                drf=drf,
                value_type=value_type or infer_value_type(value),
                value=value,
                error_code=error_code,
                facility_code=facility_code,
                message=message,
                timestamp=timestamp,
                cycle=cycle,
            )

    def set_error(self, drf: str, error_code: int, message: str | None = None, facility_code: int = DPM) -> None:
        with self._lock:
            self._state[_key(drf)] = Reading(
                drf=drf, facility_code=facility_code, error_code=error_code, message=message
            )

    def set_write_result(
        self, drf: str, success: bool = True, error_code: int = -1, message: str | None = None, facility_code: int = DPM
    ) -> None:
        """What later writes to this device answer (success, or the given error)."""
        with self._lock:
            self._write_results[_key(drf)] = (0, 0, None) if success else (facility_code, error_code, message)

    def set_analog_alarm(self, drf: str, alarm: dict) -> None:
        name = _key(drf)[0]
        self.set_reading(f"{name}.ANALOG", dict(alarm), value_type=ValueType.ANALOG_ALARM)

    def set_digital_alarm(self, drf: str, alarm: dict) -> None:
        name = _key(drf)[0]
        self.set_reading(f"{name}.DIGITAL", dict(alarm), value_type=ValueType.DIGITAL_ALARM)

    def reset(self) -> None:
        with self._lock:
            self._state.clear()
            self._write_results.clear()
            self._reads.clear()
            self._writes.clear()
            handles, self._handles = self._handles, []
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
        stored = self._state.get(_key(drf))
        if stored is None:
            return Reading(drf=drf, facility_code=DPM, error_code=NO_SUCH_DEVICE, message="no such device")
        return Reading(
            drf=drf,
            value_type=stored.value_type,
            value=stored.value,
            facility_code=stored.facility_code,
            error_code=stored.error_code,
            message=stored.message,
            timestamp=stored.timestamp or datetime.now(UTC),
            cycle=stored.cycle,
        )

    def get_many(self, drfs: list[str], timeout: float | None = None) -> list[Reading]:
        self._check_open()
        with self._lock:
            self._reads.extend(drfs)
            return [self._reading_for(d) for d in drfs]

    def write_many(self, settings: list[tuple[str, Value]], timeout: float | None = None) -> list[WriteResult]:
        self._check_open()
        results = []
        with self._lock:
            for drf, value in settings:
                self._writes.append((drf, value))
                key = _key(drf)
                facility, error, message = self._write_results.get(key, (0, 0, None))
                if error == 0:
                    self._state[key] = Reading(drf=drf, value_type=infer_value_type(value), value=value)
                results.append(WriteResult(drf=drf, facility_code=facility, error_code=error, message=message))
        return results

    def subscribe(
        self,
        drfs: list[str],
        callback: ReadingCallback | None = None,
        on_error: ErrorCallback | None = None,
    ) -> FakeSubscriptionHandle:
        self._check_open()
        handle = FakeSubscriptionHandle(drfs, callback=callback, on_error=on_error, on_stop=self._forget)
        with self._lock:
            self._handles.append(handle)
        return handle

    def _forget(self, handle: SubscriptionHandle) -> None:
        with self._lock:
            if handle in self._handles:
                self._handles.remove(handle)

    def stop_streaming(self) -> None:
        with self._lock:
            handles, self._handles = self._handles, []
        for h in handles:
            h.stop()

    @property
    def subscription_count(self) -> int:
        with self._lock:
            return len(self._handles)

    def emit_reading(self, drf: str, value: Value, value_type: ValueType | None = None, **fields) -> None:
        """Push a reading to every subscription of this device and property group."""
        fields.setdefault("timestamp", datetime.now(UTC))
        self._emit(drf, dict(value_type=value_type or infer_value_type(value), value=value, **fields))

    def emit_error(self, drf: str, error_code: int, message: str | None = None, facility_code: int = DPM) -> None:
        self._emit(drf, dict(facility_code=facility_code, error_code=error_code, message=message))

    def _emit(self, drf: str, fields: dict) -> None:
        key = _key(drf)
        with self._lock:
            targets = [(h, h.keys[key]) for h in self._handles if key in h.keys]
        for handle, subscribed_drf in targets:
            reading = Reading(drf=subscribed_drf, **fields)
            if self._dispatch_mode is DispatchMode.DIRECT:
                handle._dispatch(reading)
            else:
                self._worker().put((handle, reading))

    def _worker(self) -> queue.SimpleQueue:
        """The callback thread of WORKER dispatch: one thread, readings in emit order."""
        with self._lock:
            if self._worker_queue is None:
                q: queue.SimpleQueue = queue.SimpleQueue()

                def run() -> None:
                    while (item := q.get()) is not None:
                        item[0]._dispatch(item[1])

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

    def emit_error(self, drf, error_code, message=None, **kwargs):
        self._sync.emit_error(drf, error_code, message, **kwargs)

    # -- AsyncBackend ------------------------------------------------------------------

    @property
    def capabilities(self) -> BackendCapability:
        return self._sync.capabilities

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
        # The sync fake calls back on the emitter's thread; _dispatch hands it to our loop.
        sync_handle = self._sync.subscribe(drfs, callback=lambda reading, _h: handle._dispatch(reading))
        return handle

    async def close(self):
        if self._closed:
            return
        self._closed = True
        for h in self._handles:
            await h.stop()
        self._handles.clear()
        self._sync.close()


__all__ = ["FakeBackend", "FakeSubscriptionHandle", "AsyncFakeBackend"]
