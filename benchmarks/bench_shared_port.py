"""Hot upgrades of instances sharing one port (`reuse_port`), under load: which calls fail.

`python -m benchmarks.bench_shared_port [--rounds N] [--clients C] [--burst-rate R] [--netns]`.

Two pacsys-supervisor instances at a time on one loopback port (`--reuse-port`, 1 worker
each, `--connection-max-age 2`). Each round a new instance joins, and once it is ready the
oldest gets SIGTERM and drains: it leaves the port at once (the kernel gives new connections
to the others), serves its connections while each is asked to reconnect, then stops. Under
two loads, counted apart:

- `--clients` clients (8) each with one long-lived connection and one call in flight, as
  programs that keep a channel open have;
- a burst of new connections around the moment the old instance leaves the port: h2load
  opening `--burst-rate` connections a second (2,000) for 0.8 s, one call on each. These
  are the connections that may be waiting in the old instance's accept queue, or half-open,
  at that moment. Linux resets such connections, unless `net.ipv4.tcp_migrate_req` is 1:
  then it hands them to another listener of the same port.

With `--netns` the run happens in a network namespace of its own (`unshare --net`, as root),
where `net.ipv4.tcp_migrate_req` is set to 0 and then 1 without touching the host's; without
it, the machine's setting is read and used. Printed per round: the calls of each load, the
failed ones by status, how long the drain took; then the totals per setting, and the load
average (a shared machine moves every figure: provisional).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bench_capacity import READ_PATH, request_file
from benchmarks.pair import REPO, Instance, Load, free_port, wait_until

MIGRATE = Path("/proc/sys/net/ipv4/tcp_migrate_req")
MAX_AGE = 2.0
BURST_SECONDS = 0.8
IN_NETNS = "PACSYS_BENCH_IN_NETNS"


def burst(port: int, data: Path, rate: int, seconds: float) -> subprocess.Popen[str]:
    """h2load opening `rate` new connections a second for `seconds`, one call on each."""
    per_tick = max(1, rate // 100)  # connections per 10 ms
    total = max(per_tick, round(rate * seconds))
    argv = ["h2load", "-t", "1", "-m", "1", "-r", str(per_tick), "--rate-period", "10ms"]
    argv += ["-c", str(total), "-n", str(total), "-d", str(data)]
    argv += ["-H", "content-type: application/grpc", "-H", "te: trailers", f"http://127.0.0.1:{port}{READ_PATH}"]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


H2LOAD_REQUESTS = re.compile(
    r"requests: (\d+) total, \d+ started, (\d+) done, \d+ succeeded, (\d+) failed, (\d+) errored"
)


def burst_result(process: subprocess.Popen[str]) -> tuple[int, int]:
    """(calls done, calls failed or errored: their connection reset or refused)."""
    out, _ = process.communicate(timeout=300)
    found = H2LOAD_REQUESTS.search(out)
    if found is None:
        raise RuntimeError(f"h2load: {out.strip()[-300:]}")
    total, done, failed, errored = map(int, found.groups())
    return total, failed + errored + (total - done)


def failures(calls: list[tuple[float, float, str]], since: float, until: float) -> collections.Counter:
    return collections.Counter(code for start, end, code in calls if code != "OK" and since <= end <= until)


def count(calls: list[tuple[float, float, str]], since: float, until: float) -> int:
    return sum(1 for _, end, _ in calls if since <= end <= until)


def upgrades(args: argparse.Namespace, workdir: Path, label: str) -> dict[str, object]:
    """`args.rounds` hot upgrades under both loads; the totals."""
    port = free_port()
    names = iter(f"{label}-{k}" for k in range(100))
    data = request_file(["Z:SIM000@I"], workdir)

    def instance() -> Instance:
        i = Instance(
            next(names), workdir,
            "--host", "127.0.0.1", "--workers", "1", "--reuse-port",
            "--connection-max-age", str(MAX_AGE), "--shutdown-grace", "3",
            "--max-calls-per-peer", "100000",  # every client here is 127.0.0.1
            port=port,
        )  # fmt: skip
        i.start()
        return i

    live = [instance()]
    kept_failed: collections.Counter = collections.Counter()
    totals = {"kept": 0, "burst": 0, "burst_failed": 0}
    try:
        with Load(f"127.0.0.1:{port}", clients=args.clients) as load:
            wait_until(lambda: load.succeeded() >= 50, 60, "the load")
            for n in range(1, args.rounds + 1):
                live.append(instance())  # joins the port
                old = live.pop(0)
                opening = burst(port, data, args.burst_rate, BURST_SECONDS) if args.burst_rate else None
                time.sleep(BURST_SECONDS / 2)  # the old instance leaves the port amid the burst
                since = time.monotonic()
                old.signal(signal.SIGTERM)
                status = old.wait(60)
                drained = time.monotonic() - since
                burst_calls, burst_failed = burst_result(opening) if opening is not None else (0, 0)
                time.sleep(1.0)  # the calls right after it ended count too
                until = time.monotonic()
                failed = failures(load.calls, since, until)
                kept = count(load.calls, since, until)
                kept_failed.update(failed)
                totals["kept"] += kept
                totals["burst"] += burst_calls
                totals["burst_failed"] += burst_failed
                print(
                    f"  {label} round {n}: drain {drained:.1f} s (exit {status}); kept connections {kept} calls, "
                    f"failed {dict(failed) or 0}; a new connection per call {burst_calls} calls, failed "
                    f"{burst_failed}; load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
    finally:
        for i in live:
            i.stop()
    return {**totals, "kept_failed": dict(kept_failed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=8, help="clients keeping one connection (default 8)")
    parser.add_argument(
        "--burst-rate",
        type=int,
        default=2_000,
        help="new connections a second opened by h2load around each drain, one call each (0: none; default 2000)",
    )
    parser.add_argument(
        "--netns",
        action="store_true",
        help="run in a network namespace of its own (unshare, as root) and measure tcp_migrate_req 0 and 1",
    )
    args = parser.parse_args()
    if args.netns and not os.environ.get(IN_NETNS):
        if shutil.which("unshare") is None or shutil.which("ip") is None or os.geteuid() != 0:
            sys.exit("--netns needs root and the unshare and ip commands")
        inner = [sys.executable, "-m", "benchmarks.bench_shared_port", *sys.argv[1:]]
        script = 'ip link set lo up && exec "$@"'
        done = subprocess.run(
            ["unshare", "--net", "--", "sh", "-c", script, "sh", *inner],
            cwd=REPO,
            env={**os.environ, IN_NETNS: "1"},
        )
        sys.exit(done.returncode)
    if args.burst_rate and shutil.which("h2load") is None:
        sys.exit("h2load is needed for --burst-rate (apt-get install nghttp2-client), or give --burst-rate 0")
    workdir = Path(tempfile.mkdtemp(prefix="bench_shared_port."))
    print(f"load average {os.getloadavg()}; logs in {workdir}")
    settings = ["0", "1"] if args.netns else [MIGRATE.read_text().strip() if MIGRATE.exists() else "absent"]
    results = {}
    for value in settings:
        if args.netns:
            MIGRATE.write_text(value + "\n")  # this namespace's own
        label = f"tcp_migrate_req={value}"
        results[label] = upgrades(args, workdir, label)
    print("totals:")
    for label, r in results.items():
        print(
            f"  {label}: {args.rounds} upgrades; kept connections {r['kept']} calls, failed {r['kept_failed'] or 0}; "
            f"a new connection per call {r['burst']} calls, failed {r['burst_failed']}"
        )
    print(f"load average {os.getloadavg()} (a shared machine: provisional)")


if __name__ == "__main__":
    main()
