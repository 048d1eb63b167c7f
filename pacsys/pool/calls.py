"""One-shot calls on the workers: reads and writes, with their wait and retry rules.

A call is split by device over the workers that serve them (`pacsys.pool.routing`), sent in
parallel and reassembled in request order. A call that finds no worker serving waits for
one, for at most `worker_wait` seconds and never past the client's own deadline, then
answers UNAVAILABLE. A read in flight on a worker that dies is retried once on each
device's next worker (reads are idempotent); a write is never sent twice: one in flight on
a worker that dies answers DPM_WRITE_OUTCOME_UNKNOWN, and a write waits for a worker only
before it is sent.

A one-shot read through the servicer (`read_bodies`) answers with each reading's DAQ reply
body as the worker encoded it: no `Reading` is built where nothing reads one, and each
DRF's device comes from the gate's parse (`devices`) rather than the parse cache again.
`get_many` (a library caller's) builds the Readings.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from pacsys.aio import caller_authorization
from pacsys.errors import BackendUnavailable
from pacsys.pool.process import WorkerLost, WorkerProcess
from pacsys.pool.routing import Router
from pacsys.pool.stats import PoolStats
from pacsys.pool.wire import body_of, reading_from_wire
from pacsys.status import DPM, DPM_WRITE_OUTCOME_UNKNOWN
from pacsys.types import Reading, Value, WriteResult
from workers import protocol as p


class OneShotCalls:
    def __init__(
        self,
        router: Router[WorkerProcess],
        any_serving: asyncio.Event,
        ids: itertools.count,
        stats: PoolStats,
        worker_wait: float,
        over_request_limit: Callable[[WorkerProcess], None],
        clock: Callable[[], float] = time.monotonic,
    ):
        self._router = router
        self._any_serving = any_serving  # set by the pool while any worker serves
        self._ids = ids
        self._stats = stats
        self._worker_wait = worker_wait
        # Called when a worker has served its `recycle_after` requests (the pool recycles it).
        self._over_request_limit = over_request_limit
        self._clock = clock  # for the time a call has left after waiting or a retry

    async def _wait_to_route(
        self,
        drfs: list[str],
        positions: list[int],
        timeout: float | None,
        devices: Sequence[str] | None = None,
    ) -> tuple[dict[WorkerProcess, list[int]], float | None]:
        """Some positions have no serving worker: wait for one, at most `worker_wait` and never
        past `timeout`; then the positions grouped, and the time left."""
        self._stats.calls_waited += 1
        wait = self._worker_wait if timeout is None else min(self._worker_wait, timeout)
        started = self._clock()
        try:
            async with asyncio.timeout(wait):
                while True:  # a worker that serves again may be lost again before this call runs
                    await self._any_serving.wait()
                    groups, unserved = self._router.group(drfs, positions, devices)
                    if not unserved:
                        break
                    await asyncio.sleep(0.01)
        except TimeoutError:
            self._stats.calls_unavailable += 1
            raise BackendUnavailable(f"no backend worker became ready within {wait:g} s") from None
        return groups, None if timeout is None else max(0.0, timeout - (self._clock() - started))

    async def wait_for_a_worker(self) -> None:
        """Wait until any worker serves (at most `worker_wait`): a new stream, like a one-shot call."""
        self._stats.calls_waited += 1
        try:
            async with asyncio.timeout(self._worker_wait):
                await self._any_serving.wait()
        except TimeoutError:
            self._stats.calls_unavailable += 1
            raise BackendUnavailable(f"no backend worker became ready within {self._worker_wait:g} s") from None

    async def _call(self, worker: WorkerProcess, message: p.Read | p.Write, timeout: float | None) -> Any:
        """Send the request to the worker and wait for its reply.

        WorkerLost when the worker is gone or dies first; TimeoutError after `timeout` (the
        worker then forgets the request). The deadline is a timer on the reply itself, not an
        `asyncio.timeout` around the await: one timer, no context manager per call, and none
        at all for a call without a deadline (most of them).
        """
        reply = worker.request(message)
        if worker.recycle_due:
            self._over_request_limit(worker)
        if timeout is None:
            return await reply
        expiry = reply.get_loop().call_later(timeout, _expire, reply)
        try:
            return await reply
        finally:
            expiry.cancel()

    async def get_many(self, drfs: list[str], timeout: float | None = None) -> list[Reading]:
        """Each DRF's Reading, in order."""
        read = _Read(drfs, None, reading_from_wire)
        await self._read_positions(read, range(len(drfs)), timeout, retry=True)
        return read.results

    async def read_bodies(
        self, drfs: list[str], timeout: float | None = None, devices: Sequence[str] | None = None
    ) -> list[bytes]:
        """Each DRF's reading as the DAQ reply body its worker encoded, in order (no Reading built).

        `devices` are the DRFs' canonical device names when the caller has parsed them.
        """
        read = _Read(drfs, devices, body_of)
        await self._read_positions(read, range(len(drfs)), timeout, retry=True)
        return read.results

    async def _read_positions(self, read: _Read, positions: Iterable[int], timeout: float | None, retry: bool) -> None:
        positions = list(positions)
        groups, unserved = self._router.group(read.drfs, positions, read.devices)
        if unserved:
            groups, timeout = await self._wait_to_route(read.drfs, positions, timeout, read.devices)
        await _all(self._read_group(read, w, at, timeout, retry) for w, at in groups.items())

    async def _read_group(
        self, read: _Read, worker: WorkerProcess, positions: list[int], timeout: float | None, retry: bool
    ) -> None:
        drfs = read.drfs
        subset = drfs if len(positions) == len(drfs) else [drfs[i] for i in positions]
        started = self._clock() if timeout is not None else 0.0
        message = p.Read(id=next(self._ids), drfs=subset, timeout=timeout, authorization=read.auth)
        try:
            reply = await self._call(worker, message, timeout)
        except WorkerLost:
            if not retry:
                raise BackendUnavailable("the backend worker died twice while reading") from None
            # Reads are idempotent: once more, on each device's next worker.
            self._stats.reads_retried += 1
            left = None if timeout is None else max(0.0, timeout - (self._clock() - started))
            await self._read_positions(read, positions, left, retry=False)
            return
        answer, results = read.answer, read.results
        for pos, wire in zip(positions, reply.readings, strict=True):
            results[pos] = answer(drfs[pos], wire)

    async def write_many(self, settings: list[tuple[str, Value]], timeout: float | None = None) -> list[WriteResult]:
        drfs = [d for d, _ in settings]
        # A write waits for a worker only before it is sent: once sent, it is never sent again.
        positions = list(range(len(drfs)))
        groups, unserved = self._router.group(drfs, positions)
        if unserved:
            groups, timeout = await self._wait_to_route(drfs, positions, timeout)
        results: list[WriteResult | None] = [None] * len(settings)
        auth = caller_authorization.get()

        async def write_group(worker: WorkerProcess, positions: list[int]) -> None:
            subset = [drfs[i] for i in positions]
            values = [settings[i][1] for i in positions]
            try:
                message = p.Write(id=next(self._ids), drfs=subset, values=values, timeout=timeout, authorization=auth)
                reply = await self._call(worker, message, timeout)
            except WorkerLost:
                # Never replayed: the setting may or may not have reached the device.
                self._stats.writes_outcome_unknown += len(positions)
                for pos in positions:
                    results[pos] = WriteResult(
                        drf=drfs[pos],
                        facility_code=DPM,
                        error_code=DPM_WRITE_OUTCOME_UNKNOWN,
                        message="backend worker lost while writing; outcome unknown, not retried",
                    )
                return
            for pos, r in zip(positions, reply.results, strict=True):
                results[pos] = WriteResult(
                    drf=drfs[pos], facility_code=r.facility, error_code=r.error, message=r.message
                )

        await _all(write_group(w, pos) for w, pos in groups.items())
        return results  # type: ignore[return-value]


class _Read:
    """One one-shot read in progress: its DRFs (and their devices, when known), what each wire
    reading becomes (`answer`), the caller's authorization and the answers so far."""

    __slots__ = ("answer", "auth", "devices", "drfs", "results")

    def __init__(self, drfs: list[str], devices: Sequence[str] | None, answer: Callable[[str, p.WireReading], Any]):
        self.drfs = drfs
        self.devices = devices
        self.answer = answer
        self.auth = caller_authorization.get()
        self.results: list[Any] = [None] * len(drfs)


def _expire(reply: asyncio.Future) -> None:
    """A worker's reply past its deadline: the call raises TimeoutError (and the request is forgotten)."""
    if not reply.done():
        reply.set_exception(TimeoutError())


async def _all(coros: Iterable[Any]) -> None:
    """Await the coroutines concurrently; a lone one is awaited directly (no task: the common case)."""
    pending = list(coros)
    if len(pending) == 1:
        await pending[0]
    else:
        await asyncio.gather(*pending)
