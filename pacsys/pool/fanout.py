"""Fan-out: one backend subscription per distinct DRF, shared by every client stream on it.

Each client stream has its own bounded handle, so a slow client loses its own oldest
readings and nobody else's, and never blocks a worker. The last client leaving closes the
backend subscription after a linger (a reconnecting client finds it still open). A late
joiner to a periodic DRF gets the latest reading at once, with its original timestamp. A
subscription lives on the worker that serves its device; when that changes (a death, a
restart, a recycle, scaling), `rebalance()` moves it, and the gap is counted.

A client stream of the servicer takes each reading as the pair (DRF, reply body) its worker
encoded (`subscribe(..., bodies=True)`): one pair per backend reading, shared by every such
stream, and no `Reading` built for them. A `Reading` is built, once per backend reading, only
while a library caller of `subscribe` listens.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable

from pacsys.aio import AsyncSubscriptionHandle
from pacsys.drf import DRFError, parse_cached
from pacsys.pool.process import WorkerProcess
from pacsys.pool.stats import GapStats
from pacsys.pool.wire import body_of, reading_from_wire
from pacsys.replies import reading_body
from pacsys.status import DPM, DPM_INTERNAL
from pacsys.types import Reading
from workers import protocol as p


class Shared:
    """One backend subscription (one canonical DRF) and the client streams that share it."""

    def __init__(self, key: str, device: str, periodic: bool, authorization: str | None):
        self.key = key
        self.device = device
        self.periodic = periodic
        self.authorization = authorization  # the first subscriber's, sent with the subscription
        self.sid = 0
        self.worker: WorkerProcess | None = None  # the worker holding the backend subscription
        self.streams: set[AsyncSubscriptionHandle] = set()  # take (drf, body) pairs
        self.readers: set[AsyncSubscriptionHandle] = set()  # take Readings
        self.last: p.WireReading | None = None  # for a late joiner, with its original timestamp
        self.linger: asyncio.TimerHandle | None = None
        self.gap_started: float | None = None

    @property
    def listened(self) -> bool:
        return bool(self.streams or self.readers)

    def deliver(self, wire: p.WireReading) -> None:
        """One backend reading to every client: the worker's body to the streams, a Reading to the readers."""
        if self.streams:
            pair = (self.key, body_of(self.key, wire))
            for handle in self.streams:
                handle.dispatch_on_loop(pair)  # the pool and its handles share the front's loop
        if self.readers:
            reading = reading_from_wire(self.key, wire)
            for handle in self.readers:
                handle.dispatch_on_loop(reading)


class Fanout:
    def __init__(
        self,
        owner: Callable[[str], WorkerProcess | None],
        ids: itertools.count,
        stream_buffer: int,
        linger: float,
        gaps: GapStats,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._owner = owner
        self._ids = ids
        self.stream_buffer = stream_buffer
        self.linger = linger
        self.gaps = gaps  # counted into the pool's stats
        self._clock = clock  # for the length of a stream gap
        self._shared: dict[str, Shared] = {}
        self._by_sid: dict[int, Shared] = {}
        self._clients: dict[AsyncSubscriptionHandle, list[Shared]] = {}

    # -- what the pool reports -------------------------------------------------------------

    @property
    def subscription_count(self) -> int:
        """Backend subscriptions held in the workers (one per distinct DRF in use)."""
        return sum(1 for s in self._shared.values() if s.worker is not None)

    @property
    def client_count(self) -> int:
        return len(self._clients)

    def by_slot(self) -> tuple[dict[int, int], dict[int, set[str]]]:
        """Subscriptions and distinct devices held per slot."""
        subscriptions: dict[int, int] = {}
        devices: dict[int, set[str]] = {}
        for shared in self._shared.values():
            if shared.worker is not None:
                slot = shared.worker.slot
                subscriptions[slot] = subscriptions.get(slot, 0) + 1
                devices.setdefault(slot, set()).add(shared.device)
        return subscriptions, devices

    # -- clients ---------------------------------------------------------------------------

    def subscribe(self, drfs: list[str], authorization: str | None, bodies: bool = False) -> AsyncSubscriptionHandle:
        """A client stream on `drfs`: its handle takes Readings, or with `bodies` (DRF, reply body) pairs."""
        handle = AsyncSubscriptionHandle(remover=self._release, maxsize=self.stream_buffer)
        shares: list[Shared] = []
        for drf in drfs:
            try:
                parsed = parse_cached(drf)
            except DRFError as exc:
                raise ValueError(str(exc)) from None
            shared = self._shared.get(parsed.canonical)
            if shared is None:
                event = parsed.event
                periodic = event is None or event.kind in ("P", "Q", "U")
                shared = Shared(parsed.canonical, parsed.device, periodic, authorization)
                self._shared[shared.key] = shared
                self._place(shared)
            if shared in shares:
                continue
            if shared.linger is not None:
                shared.linger.cancel()
                shared.linger = None
            (shared.streams if bodies else shared.readers).add(handle)
            shares.append(shared)
            last = shared.last
            if last is not None and shared.periodic:  # a late joiner gets the latest reading at once
                handle.dispatch(
                    (shared.key, body_of(shared.key, last)) if bodies else reading_from_wire(shared.key, last)
                )
        self._clients[handle] = shares
        return handle

    async def _release(self, handle: AsyncSubscriptionHandle) -> None:
        loop = asyncio.get_running_loop()
        for shared in self._clients.pop(handle, []):
            shared.streams.discard(handle)
            shared.readers.discard(handle)
            if not shared.listened and shared.linger is None:
                shared.linger = loop.call_later(self.linger, self._close_shared, shared)

    def _close_shared(self, shared: Shared) -> None:
        shared.linger = None
        if shared.listened or self._shared.get(shared.key) is not shared:
            return
        del self._shared[shared.key]
        self._unplace(shared)

    def stop_all(self) -> None:
        """The pool closes: every client stream ends."""
        for handle in list(self._clients):
            handle.signal_stop()
        self._clients.clear()

    # -- placement -------------------------------------------------------------------------

    def _place(self, shared: Shared) -> None:
        """Open the backend subscription on the device's worker (or leave it waiting for one)."""
        worker = self._owner(shared.device)
        shared.worker = worker
        if worker is None:
            return
        shared.sid = next(self._ids)
        self._by_sid[shared.sid] = shared
        worker.send(p.Subscribe(sid=shared.sid, drf=shared.key, authorization=shared.authorization))

    def _unplace(self, shared: Shared) -> None:
        worker, sid = shared.worker, shared.sid
        self._by_sid.pop(sid, None)
        shared.worker = None
        if worker is not None:
            worker.send(p.Unsubscribe(sid=sid))  # (a worker whose socket closed is sent nothing)

    def rebalance(self) -> None:
        """Put every subscription on the worker that now serves its device.

        After a death its subscriptions move to the device's next worker (a gap, counted);
        when the slot is back, or a recycled worker's replacement is ready, they move again.
        """
        now = self._clock()
        for shared in list(self._shared.values()):
            target = self._owner(shared.device)
            current = shared.worker
            if current is target and current is not None:
                continue
            if current is None or current.gone:
                self._mark_gap(shared, now)
            if target is None:
                if current is not None and current.gone:
                    self._by_sid.pop(shared.sid, None)
                    shared.worker = None
                continue
            self._unplace(shared)
            self._place(shared)

    def _mark_gap(self, shared: Shared, now: float) -> None:
        if shared.gap_started is None:
            shared.gap_started = now
            self.gaps.stream_gaps += 1

    # -- what workers send -----------------------------------------------------------------

    def on_data(self, worker: WorkerProcess, msg: p.Data) -> None:
        now: float | None = None
        for sid, wire in msg.items:
            shared = self._by_sid.get(sid)
            if shared is None or shared.worker is not worker:
                continue  # late data of a subscription that moved or closed
            shared.last = wire
            if shared.gap_started is not None:
                now = now or self._clock()
                gap = now - shared.gap_started
                shared.gap_started = None
                self.gaps.last_gap_seconds = gap
                self.gaps.max_gap_seconds = max(self.gaps.max_gap_seconds, gap)
            shared.deliver(wire)

    def on_ended(self, worker: WorkerProcess, msg: p.SubscriptionEnded) -> None:
        """The backend refused or ended one DRF: its clients get a status for that slot, nothing more."""
        shared = self._by_sid.pop(msg.sid, None)
        if shared is None or shared.worker is not worker:
            return
        shared.worker = None
        if self._shared.get(shared.key) is shared:
            del self._shared[shared.key]
        reading = Reading(
            drf=shared.key, facility_code=DPM, error_code=DPM_INTERNAL, message=f"{msg.kind}: {msg.message}"
        )
        pair = (shared.key, reading_body(reading))
        for handle in shared.streams:
            handle.dispatch(pair)
        for handle in shared.readers:
            handle.dispatch(reading)
        for handle in shared.streams | shared.readers:
            shares = self._clients.get(handle)
            if shares is not None and shared in shares:
                shares.remove(shared)
