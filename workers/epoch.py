"""Times as the wire carries them: counted from the Unix epoch, a naive time taken as UTC.

Used by the worker protocol (integer nanoseconds) and the reply body encoder (protobuf's
Timestamp: seconds and nanoseconds); part of the worker runtime, so it imports only the
standard library.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def since_epoch(ts: datetime) -> tuple[int, int]:
    """(whole seconds, microseconds) from the epoch to `ts`; a naive `ts` counts as UTC."""
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    delta = ts - EPOCH
    return delta.days * 86_400 + delta.seconds, delta.microseconds


def to_ns(ts: datetime) -> int:
    """`ts` as integer nanoseconds since the epoch."""
    seconds, micros = since_epoch(ts)
    return seconds * 1_000_000_000 + micros * 1_000


def from_ns(ns: int) -> datetime:
    """The UTC datetime of integer nanoseconds since the epoch (to the microsecond, as datetime holds)."""
    return EPOCH + timedelta(microseconds=ns // 1_000)
