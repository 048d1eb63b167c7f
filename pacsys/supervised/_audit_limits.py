"""What bounds the growth of the audit log: per-client byte budgets, summaries, free space.

The limits (`AuditLimits`, the ``audit_*`` settings of the same names):

* A Read's DRF list is written up to `drf_chars` characters; the DRFs after them are one
  ``drfs_left_out`` object in the entry (how many, their characters, their SHA-256).
* A client (its identity: the certificate subject under mutual TLS, else its host) may add
  `client_bytes_per_second` bytes a second, `client_burst_bytes` at once (`ClientBudgets`, a
  token bucket per client). An entry that may be summarised (a Read, a refused request, the
  denial of a Set that needed no token) and would take its client over is not written: it
  joins the client's summary, which is written as one ``"dir": "summary"`` line
  `summary_interval` seconds after its first request (or when the log closes, reopens or
  rotates): how many requests, their seqs and methods, the bytes left out and their
  SHA-256. A Set that passed the token is always written in full (and charged).
* Below `min_free_bytes` free on the audit files' filesystem the log warns, once a minute
  (`DiskWatch`, level 1); below `reserve_bytes` (level 2) every entry that may be summarised
  is, to keep the room for Sets.
* `max_bytes` and `keep` are the writer's own rotation (`pacsys.supervised._audit`).

Everything here runs under the audit log's lock; nothing here writes a file.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from pacsys.settings import Settings

__all__ = ["AuditLimits", "AuditStats", "ClientBudgets", "DiskWatch", "Summary"]

logger = logging.getLogger("pacsys.supervised.audit")

_DEFAULTS = Settings()  # the one owner of every default

# The reasons a summary gives, named after the setting that bit.
OVER_BUDGET = "audit_client_bytes_per_second"
LOW_SPACE = "audit_reserve_bytes"

DISK_POLL_SECONDS = 1.0  # free space is looked up at most this often
LOW_SPACE_LOG_SECONDS = 60.0  # a WARNING at most this often while space is low


@dataclass(frozen=True)
class AuditLimits:
    """The bounds of one audit log; the defaults are the ``audit_*`` settings'."""

    drf_chars: int = _DEFAULTS.audit_drf_chars
    client_bytes_per_second: float = _DEFAULTS.audit_client_bytes_per_second
    client_burst_bytes: int = _DEFAULTS.audit_client_burst_bytes
    summary_interval: float = _DEFAULTS.audit_summary_interval
    max_bytes: int = _DEFAULTS.audit_max_bytes
    keep: int = _DEFAULTS.audit_keep
    min_free_bytes: int = _DEFAULTS.audit_min_free_bytes
    reserve_bytes: int = _DEFAULTS.audit_reserve_bytes

    @classmethod
    def from_settings(cls, settings: Settings) -> AuditLimits:
        return cls(**{f.name: getattr(settings, f"audit_{f.name}") for f in dataclasses.fields(cls)})


@dataclass
class AuditStats:
    """Counters of an audit log, for the metrics and the status view."""

    written_bytes: int = 0  # to the JSON log and the capture
    summarised: collections.Counter[str] = field(default_factory=collections.Counter)  # requests, by reason
    summarised_bytes: int = 0  # of entries and frames not written
    drf_lists_cut: int = 0  # entries whose DRF list was cut at drf_chars
    rotations: int = 0


@dataclass
class Summary:
    """A client's requests not recorded in full, gathered until their summary line."""

    identity: str
    since: str  # ISO time of the first one
    started: float  # clock() of the first one
    peer: str = ""
    requests: int = 0
    first_seq: int = 0
    last_seq: int = 0
    methods: collections.Counter[str] = field(default_factory=collections.Counter)
    reasons: collections.Counter[str] = field(default_factory=collections.Counter)
    allowed: int = 0
    line_bytes: int = 0  # of the JSON lines left out
    frames: int = 0
    frame_bytes: int = 0
    digest: hashlib._Hash = field(default_factory=hashlib.sha256)

    def add(self, seq: int, peer: str, method: str, allowed: bool, line: bytes, frame_bytes: int | None) -> None:
        if not self.requests:
            self.first_seq = seq
        self.requests += 1
        self.last_seq = seq
        self.peer = peer
        self.methods[method] += 1
        self.allowed += bool(allowed)
        self.line_bytes += len(line)
        self.digest.update(line)
        if frame_bytes is not None:
            self.frames += 1
            self.frame_bytes += frame_bytes

    def entry(self, ts: str) -> dict[str, object]:
        """The summary line: what was left out, and why."""
        entry: dict[str, object] = {
            "ts": ts,
            "dir": "summary",
            "identity": self.identity,
            "peer": self.peer,
            "since": self.since,
            "requests": self.requests,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "methods": dict(self.methods),
            "allowed": self.allowed,
            "reasons": dict(self.reasons),
            "bytes": self.line_bytes,
            "sha256": self.digest.hexdigest(),
        }
        if self.frames:
            entry["frames"] = self.frames
            entry["frame_bytes"] = self.frame_bytes
        return entry


class ClientBudgets:
    """A byte budget per client, and the summaries of what went over it.

    `rate` 0 is no budget. Memory is bounded: past `max_clients` buckets, those that have
    refilled (as good as new) are forgotten, and if none has, all are (a few clients get a
    fresh burst); summaries pending past `max_clients` are handed out early by `due`.
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        interval: float,
        clock: Callable[[], float] = time.monotonic,
        max_clients: int = 10_000,
    ):
        self.rate = rate
        self.burst = burst
        self.interval = interval
        self._clock = clock
        self._max_clients = max_clients
        self._buckets: dict[str, tuple[float, float]] = {}  # identity -> (tokens, when)
        self._pending: dict[str, Summary] = {}  # insertion order: the oldest summary first

    def admit(self, who: str, cost: int) -> bool:
        """Take `cost` bytes from `who`'s budget if it holds them; False (nothing taken) if not."""
        if not self.rate:
            return True
        tokens, now = self._tokens(who)
        if tokens < cost:
            return False
        self._buckets[who] = (tokens - cost, now)
        return True

    def charge(self, who: str, cost: int) -> None:
        """Take `cost` bytes whatever the budget holds (an entry that is written anyway),
        down to one burst in debt."""
        if not self.rate:
            return
        tokens, now = self._tokens(who)
        self._buckets[who] = (max(-float(self.burst), tokens - cost), now)

    def summary(self, who: str, ts: str) -> Summary:
        """`who`'s pending summary, begun now if it has none."""
        pending = self._pending.get(who)
        if pending is None:
            pending = self._pending[who] = Summary(who, ts, self._clock())
        return pending

    def due(self, everything: bool = False) -> list[Summary]:
        """The summaries to write now (all of them with `everything`), oldest first; they are
        forgotten here."""
        now = self._clock()
        out = []
        while self._pending:
            who, oldest = next(iter(self._pending.items()))
            if not (everything or now - oldest.started >= self.interval or len(self._pending) > self._max_clients):
                break
            out.append(self._pending.pop(who))
        return out

    def _tokens(self, who: str) -> tuple[float, float]:
        now = self._clock()
        held = self._buckets.get(who)
        if held is None:
            if len(self._buckets) >= self._max_clients:
                self._forget_full(now)
            return float(self.burst), now
        tokens, at = held
        return min(float(self.burst), tokens + (now - at) * self.rate), now

    def _forget_full(self, now: float) -> None:
        full = [who for who, (tokens, at) in self._buckets.items() if tokens + (now - at) * self.rate >= self.burst]
        for who in full:
            del self._buckets[who]
        if len(self._buckets) >= self._max_clients:
            self._buckets.clear()


class DiskWatch:
    """The free space of the audit files' filesystems, and how low it is.

    `level` is 0 (enough), 1 (below `min_free`: a WARNING once a minute) or 2 (below
    `reserve`: entries that may be summarised are). `poll` looks at most once a second;
    a filesystem that cannot be looked at leaves the level as it was.
    """

    def __init__(
        self,
        directories: Iterable[str],
        min_free: int,
        reserve: int,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._directories = list(dict.fromkeys(directories))
        self.min_free = min_free
        self.reserve = reserve
        self._clock = clock
        self.free_bytes: int | None = None
        self.level = 0
        self._polled: float | None = None
        self._warned = 0.0

    def poll(self) -> None:
        now = self._clock()
        if self._polled is not None and now - self._polled < DISK_POLL_SECONDS:
            return
        self._polled = now
        try:
            free = min(_free_bytes(d) for d in self._directories)
        except OSError as exc:
            logger.debug("event=audit_free_space_unknown error=%s", exc)
            return
        self.free_bytes = free
        level = 2 if free < self.reserve else 1 if free < self.min_free else 0
        changed, self.level = level != self.level, level
        if level == 0:
            if changed:
                logger.info("event=audit_disk_ok free_bytes=%d min_free_bytes=%d", free, self.min_free)
            return
        if changed or now - self._warned >= LOW_SPACE_LOG_SECONDS:
            self._warned = now
            logger.warning(
                "event=audit_disk_low free_bytes=%d min_free_bytes=%d reserve_bytes=%d reads=%s path=%s",
                free,
                self.min_free,
                self.reserve,
                "summarised" if level == 2 else "recorded",
                self._directories[0],
            )


def _free_bytes(directory: str) -> int:
    """Bytes an unprivileged writer may still use on `directory`'s filesystem."""
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize
