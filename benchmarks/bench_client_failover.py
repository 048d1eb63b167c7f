"""What a streaming client of the pacsys 0.3.0 release sees when its instance goes away, per topology.

`python -m benchmarks.bench_client_failover [--rounds N] [--restart-after S] [--only one,direct,haproxy,shared]`: the release's
own client (`pacsys.grpc(...).subscribe(["M:OUTTMP@p,100"])`, run under the release's
interpreter from tests/.release-venv, made by tests/release_venv.py) against real
pacsys-supervisor processes (sim backend) on loopback. Each round, for each topology:

- one: one instance (no drain_delay, as without a balancer). SIGKILL, started again
  after S seconds (systemd's RestartSec=2), then SIGTERM and started again at once (a
  `systemctl restart`). The client waits 1, 2, 4, 8 ... s between tries.
- direct: two instances, the client given both addresses (`ipv4:127.0.0.1:P1,127.0.0.1` and
  port P2: gRPC's own resolver, what a DNS name with both addresses gives). SIGKILL of the
  instance holding the stream, and SIGTERM (drain_delay 4 s) of the holder, each with a
  new client.
- haproxy: two instances as shipped behind ops/haproxy.cfg (benchmarks/pair.py), the client
  given haproxy's address. SIGTERM of the holder, then SIGKILL of the holder.
- shared: two instances on one port (`--reuse-port`, `--connection-max-age 2`), the client
  given that one address. SIGKILL of the holder; then a hot upgrade: a third instance joins
  and the holder gets SIGTERM (it leaves the port at once, serves its connections until each
  was asked to reconnect, then ends its streams).

Printed per event: gap, the longest time without a reading from the signal until readings
flow again (a drain's gap starts when the instance ends the stream, drain_delay after
SIGTERM), or "ended" when the client gave up (it logs "non-retryable"); and the client's errors. The load
average is printed with the figures: on a shared machine they are provisional.
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.pair import Instance, Pair, free_port, plain_options, wait_until
from benchmarks.release_subscriber import ReleaseSubscriber

REPO = Path(__file__).resolve().parent.parent
DRF = "M:OUTTMP@p,100"
RESUMED = 5  # readings after the event that count as "flowing again"
PATIENCE = 40.0  # seconds to wait for readings after an event


def release_interpreter() -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from release_venv import VENV, build

    failure = build()
    if failure is not None:
        raise SystemExit(failure)
    return VENV / "bin" / "python"


def holder(instances: list[Instance]) -> Instance:
    streams = [i.metric("pacsys_active_streams") if i.running else 0.0 for i in instances]
    if sorted(streams)[-1] != 1.0:
        raise RuntimeError(f"no instance holds the stream: {streams}")
    return instances[streams.index(1.0)]


def event(
    sub: ReleaseSubscriber, signal_it: Callable[[], object], until_ended: Callable[[], object] | None = None
) -> tuple[float | None, list[str]]:
    """(gap in seconds, or None when the client gave up; the errors the client reported)."""
    wait_until(lambda: sub.readings() >= 5, 30, "the stream")
    moment = time.monotonic()
    signal_it()
    if until_ended is not None:
        until_ended()
    ended = time.monotonic()
    # Until readings flow again, or the client says it will not subscribe again.
    wait_until(
        lambda: sub.readings(since=ended) >= RESUMED or "non-retryable" in sub.output(), PATIENCE, "readings again"
    )
    if sub.readings(since=ended) < RESUMED:
        return None, sub.errors(since=moment)
    return sub.longest_gap(moment, time.monotonic()), sub.errors(since=moment)


def start_all(instances: list[Instance]) -> None:
    threads = [threading.Thread(target=i.start) for i in instances if not i.running]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def one_instance(python: Path, workdir: Path, restart_after: float) -> dict[str, tuple[float | None, list[str]]]:
    instance = Instance("one", workdir, *plain_options(drain_delay=0))  # no balancer: no drain_delay
    results = {}
    try:
        instance.start()
        with ReleaseSubscriber(python, "127.0.0.1", instance.port, DRF) as sub:

            def kill_and_restart() -> None:
                instance.signal(signal.SIGKILL)
                instance.wait(10)
                time.sleep(restart_after)  # what systemd's RestartSec does
                instance.start()

            results["one: kill, restarted"] = event(sub, kill_and_restart)
        with ReleaseSubscriber(python, "127.0.0.1", instance.port, DRF) as sub:

            def drain_and_restart() -> None:
                instance.signal(signal.SIGTERM)
                instance.wait(30)
                instance.start()

            results["one: drain, restarted"] = event(sub, drain_and_restart)
    finally:
        instance.stop()
    return results


def holder_signalled(
    python: Path, host: str, port: int, instances: list[Instance], signum: int
) -> tuple[float | None, list[str]]:
    """A new client's stream; the instance holding it sent `signum`; the event as `event` gives it."""
    with ReleaseSubscriber(python, host, port, DRF) as sub:
        wait_until(lambda: sub.readings() >= 5, 30, "the stream")
        victim = holder(instances)
        return event(sub, lambda: victim.signal(signum), lambda: victim.wait(30))


def direct(python: Path, workdir: Path) -> dict[str, tuple[float | None, list[str]]]:
    instances = [Instance(name, workdir, *plain_options()) for name in ("a", "b")]
    host = f"ipv4:127.0.0.1:{instances[0].port},127.0.0.1"
    results = {}
    try:
        for name, signum in (("direct: kill", signal.SIGKILL), ("direct: drain", signal.SIGTERM)):
            start_all(instances)
            results[name] = holder_signalled(python, host, instances[1].port, instances, signum)
    finally:
        for i in instances:
            i.stop()
    return results


def through_haproxy(python: Path, workdir: Path) -> dict[str, tuple[float | None, list[str]]]:
    pair = Pair(workdir)
    instances = list(pair.instances.values())
    results = {}
    try:
        pair.start()
        for name, signum in (("haproxy: drain", signal.SIGTERM), ("haproxy: kill", signal.SIGKILL)):
            start_all(instances)
            pair.wait_up("a", "b")
            results[name] = holder_signalled(python, "127.0.0.1", pair.port, instances, signum)
    finally:
        pair.close()
    return results


def shared_port(python: Path, workdir: Path) -> dict[str, tuple[float | None, list[str]]]:
    port = free_port()
    names = iter("abcdefgh")

    def instance() -> Instance:
        options = ("--host", "127.0.0.1", "--workers", "1", "--reuse-port", "--connection-max-age", "2")
        return Instance(next(names), workdir, *options, "--shutdown-grace", "3", port=port)

    instances = [instance(), instance()]
    results = {}
    try:
        start_all(instances)
        results["shared: kill"] = holder_signalled(python, "127.0.0.1", port, instances, signal.SIGKILL)
        instances = [i for i in instances if i.running]
        with ReleaseSubscriber(python, "127.0.0.1", port, DRF) as sub:
            wait_until(lambda: sub.readings() >= 5, 30, "the stream")
            old = holder(instances)
            joining = instance()
            joining.start()
            instances.append(joining)
            results["shared: hot upgrade"] = event(sub, lambda: old.signal(signal.SIGTERM), lambda: old.wait(30))
    finally:
        for i in instances:
            i.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--restart-after", type=float, default=2.0, metavar="S")
    parser.add_argument("--only", default="one,direct,haproxy,shared", help="comma-separated topologies to run")
    args = parser.parse_args()
    python = release_interpreter()
    workdir = Path(tempfile.mkdtemp(prefix="bench_client_failover."))
    gaps: dict[str, list[float | None]] = collections.defaultdict(list)

    def logs(topology: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"{topology}.", dir=workdir))

    for n in range(1, args.rounds + 1):
        topologies = {
            "one": lambda: one_instance(python, logs("one"), args.restart_after),
            "direct": lambda: direct(python, logs("direct")),
            "haproxy": lambda: through_haproxy(python, logs("haproxy")),
            "shared": lambda: shared_port(python, logs("shared")),
        }
        for topology in (topologies[name.strip()] for name in args.only.split(",")):
            for name, (gap, errors) in topology().items():
                gaps[name].append(gap)
                shown = "ended (the client gave up)" if gap is None else f"gap {gap:.2f} s"
                kinds = collections.Counter(e.split(": ")[2] if e.count(": ") >= 2 else e for e in errors)
                print(f"round {n} {name:24s} {shown:34s} errors {dict(kinds)}  load {os.getloadavg()[0]:.1f}")
    print("summary (gap s: median, max; ended: count):")
    for name, values in gaps.items():
        numbers = [v for v in values if v is not None]
        text = f"{statistics.median(numbers):6.2f} {max(numbers):6.2f}" if numbers else "     -      -"
        print(f"  {name:24s} {text}  ended {len(values) - len(numbers)}/{len(values)}")
    print(f"load average {os.getloadavg()}, logs in {workdir}")


if __name__ == "__main__":
    main()
