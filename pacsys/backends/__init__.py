"""The sync backend interface.

A backend talks to devices. Implement `capabilities`, `get_many` and `close`; the
single-item and value-only calls have defaults built on the batch calls. Writes and
subscriptions are optional: the defaults raise NotImplementedError, which the gateway
answers with UNIMPLEMENTED.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from pacsys.backends._subscription import (
    BufferedSubscriptionHandle,
    ErrorCallback,
    ReadingCallback,
    SubscriptionHandle,
    summarize_drfs,
)
from pacsys.backends.combined import CombinedStream
from pacsys.errors import DeviceError, ReadError
from pacsys.types import BackendCapability, DispatchMode, Reading, Value, WriteResult


class Backend(ABC):
    """A synchronous backend. Its one-shot calls must be safe to call from several threads."""

    @property
    @abstractmethod
    def capabilities(self) -> BackendCapability: ...

    @property
    def dispatch_mode(self) -> DispatchMode:
        return getattr(self, "_dispatch_mode", DispatchMode.WORKER)

    @property
    def authenticated(self) -> bool:
        return False

    @property
    def principal(self) -> str | None:
        return None

    @abstractmethod
    def get_many(self, drfs: list[str], timeout: float | None = None) -> list[Reading]:
        """One reading per DRF, in order; a device failure is an error reading, not an exception."""

    def get(self, drf: str, timeout: float | None = None) -> Reading:
        return self.get_many([drf], timeout=timeout)[0]

    def read(self, drf: str, timeout: float | None = None) -> Value:
        """The value alone; DeviceError when the reading has no usable data."""
        reading = self.get(drf, timeout=timeout)
        if not reading.ok:
            raise DeviceError(drf, reading.facility_code, reading.error_code, reading.message)
        return reading.value

    def read_many(self, drfs: list[str], timeout: float | None = None) -> list[Value]:
        readings = self.get_many(drfs, timeout=timeout)
        failed = [r.drf for r in readings if not r.ok]
        if failed:
            raise ReadError(f"device errors: {summarize_drfs(failed)}")
        return [r.value for r in readings]

    def write(self, drf: str, value: Value, timeout: float | None = None) -> WriteResult:
        return self.write_many([(drf, value)], timeout=timeout)[0]

    def write_many(self, settings: list[tuple[str, Value]], timeout: float | None = None) -> list[WriteResult]:
        raise NotImplementedError("this backend does not support writes")

    def subscribe(
        self,
        drfs: list[str],
        callback: ReadingCallback | None = None,
        on_error: ErrorCallback | None = None,
    ) -> SubscriptionHandle:
        raise NotImplementedError("this backend does not support streaming")

    def remove(self, handle: SubscriptionHandle) -> None:
        handle.stop()

    def stop_streaming(self) -> None:
        raise NotImplementedError("this backend does not support streaming")

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


__all__ = [
    "Backend",
    "BufferedSubscriptionHandle",
    "CombinedStream",
    "ErrorCallback",
    "ReadingCallback",
    "SubscriptionHandle",
    "summarize_drfs",
]
