"""The byte budget of readings queued for client streams, and the streams it ends.

A reading queued for a client stream holds memory until the stream writes it. A client that
stops reading leaves gRPC's write waiting on HTTP/2 flow control, and its streams' queues fill
up to `stream_buffer` readings each: without a budget, a few clients could hold gigabytes.

What a queued reading costs is estimated from its encoded reply body: `QUEUED_READING_BYTES`
for the objects every reading has (the `Reading`, its timestamp, its body's bytes object, the
queue's slot) plus `BODY_WEIGHT` bytes per byte of body, because the Python value behind a
body (a list of floats, a text) takes several times the body's size. A worker pool's streams
queue the body the worker encoded (with its DRF); a backend in process queues Readings, whose
body is encoded to count it (and again when the stream writes it). Measured with tracemalloc: a scalar reading 498 bytes (29 of body), one of 64
distinct floats 3,090 bytes (541 of body), 200 raw bytes 904 (225 of body); the estimate gives
516, 2,564 and 1,300. A stream's handle counts each reading's cost from the moment it is queued
until the stream has written it or it was dropped (`AsyncSubscriptionHandle.meter`); the totals
per client and for the service are summed here, every `interval` seconds, not per reading.

What the budget looks at, per stream, at each look:

- *stalled*: its client is not taking its replies. A reply has been in gRPC's hands, waiting
  on the client's flow-control window, with no reply of the stream written since an earlier
  look; stalled for as long as that lasts. A client that reads, however slowly, has its
  replies written between two looks (at most `interval` apart); so does every stream of a
  busy server, whose writes wait on the event loop, not on the client.
- *behind*: since it last found its queue empty (or held nothing). A reader that keeps up
  finds its queue empty between batches; one that catches up after a pause does so again.

Two budgets:

- per client, `max_queued_bytes_per_peer` over all of its streams: when a client holds more,
  its streams stalled for `stalled_stream_seconds` are ended (RESOURCE_EXHAUSTED), the largest
  queue first, until the rest fits.
- service-wide, `max_queued_bytes` over all clients: when they hold more, a client's share is
  `max_queued_bytes` divided by the clients holding readings; the client holding the most is
  cut first, its streams behind for `stalled_stream_seconds` largest queue first, down to its
  share, then the next one, until the total fits. A client within its share is never cut.

So a client that stops reading for less than `stalled_stream_seconds` is not cut, whatever it
holds, nor one that reads (its oldest readings drop at `stream_buffer`, as before) unless the
whole service holds more than `max_queued_bytes` and it holds more than its share; a reader
that catches up is never cut. A client exceeds its budget by what it receives in
`stalled_stream_seconds` (and one `interval`) at most before its stalled streams are ended.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from pacsys.types import Reading
from workers.reply_body import reading_body

__all__ = [
    "BODY_WEIGHT",
    "PER_PEER",
    "QUEUED_READING_BYTES",
    "SERVICE",
    "Cut",
    "QueueBudget",
    "Queued",
    "queued_cost",
]

QUEUED_READING_BYTES = 400  # what a queued reading costs besides its body (measured: see above)
BODY_WEIGHT = 4  # bytes counted per byte of its encoded body

PER_PEER = "max_queued_bytes_per_peer"
SERVICE = "max_queued_bytes"


def queued_cost(item: Reading | tuple[str, bytes]) -> int:
    """The cost of a queued reading: a (DRF, body) pair as a worker pool queues it, or a Reading."""
    try:
        body = item[1] if isinstance(item, tuple) else reading_body(item)
        return QUEUED_READING_BYTES + BODY_WEIGHT * len(body)
    except Exception:  # the producer's path (a worker's data for every stream) must not fail here
        return QUEUED_READING_BYTES


class Queued(Protocol):
    """A client stream as the budget sees it (counts kept by the task writing the stream)."""

    @property
    def identity(self) -> str: ...

    @property
    def queued_bytes(self) -> int: ...

    @property
    def caught_up(self) -> int:
        """How often the stream found its queue empty so far."""
        ...

    @property
    def written(self) -> int:
        """Readings whose replies the stream has written so far."""
        ...

    @property
    def writing(self) -> bool:
        """Whether the stream is writing a batch of replies (not waiting for readings or pacing)."""
        ...


S = TypeVar("S", bound=Queued)


@dataclass(frozen=True)
class Cut(Generic[S]):
    """A stream to end, and why: the setting that bit, the client's bytes and its share then."""

    stream: S
    limit: str  # PER_PEER or SERVICE: the setting's name
    queued_bytes: int  # what the stream held
    client_bytes: int  # what its client held, before this look's cuts
    share: int  # what the client may hold: its budget, or its share of the service's
    seconds: float  # how long the stream has been stalled (PER_PEER) or behind (SERVICE)

    def details(self) -> str:
        """The RESOURCE_EXHAUSTED details the client sees."""
        if self.limit == PER_PEER:
            why = f"its replies have not been read for {self.seconds:.0f} s"
            whose = "per client"
        else:
            why = f"it has not caught up for {self.seconds:.0f} s"
            whose = "its share of the service's, which is over its total"
        return (
            f"stream ended: {why} and its client holds {self.client_bytes} bytes of queued readings, "
            f"over {self.share} ({self.limit}: {whose}); read the replies, or ask for fewer readings"
        )


@dataclass
class _Seen:
    caught_up: int
    behind_since: float
    written: int
    stalled_since: float | None  # the first look of a write still pending


class QueueBudget(Generic[S]):
    """Which streams to end, looked at every `interval` seconds (`cuts`)."""

    def __init__(self, per_peer: int, total: int, stall_seconds: float):
        self.per_peer = per_peer
        self.total = total
        self.stall_seconds = stall_seconds
        self.interval = min(0.5, stall_seconds / 4)
        self.held = 0  # every stream's queued bytes at the last look
        self._seen: dict[S, _Seen] = {}

    def _look(self, stream: S, queued: int, now: float) -> _Seen:
        before = self._seen.get(stream)
        caught_up, written, writing = stream.caught_up, stream.written, stream.writing
        if before is None:
            return _Seen(caught_up, now, written, now if writing else None)
        if before.caught_up != caught_up or not queued:
            before.behind_since = now
        before.caught_up = caught_up
        if not writing:
            before.stalled_since = None
        elif written != before.written or before.stalled_since is None:
            before.stalled_since = now  # a reply written since the last look, or a new batch begun
        before.written = written
        return before

    def cuts(self, streams: Iterable[S], now: float) -> list[Cut[S]]:
        """The streams to end now (each counted against the limit it names), and what they held."""
        seen: dict[S, _Seen] = {}
        held: dict[str, int] = {}
        stalled: dict[str, list[tuple[int, float, S]]] = {}  # per client: (bytes, seconds, stream)
        behind: dict[str, list[tuple[int, float, S]]] = {}
        for stream in streams:
            queued = stream.queued_bytes
            if not queued:
                continue  # caught up, waiting on nobody: looked at afresh when it holds readings again
            look = seen[stream] = self._look(stream, queued, now)
            who = stream.identity
            held[who] = held.get(who, 0) + queued
            if look.stalled_since is not None and now - look.stalled_since >= self.stall_seconds:
                stalled.setdefault(who, []).append((queued, now - look.stalled_since, stream))
            if now - look.behind_since >= self.stall_seconds:
                behind.setdefault(who, []).append((queued, now - look.behind_since, stream))
        self._seen = seen
        total = self.held = sum(held.values())
        before = dict(held)
        cuts: list[Cut[S]] = []
        ended: set[S] = set()

        def cut_largest(candidates: list[tuple[int, float, S]], who: str, limit: str, share: float) -> None:
            nonlocal total
            queued, seconds, stream = candidates.pop()
            if stream not in ended:
                ended.add(stream)
                cuts.append(Cut(stream, limit, queued, before[who], int(share), seconds))
                held[who] -= queued
                total -= queued

        for candidates in (*stalled.values(), *behind.values()):
            candidates.sort(key=lambda c: c[0])  # the largest last, popped first
        for who, candidates in stalled.items():
            while candidates and held[who] > self.per_peer:
                cut_largest(candidates, who, PER_PEER, self.per_peer)
        if total > self.total:
            share = self.total / sum(1 for n in held.values() if n > 0)
            for who in sorted(behind, key=held.__getitem__, reverse=True):
                candidates = behind[who]
                while candidates and held[who] > share and total > self.total:
                    cut_largest(candidates, who, SERVICE, share)
        return cuts
