"""The async backend interface: the one the gateway's servicer calls.

Implement `capabilities`, `get_many` and `close`; writes and subscriptions are optional
(the defaults raise NotImplementedError, answered with UNIMPLEMENTED). A sync
`pacsys.backends.Backend` becomes one of these through `pacsys.aio.as_async`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from pacsys.aio._subscription import AsyncSubscriptionHandle
from pacsys.backends import summarize_drfs
from pacsys.errors import DeviceError, ReadError
from pacsys.types import BackendCapability, Reading, Value, WriteResult
from workers.reply_body import reading_body


class AsyncBackend(ABC):
    @property
    @abstractmethod
    def capabilities(self) -> BackendCapability: ...

    @property
    def authenticated(self) -> bool:
        """Whether the backend holds credentials (as `Backend.authenticated`)."""
        return False

    @property
    def principal(self) -> str | None:
        """Who the backend acts as, when authenticated."""
        return None

    @abstractmethod
    async def get_many(self, drfs: list[str], timeout: float | None = None) -> list[Reading]:
        """One reading per DRF, in order; a device failure is an error reading, not an exception."""

    async def read_bodies(
        self, drfs: list[str], timeout: float | None = None, devices: Sequence[str] | None = None
    ) -> list[bytes]:
        """One reading per DRF, in order, as its DAQ reply body (`reading_body`): what the servicer's
        one-shot Read sends. `devices` are the DRFs' canonical device names, when the caller has
        parsed them. A backend whose readings arrive encoded (the worker pool) passes the bodies
        through without building Readings; any other encodes its readings here."""
        return [reading_body(r) for r in await self.get_many(drfs, timeout=timeout)]

    async def get(self, drf: str, timeout: float | None = None) -> Reading:
        return (await self.get_many([drf], timeout=timeout))[0]

    async def read(self, drf: str, timeout: float | None = None) -> Value:
        reading = await self.get(drf, timeout=timeout)
        if not reading.ok:
            raise DeviceError(drf, reading.facility_code, reading.error_code, reading.message)
        return reading.value

    async def read_many(self, drfs: list[str], timeout: float | None = None) -> list[Value]:
        readings = await self.get_many(drfs, timeout=timeout)
        failed = [r.drf for r in readings if not r.ok]
        if failed:
            raise ReadError(f"device errors: {summarize_drfs(failed)}")
        return [r.value for r in readings]

    async def write(self, drf: str, value: Value, timeout: float | None = None) -> WriteResult:
        return (await self.write_many([(drf, value)], timeout=timeout))[0]

    async def write_many(self, settings: list[tuple[str, Value]], timeout: float | None = None) -> list[WriteResult]:
        raise NotImplementedError("this backend does not support writes")

    async def subscribe(self, drfs: list[str], callback: Any = None, on_error: Any = None) -> AsyncSubscriptionHandle:
        """Start a subscription; iterate `handle.readings()` for its data."""
        raise NotImplementedError("this backend does not support streaming")

    async def subscribe_bodies(self, drfs: list[str]) -> AsyncSubscriptionHandle:
        """A subscription for a consumer that only forwards each reading's DAQ reply body (the
        servicer's stream). A backend whose readings arrive encoded (the worker pool) hands over
        (DRF, body) pairs and builds no Readings; any other hands over its Readings (this default:
        `subscribe`), which the consumer encodes (`reading_body`)."""
        return await self.subscribe(drfs)

    async def remove(self, handle: AsyncSubscriptionHandle) -> None:
        await handle.stop()

    async def stop_streaming(self) -> None:
        raise NotImplementedError("this backend does not support streaming")

    @abstractmethod
    async def close(self) -> None: ...

    async def __aenter__(self) -> AsyncBackend:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()
