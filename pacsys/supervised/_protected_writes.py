"""How a Set reaches the backend so that machine protection holds (`_machine_protection`).

Three steps around the policy chain of a Set, for the settings whose current values the chain
needs (`Policy.needs_current`: the slew-limited ones):

1. Hold them (`HeldSettings`) for the whole request: a second Set of one of them waits until
   the first has been written and its outcome recorded, so that each is judged from the value
   the other left. A request takes its settings in sorted order, so no two wait for each other.
2. Read their current values through the backend (``Z:ACLTST.SETTING@I``) into
   `CurrentValue`s (`read_current`); a failed read keeps its reason, and the policy refuses.
3. Write in rounds (`SettingWrite`): the settings go in request order, cut into consecutive
   rounds so that no held setting appears twice in one round. A held setting whose earlier
   write in this request the backend did not accept is not sent, since the policy judged it
   from a value the device never took: it is answered DPM_PRIVILEGE "not sent: ...". What the
   backend accepted is recorded in `outcomes`, for `Policy.on_written`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

from pacsys.aio import AsyncBackend
from pacsys.status import DPM, DPM_PRIVILEGE, DPM_WRITE_OUTCOME_UNKNOWN
from pacsys.supervised._machine_protection import setting_of
from pacsys.supervised._policies import CurrentValue
from pacsys.supervised._refusal_log import excerpt
from pacsys.supervised.gate import Decision
from pacsys.types import Value, WriteResult

__all__ = ["HeldSettings", "SettingWrite", "read_current"]


class HeldSettings:
    """One lock per setting that a Set in flight holds or waits for; none for the others."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}  # setting -> (lock, [users])

    def __len__(self) -> int:
        return len(self._locks)

    @contextlib.asynccontextmanager
    async def hold(self, settings: Sequence[str]) -> AsyncIterator[None]:
        names = sorted(set(settings))
        entries = []
        for name in names:
            entry = self._locks.setdefault(name, (asyncio.Lock(), [0]))
            entry[1][0] += 1
            entries.append((name, entry))
        taken: list[asyncio.Lock] = []
        try:
            for _, (lock, _) in entries:
                await lock.acquire()
                taken.append(lock)
            yield
        finally:
            for lock in reversed(taken):
                lock.release()
            for name, (_, users) in entries:
                users[0] -= 1
                if not users[0]:
                    del self._locks[name]


async def read_current(
    backend: AsyncBackend, settings: Sequence[str], timeout: float | None
) -> dict[str, CurrentValue]:
    """The current value of each setting, or why it could not be read."""
    if not settings:
        return {}
    try:
        readings = await backend.get_many([f"{s}@I" for s in settings], timeout=timeout)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        why = excerpt(f"{type(exc).__name__}: {exc}")
        return {s: CurrentValue(error=why) for s in settings}
    current = {}
    for setting, reading in zip(settings, readings, strict=False):  # one missing is not read: refused
        if reading.error_code != 0 or reading.value is None:
            status = f"status {reading.facility_code}/{reading.error_code}"
            current[setting] = CurrentValue(error=excerpt(f"{status} {reading.message}" if reading.message else status))
        else:
            current[setting] = CurrentValue(value=reading.value)
    return current


def _outcome(result: WriteResult) -> bool | None:
    """Accepted (True), refused (False), or unknown (None: a warning, or the outcome was lost)."""
    if result.error_code == 0:
        return True
    if result.error_code > 0 or (result.facility_code, result.error_code) == (DPM, DPM_WRITE_OUTCOME_UNKNOWN):
        return None
    return False


class SettingWrite:
    """The write of one admitted Set, in rounds (the module notes).

    `outcomes[i]` is the outcome of final setting i so far: False until it is sent, None while
    it is being written, then what the backend answered (for `Policy.on_written`).
    """

    def __init__(self, decision: Decision):
        final = decision.final
        assert final is not None
        self._settings: list[tuple[str, Value]] = [
            (drf, value) for drf, (_, value) in zip(final.drfs, final.values, strict=True)
        ]
        self._slots = decision.original  # the client's index of each setting, for the reason
        self._held: list[str | None] = []
        for parsed in decision.parsed:
            setting = setting_of(parsed)
            self._held.append(setting if setting in final.current else None)
        self.outcomes: list[bool | None] = [False] * len(self._settings)

    def _rounds(self) -> list[range]:
        """Consecutive runs of settings in which no held setting appears twice."""
        rounds: list[range] = []
        start, seen = 0, set[str]()
        for pos, setting in enumerate(self._held):
            if setting is None:
                continue
            if setting in seen:
                rounds.append(range(start, pos))
                start, seen = pos, set()
            seen.add(setting)
        rounds.append(range(start, len(self._held)))
        return rounds

    async def run(self, backend: AsyncBackend, timeout: float | None) -> list[WriteResult]:
        """Write the settings; one result each, in the final order."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        results: list[WriteResult | None] = [None] * len(self._settings)
        refused: dict[str, int] = {}  # held setting -> the client's slot of its write not accepted
        for positions in self._rounds():
            send = []
            for pos in positions:
                setting = self._held[pos]
                if setting is not None and setting in refused:
                    why = (
                        f"not sent: setting {refused[setting]} of {setting} in this request was not accepted, "
                        "and this one was judged from it"
                    )
                    results[pos] = WriteResult(self._settings[pos][0], DPM, DPM_PRIVILEGE, why, skipped=True)
                else:
                    send.append(pos)
            if not send:
                continue
            for pos in send:
                self.outcomes[pos] = None
            left = None if deadline is None else max(0.0, deadline - loop.time())
            answers = await backend.write_many([self._settings[pos] for pos in send], timeout=left)
            for pos, answer in zip(send, answers, strict=True):
                results[pos] = answer
                self.outcomes[pos] = outcome = _outcome(answer)
                setting = self._held[pos]
                if outcome is not True and setting is not None:
                    refused.setdefault(setting, self._slots[pos])
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]  # every slot answered above
