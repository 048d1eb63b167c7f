"""Fail-over figures of a pair behind haproxy: calls failed on a kill and on a drain, and how
long until the survivor carries the load.

`python -m benchmarks.bench_pair [--rounds N] [--clients N]`: two pacsys-supervisor
processes (sim backend, 1 worker each) behind haproxy running ops/haproxy.cfg, on loopback;
N clients (a channel each) make one-shot reads through haproxy without pause. Each round
SIGKILLs instance a, starts it again, then drains instance b with SIGTERM and starts it
again, and prints what the clients saw:

- failed: calls that failed (and their status codes);
- longest: the longest call running at the moment of the kill or SIGTERM;
- carried: seconds from the kill until the calls completed per 100 ms are back to 75% of
  their rate before it (the survivor carries the load);
- down: seconds until haproxy marked the instance DOWN; up: seconds from starting an
  instance until haproxy marked it UP; exit: seconds from SIGTERM to the process's exit.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import signal
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.pair import Instance, Load, Pair, wait_until

WINDOW = 0.1


def rate_before(load: Load, moment: float, span: float = 2.0) -> float:
    return sum(1 for _, end, code in load.calls if code == "OK" and moment - span <= end < moment) / span


def carried_after(load: Load, moment: float, before: float, limit: float = 10.0) -> float:
    """Seconds from `moment` until a 100 ms window completes 75% of the calls it did before."""
    ends = sorted(end for _, end, code in load.calls if code == "OK" and end >= moment)
    t = moment
    while t < moment + limit:
        if sum(1 for e in ends if t <= e < t + WINDOW) >= 0.75 * before * WINDOW:
            return t - moment
        t += WINDOW / 4
    return float("nan")


def timed_down(pair: Pair, name: str, since: float) -> float:
    pair.wait_down(name)
    return time.monotonic() - since


def timed_restart(pair: Pair, instance: Instance) -> float:
    started = time.monotonic()
    instance.start()
    pair.wait_up(instance.name)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    if shutil.which("haproxy") is None:
        raise SystemExit("haproxy is not installed (apt-get install haproxy)")
    workdir = Path(tempfile.mkdtemp(prefix="bench_pair."))
    pair = Pair(workdir)
    figures: dict[str, list[float]] = collections.defaultdict(list)
    try:
        pair.start()
        with Load(f"127.0.0.1:{pair.port}", clients=args.clients) as load:
            time.sleep(3.0)  # warm up
            for n in range(1, args.rounds + 1):
                moment = time.monotonic()
                before = rate_before(load, moment)
                pair.a.signal(signal.SIGKILL)
                down = timed_down(pair, "a", moment)
                wait_until(lambda m=moment: time.monotonic() > m + 3.0, 10, "the kill's aftermath")
                failed = load.failures(since=moment)
                codes = collections.Counter(code.split(":")[0] for _, _, code in failed)
                carried = carried_after(load, moment, before)
                longest = load.longest(moment, moment)
                up = timed_restart(pair, pair.a)
                print(
                    f"round {n} kill:  failed {len(failed)} {dict(codes)}  longest {longest * 1e3:.0f} ms"
                    f"  carried {carried:.2f} s  down {down:.2f} s  restart-to-up {up:.2f} s"
                    f"  ({before:.0f} calls/s before)",
                    flush=True,
                )
                figures["kill failed"].append(len(failed))
                figures["kill carried s"].append(carried)
                figures["kill longest ms"].append(longest * 1e3)
                figures["restart-to-up s"].append(up)

                time.sleep(2.0)
                moment = time.monotonic()
                before = rate_before(load, moment)
                pair.b.signal(signal.SIGTERM)
                down = timed_down(pair, "b", moment)
                pair.b.wait(60)
                exited = time.monotonic() - moment
                wait_until(lambda: load.succeeded(since=time.monotonic() - 1.0) > 0, 10, "calls after the drain")
                failed = load.failures(since=moment)
                codes = collections.Counter(code.split(":")[0] for _, _, code in failed)
                longest = max(load.longest(moment, moment + exited), 0.0)
                up = timed_restart(pair, pair.b)
                print(
                    f"round {n} drain: failed {len(failed)} {dict(codes)}  longest {longest * 1e3:.0f} ms"
                    f"  down {down:.2f} s  exit {exited:.2f} s  restart-to-up {up:.2f} s",
                    flush=True,
                )
                figures["drain failed"].append(len(failed))
                figures["drain longest ms"].append(longest * 1e3)
                time.sleep(2.0)
        print("summary (median, max):")
        for name, values in figures.items():
            print(f"  {name:18s} {statistics.median(values):8.2f} {max(values):8.2f}")
        print(f"calls {len(load.calls)}, logs in {workdir}")
    finally:
        pair.close()


if __name__ == "__main__":
    main()
