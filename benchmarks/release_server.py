"""The pacsys 0.3.0 release's own server for `bench_capacity`; run by the release's interpreter.

    tests/.release-venv/bin/python -I benchmarks/release_server.py

Serves the release's `SupervisedServer` over its `FakeBackend` on 127.0.0.1 (a free port),
prints the port, and serves until stdin closes. Never imported by this repository's code:
`import pacsys` here must be the release, so run it with `-I` (no PYTHONPATH, no script
directory on the path).

The fake backend holds Z:SIM000..Z:SIM099 (values 0.0..99.0) for one-shot reads. It has no
clock of its own (its tests push readings by hand), so a ticker thread does what a periodic
backend would: on every multiple of each period that some subscription asks for (`@p,N`,
`@q,N`), it makes one reading per subscribed DRF and hands it to every subscription of that
DRF, as `FakeBackend.emit_reading` does, but without a scan of all subscriptions per DRF.
"""

from __future__ import annotations

import sys
import threading
import time
from datetime import UTC, datetime

from pacsys.drf_utils import get_device_name
from pacsys.supervised import SupervisedServer
from pacsys.testing import FakeBackend
from pacsys.types import Reading, ValueType

DEVICES = {f"Z:SIM{i:03d}": float(i) for i in range(100)}


def _period(drf: str) -> float:
    """Seconds between readings of a periodic DRF (`@p,20` is 20 ms); 1 s for anything else."""
    _, at, event = drf.rpartition("@")
    kind, _, rest = event.partition(",")
    if at and kind.upper() in ("P", "Q") and rest:
        number = rest.split(",", 1)[0].strip().lower()
        for unit, scale in (("ms", 1e-3), ("us", 1e-6), ("s", 1.0), ("", 1e-3)):
            if number.endswith(unit) and number[: len(number) - len(unit)].replace(".", "", 1).isdigit():
                return max(float(number[: len(number) - len(unit)]) * scale, 0.001)
    return 1.0


def _subscribed(backend: FakeBackend) -> dict[float, list[tuple[object, str]]]:
    """period -> (subscription, DRF) for every live subscription of the backend."""
    with backend._lock:
        subscriptions = [s for s in backend._subscriptions if not s.stopped]
    groups: dict[float, list[tuple[object, str]]] = {}
    for sub in subscriptions:
        for drf in sub._drfs:
            groups.setdefault(_period(drf), []).append((sub, drf))
    return groups


def tick(backend: FakeBackend, stop: threading.Event) -> None:
    """Hand each subscribed DRF's reading to its subscriptions on multiples of its period.

    The subscriptions are listed again whenever a period fires (or while none is known), so a
    new stream gets its first reading within one period of a period already served.
    """
    due: dict[float, float] = {}  # period -> its next deadline
    while not stop.is_set():
        now = time.time()
        fired = [period for period, deadline in due.items() if deadline <= now]
        if fired or not due:
            groups = _subscribed(backend)
            for period in fired:
                stamp = datetime.now(UTC)
                readings: dict[str, Reading] = {}
                for sub, drf in groups.get(period, ()):
                    reading = readings.get(drf)
                    if reading is None:
                        value = DEVICES.get(get_device_name(drf), 0.0)
                        reading = Reading(drf=drf, value_type=ValueType.SCALAR, value=value, timestamp=stamp)
                        readings[drf] = reading
                    sub._put_reading(reading)
            now = time.time()
            # Deadlines are the next multiple of the period: a tick that fell behind by whole
            # periods skips them instead of bursting.
            due = {period: (now // period + 1) * period for period in groups}
        wait = min(due.values(), default=now + 0.05) - time.time()
        stop.wait(min(max(wait, 0.0), 0.05))


def main() -> None:
    backend = FakeBackend()
    for device, value in DEVICES.items():
        backend.set_reading(device, value)
    stop = threading.Event()
    ticker = threading.Thread(target=tick, args=(backend, stop), name="fake-ticker", daemon=True)
    server = SupervisedServer(backend, port=0, host="127.0.0.1")
    server.start()
    ticker.start()
    print(server.port, flush=True)
    try:
        sys.stdin.read()  # until stdin closes
    finally:
        stop.set()
        server.stop()


if __name__ == "__main__":
    main()
