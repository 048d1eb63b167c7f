"""The front's side of the workers' readings: a wire reading as this project's `Reading`.

A worker sends each reading without its DRF (the request or the subscription says which),
with its timestamp as integer nanoseconds and its DAQ reply body already encoded
(`workers.protocol.WireReading`). Where only the body is needed (the servicer's one-shot
read) the front passes it through untouched (`body_of`); a `Reading` is built only where
something reads it: a subscriber's handle, or a library caller of `get_many`.
"""

from __future__ import annotations

from pacsys.types import Reading, ValueType
from workers import epoch
from workers.protocol import WireReading
from workers.reply_body import reading_body

__all__ = ["body_of", "reading_from_wire"]

_VALUE_TYPES = {t.value: t for t in ValueType}  # a dict lookup: ValueType(x) costs a microsecond


def reading_from_wire(drf: str, wire: WireReading) -> Reading:
    """The Reading of a wire reading, under the DRF it answers."""
    return Reading(
        drf=drf,
        value_type=_VALUE_TYPES[wire.value_type] if wire.value_type is not None else None,
        value=wire.value,
        facility_code=wire.facility,
        error_code=wire.error,
        message=wire.message,
        timestamp=None if wire.timestamp_ns is None else epoch.from_ns(wire.timestamp_ns),
        cycle=wire.cycle,
    )


def body_of(drf: str, wire: WireReading) -> bytes:
    """The reading's DAQ reply body as the worker encoded it (encoded here only when it came without one)."""
    return wire.body if wire.body is not None else reading_body(reading_from_wire(drf, wire))
