"""Chaos: mixed load on a real pacsys-supervisor while its workers are killed and stopped at random.

    python -m benchmarks.bench_chaos                                # moderate: a fault every 2-4 s for 60 s
    python -m benchmarks.bench_chaos --interval 0.4:1.2 --chaos 35  # a storm

A `pacsys-supervisor --workers 3` process (a sync backend, `benchmarks.backends:chaos_sync`,
on 127.0.0.1, a free port) serves this load from one client process: 16 one-shot readers,
4 readers of 50-DRF batches, 100 streams at 10 Hz over 50 devices and 4 writers, each
retrying a failed call after 50 ms. After a warm-up, a chaos loop picks a random child of
the front every `--interval` seconds and SIGKILLs it, or SIGSTOPs it for 4 s
(`--stop-share` of the faults); then a quiet tail. Everything stops by itself.

It prints failed calls by status code, the write outcomes (acknowledged, outcome unknown,
and what the backend's own log says was applied: none may be lost, none applied twice),
the longest stream gap, the front's exit and cool-down counts, and how long after the
last fault full service was back (no failed read, every stream delivering). It measures;
it does not pass or fail.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil

from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2, DAQ_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
SERVING = re.compile(r"serving DAQ on (\S+):(\d+)")
DEVICES = [f"Z:SIM{i:03d}" for i in range(50)]
RETRY_AFTER = 0.05
STOP_SECONDS = 4.0
GAP_SECONDS = 0.5  # a stream silent this long (five periods) is not delivering


@dataclass
class Tally:
    ok: int = 0
    failed: collections.Counter = field(default_factory=collections.Counter)
    failure_times: list[float] = field(default_factory=list)

    def fail(self, code: grpc.StatusCode) -> None:
        self.failed[code.name] += 1
        self.failure_times.append(time.monotonic())


@dataclass
class Writes:
    acknowledged: list[tuple[str, float]] = field(default_factory=list)
    unknown: list[tuple[str, float]] = field(default_factory=list)
    refused: collections.Counter = field(default_factory=collections.Counter)  # never sent (RPC failed)
    other: collections.Counter = field(default_factory=collections.Counter)  # answered with another status


@dataclass
class Stream:
    last: float = 0.0
    gaps: list[tuple[float, float]] = field(default_factory=list)  # (start, end) of silences over GAP_SECONDS
    received: int = 0
    ended: int = 0


class Load:
    def __init__(self, address: str):
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = DAQ_pb2_grpc.DAQStub(self.channel)
        self.reads = Tally()
        self.batches = Tally()
        self.writes = Writes()
        self.streams = [Stream() for _ in range(100)]
        self.stopping = False

    async def reader(self, k: int) -> None:
        rng = random.Random(k)
        while not self.stopping:
            await self._read([f"{rng.choice(DEVICES)}@I"], self.reads)

    async def batch_reader(self, k: int) -> None:
        drfs = [f"{d}@I" for d in DEVICES]
        while not self.stopping:
            await self._read(drfs, self.batches)

    async def _read(self, drfs: list[str], tally: Tally) -> None:
        try:
            replies = [r async for r in self.stub.Read(DAQ_pb2.ReadingList(drf=drfs), timeout=10)]
            if len(replies) != len(drfs):
                raise RuntimeError(f"{len(replies)} replies for {len(drfs)} DRFs")
            tally.ok += 1
        except grpc.RpcError as exc:
            tally.fail(exc.code())
            await asyncio.sleep(RETRY_AFTER)

    async def writer(self, k: int) -> None:
        device = f"Z:CHAOSW{k}"
        for i in range(10**9):
            if self.stopping:
                return
            value = float(k * 1_000_000 + i)
            request = DAQ_pb2.SettingList(setting=[DAQ_pb2.Setting(device=device)])
            request.setting[0].value.scalar = value
            try:
                reply = await self.stub.Set(request, timeout=10)
            except grpc.RpcError as exc:
                self.writes.refused[exc.code().name] += 1
                await asyncio.sleep(RETRY_AFTER)  # never sent to a worker: a new value is safe
                continue
            status = reply.status[0]
            if status.status_code == 0:
                self.writes.acknowledged.append((device, value))
            elif (status.facility_code, status.status_code) == (17, -120):
                self.writes.unknown.append((device, value))
            else:
                self.writes.other[f"{status.facility_code}/{status.status_code}"] += 1

    async def stream(self, k: int) -> None:
        state = self.streams[k]
        drf = f"{DEVICES[k % len(DEVICES)]}@p,100"
        while not self.stopping:
            call = self.stub.Read(DAQ_pb2.ReadingList(drf=[drf]))
            try:
                async for _ in call:
                    now = time.monotonic()
                    if state.last and now - state.last > GAP_SECONDS:
                        state.gaps.append((state.last, now))
                    state.last = now
                    state.received += 1
                    if self.stopping:
                        call.cancel()
                        return
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.CANCELLED and self.stopping:
                    return
                state.ended += 1  # a client reconnects, as the pacsys client does
                await asyncio.sleep(RETRY_AFTER)


async def chaos(
    front: psutil.Process, seconds: float, interval: tuple[float, float], stop_share: float, rng: random.Random
) -> list[tuple[float, str]]:
    faults: list[tuple[float, str]] = []
    stopped: list[asyncio.Task] = []
    end = time.monotonic() + seconds
    while True:
        await asyncio.sleep(rng.uniform(*interval))
        if time.monotonic() >= end:
            break
        children = front.children()
        if not children:
            continue
        victim = rng.choice(children)
        try:
            if rng.random() < stop_share:
                victim.send_signal(signal.SIGSTOP)
                faults.append((time.monotonic(), "SIGSTOP"))
                stopped.append(asyncio.create_task(_resume_later(victim)))
            else:
                victim.send_signal(signal.SIGKILL)
                faults.append((time.monotonic(), "SIGKILL"))
        except psutil.Error:
            pass
    await asyncio.gather(*stopped)
    return faults


async def _resume_later(process: psutil.Process) -> None:
    await asyncio.sleep(STOP_SECONDS)
    try:
        process.send_signal(signal.SIGCONT)
    except psutil.Error:
        pass


def start_front(workers: int, log: Path, stderr_path: Path) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, CHAOS_WRITE_LOG=str(log), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "pacsys.supervised.cli", "--workers", str(workers)]
    cmd += ["--backend", "benchmarks.backends:chaos_sync", "--host", "127.0.0.1", "--port", "0"]
    cmd += ["--allow-writes", "Z:CHAOSW*"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr_path.open("w"), text=True, env=env, cwd=REPO)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = SERVING.search(line)
    if match is None:
        proc.kill()
        raise SystemExit(f"the front did not start: {line!r}; see {stderr_path}")
    return proc, f"127.0.0.1:{match.group(2)}"


async def status(stub_channel: grpc.aio.Channel) -> dict:
    call = stub_channel.unary_unary("/pacsys.supervisor.Admin/Status")
    return json.loads(await call(b"", timeout=10))


async def run(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    workdir = Path(tempfile.mkdtemp(prefix="bench-chaos-"))
    log = workdir / "applied.log"
    front, address = start_front(args.workers, log, workdir / "front.log")
    load = Load(address)
    try:
        tasks = [asyncio.create_task(load.reader(k)) for k in range(16)]
        tasks += [asyncio.create_task(load.batch_reader(k)) for k in range(4)]
        tasks += [asyncio.create_task(load.writer(k)) for k in range(4)]
        tasks += [asyncio.create_task(load.stream(k)) for k in range(100)]
        await asyncio.sleep(args.warmup)
        baseline = (load.reads.ok, load.batches.ok)
        print(
            f"warm-up {args.warmup:g} s: {baseline[0]} reads, {baseline[1]} batches; chaos for {args.chaos:g} s",
            flush=True,
        )
        chaos_started = time.monotonic()
        faults = await chaos(psutil.Process(front.pid), args.chaos, args.interval, args.stop_share, rng)
        last_fault = faults[-1][0] if faults else chaos_started
        await asyncio.sleep(args.tail)
        view = await status(load.channel)
        load.stopping = True
        done, pending = await asyncio.wait(tasks, timeout=15)
        for t in pending:
            t.cancel()
        ended_at = time.monotonic()
    finally:
        await load.channel.close()
        front.send_signal(signal.SIGTERM)
        try:
            front.wait(30)
        except subprocess.TimeoutExpired:
            front.kill()
    report(args, load, faults, chaos_started, last_fault, ended_at, view, log)
    print(f"front log: {workdir / 'front.log'}")


def report(
    args, load: Load, faults, chaos_started: float, last_fault: float, ended_at: float, view: dict, log: Path
) -> None:
    kinds = collections.Counter(kind for _, kind in faults)
    print(f"faults: {len(faults)} ({dict(kinds)}) over {args.chaos:g} s, then {args.tail:g} s quiet")
    for name, tally in (("one-shot reads", load.reads), ("50-DRF batches", load.batches)):
        failed = sum(tally.failed.values())
        print(f"{name}: {tally.ok} ok, {failed} failed attempts {dict(tally.failed) or ''}")
    # Writes: what the backend applied, from its own log.
    applied = collections.Counter(tuple(line.split(" ", 1)) for line in log.read_text().splitlines())
    applied_values = collections.Counter({(d, float(v)): n for (d, v), n in applied.items()})
    w = load.writes
    lost = [x for x in w.acknowledged if applied_values[x] == 0]
    twice = [x for x, n in applied_values.items() if n > 1]
    unknown_applied = sum(1 for x in w.unknown if applied_values[x] > 0)
    print(
        f"writes: {len(w.acknowledged)} acknowledged, {len(lost)} of them lost; {len(twice)} applied twice; "
        f"{len(w.unknown)} outcome unknown ({unknown_applied} applied, {len(w.unknown) - unknown_applied} not); "
        f"refused before sending {dict(w.refused) or 0}; other answers {dict(w.other) or 0}"
    )
    gaps = [(s, e) for st in load.streams for s, e in st.gaps if s >= chaos_started]
    longest = max((e - s for s, e in gaps), default=0.0)
    alive = sum(1 for st in load.streams if ended_at - st.last < 2.0)
    ended = sum(st.ended for st in load.streams)
    print(
        f"streams: {alive}/{len(load.streams)} delivering at the end, {ended} ended by the server, "
        f"{len(gaps)} gaps over {GAP_SECONDS:g} s, longest {longest * 1e3:.0f} ms"
    )
    pool = view.get("pool", {})
    print(
        f"front: exits {pool.get('exits_by_reason')}, cool-downs {pool.get('cooldowns')}, "
        f"calls waited {pool.get('calls_waited')} (unavailable {pool.get('calls_unavailable')}), "
        f"reads retried {pool.get('reads_retried')}, workers "
        + ", ".join(f"{r['slot']}:{r['state']}" for r in view.get("workers", []))
    )
    # Full service: the last failed read and the end of the last stream gap after the last fault.
    failures = load.reads.failure_times + load.batches.failure_times
    marks = [t for t in failures if t >= last_fault] + [e for s, e in gaps if e >= last_fault]
    back = max(marks, default=last_fault) - last_fault
    still_failing = any(ended_at - t < 2.0 for t in failures)
    print(
        f"full service {back:.1f} s after the last fault"
        + (" (reads still failing at the end)" if still_failing else "")
        + (f"; {len(load.streams) - alive} streams not delivering at the end" if alive < len(load.streams) else "")
    )


def _interval(text: str) -> tuple[float, float]:
    low, _, high = text.partition(":")
    return float(low), float(high or low)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--chaos", type=float, default=60.0, help="seconds of faults")
    parser.add_argument("--interval", type=_interval, default=(2.0, 4.0), help="seconds between faults, LOW:HIGH")
    parser.add_argument("--stop-share", type=float, default=0.3, help="share of faults that are a 4 s SIGSTOP")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--tail", type=float, default=15.0, help="quiet seconds after the last fault")
    parser.add_argument("--seed", type=int, default=None)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
