"""Routing: which worker serves a device (device affinity by rendezvous hashing).

Every DRF goes to the worker that ranks first for its canonical device name among the
slots that serve now. The ranking of the slots per device is fixed (it depends only on the
device and the slot numbers), so when a worker dies its devices go to their next-ranked
slot, and come back when the slot serves again; the other devices do not move.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from typing import Generic, TypeVar

from pacsys.drf import DRFError, parse_cached

W = TypeVar("W")

_RANKINGS_KEPT = 100_000  # devices whose ranking is cached before the cache starts over


class Router(Generic[W]):
    """Maps devices to serving workers. `serving(slot)` is the worker that serves slot `slot`, or None."""

    def __init__(self, serving: Callable[[int], W | None]):
        self._serving = serving
        self._slots = 0
        self._rankings: dict[str, tuple[int, ...]] = {}

    def resize(self, slots: int) -> None:
        """The pool has `slots` slots now (a slot added by scaling ranks among the others)."""
        if slots != self._slots:
            self._slots = slots
            self._rankings.clear()

    def ranking(self, device: str) -> tuple[int, ...]:
        ranking = self._rankings.get(device)
        if ranking is None:
            scores = sorted(
                ((hashlib.blake2b(f"{device}\x00{i}".encode(), digest_size=8).digest(), i) for i in range(self._slots)),
                reverse=True,
            )
            ranking = tuple(i for _, i in scores)
            if len(self._rankings) > _RANKINGS_KEPT:
                self._rankings.clear()
            self._rankings[device] = ranking
        return ranking

    def owner(self, device: str) -> W | None:
        """The worker that serves `device` now, or None when no slot serves."""
        for index in self.ranking(device):
            worker = self._serving(index)
            if worker is not None:
                return worker
        return None

    def group(
        self, drfs: list[str], positions: Iterable[int], devices: Sequence[str] | None = None
    ) -> tuple[dict[W, list[int]], list[int]]:
        """The positions of `drfs` grouped by their worker, and the positions no worker serves.

        `devices`, the DRFs' canonical device names when the caller has them, spares parsing.
        """
        groups: dict[W, list[int]] = {}
        unserved: list[int] = []
        for pos in positions:
            worker = self.owner(devices[pos] if devices is not None else device_of(drfs[pos]))
            if worker is None:
                unserved.append(pos)
            else:
                groups.setdefault(worker, []).append(pos)
        return groups, unserved


def device_of(drf: str) -> str:
    """The canonical device name of a DRF (ValueError, naming it, when it does not parse)."""
    try:
        return parse_cached(drf).device
    except DRFError as exc:
        raise ValueError(str(exc)) from None
