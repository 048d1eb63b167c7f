"""Fair service between clients (security finding 5): a heavy client against a normal one.

Run from the repository root: `python -m benchmarks.bench_fairness [--heavy N] [--drfs D]
[--period-ms P] [--warmup W] [--duration T]`. It prints what it measured; it never judges it.

The server is `pacsys-supervisor --workers 2 --backend sim --host 127.0.0.1` in a subprocess
(its default limits, or the code on PYTHONPATH: run it against an older tree to compare).
The normal client, in this process over IPv6 loopback (one identity), holds one stream of
10 DRFs at 10 Hz and makes a one-shot read every 0.25 s; it reports the lag of its stream
(arrival time minus the reading's timestamp) and the one-shot latency, first alone, then
while `--heavy` streams of `--drfs` DRFs at `@p,P` run from a subprocess over IPv4 loopback
(another identity) that reads and discards replies as fast as it can. A heavy stream the
server refuses is reported with its status and not retried.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import threading
import time

import grpc

from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2, DAQ_pb2_grpc

SERVING = re.compile(r"serving DAQ on \S+:(\d+)")


def _heavy(port: int, streams: int, drfs: int, period_ms: int, seconds: float) -> None:
    """The heavy client (run as a subprocess): `streams` streams read and discarded."""
    request = DAQ_pb2.ReadingList(drf=[f"Z:SIM{i % 1000:03d}@p,{period_ms}" for i in range(drfs)])
    counts = [0] * streams
    outcome = ["ok"] * streams
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        read = channel.unary_stream(
            "/services.daq.DAQ/Read", request_serializer=DAQ_pb2.ReadingList.SerializeToString
        )  # replies stay bytes: this client only counts them

        def one(k: int) -> None:
            try:
                for _ in read(request, timeout=seconds):
                    counts[k] += 1
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                    outcome[k] = f"{exc.code().name}: {exc.details()}"

        threads = [threading.Thread(target=one, args=(k,)) for k in range(streams)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(seconds + 10)
    for k in range(streams):
        print(f"heavy stream {k}: {counts[k]} replies, {counts[k] / seconds:.0f}/s, {outcome[k]}", flush=True)


class Normal:
    """The normal client: stream lag and one-shot latency, sampled until stopped."""

    def __init__(self, port: int):
        self.channel = grpc.insecure_channel(f"[::1]:{port}")
        self.stub = DAQ_pb2_grpc.DAQStub(self.channel)
        self.lags: list[float] = []
        self.oneshots: list[float] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._call = self.stub.Read(DAQ_pb2.ReadingList(drf=[f"Z:SIM{900 + i}@p,100" for i in range(10)]))
        self._threads = [threading.Thread(target=self._stream), threading.Thread(target=self._oneshot)]
        for t in self._threads:
            t.start()

    def _stream(self) -> None:
        try:
            for reply in self._call:
                now = time.time()
                for reading in reply.readings.reading:
                    self.lags.append(now - reading.timestamp.ToNanoseconds() / 1e9)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                self.errors.append(exc.code().name)

    def _oneshot(self) -> None:
        while not self._stop.wait(0.25):
            started = time.perf_counter()
            try:
                list(self.stub.Read(DAQ_pb2.ReadingList(drf=["M:OUTTMP@I"]), timeout=10))
                self.oneshots.append(time.perf_counter() - started)
            except grpc.RpcError as exc:
                self.errors.append(exc.code().name)

    def window(self) -> tuple[int, int]:
        return len(self.lags), len(self.oneshots)

    def report(self, label: str, since: tuple[int, int]) -> None:
        lags = sorted(self.lags[since[0] :])
        shots = sorted(self.oneshots[since[1] :])
        if not lags or not shots:
            print(f"{label}: no samples (errors {self.errors})", flush=True)
            return
        p95 = lags[int(0.95 * (len(lags) - 1))]
        print(
            f"{label}: stream lag median {statistics.median(lags) * 1e3:.1f} ms, p95 {p95 * 1e3:.1f} ms, "
            f"max {lags[-1] * 1e3:.1f} ms ({len(lags)} readings); one-shot median "
            f"{statistics.median(shots) * 1e3:.1f} ms, max {shots[-1] * 1e3:.1f} ms ({len(shots)} calls)",
            flush=True,
        )

    def close(self) -> None:
        self._stop.set()
        self._call.cancel()
        for t in self._threads:
            t.join(15)
        self.channel.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heavy", type=int, default=1, help="heavy streams (default 1)")
    parser.add_argument("--drfs", type=int, default=1000, help="DRFs per heavy stream (default 1000)")
    parser.add_argument("--period-ms", type=int, default=1, help="period of the heavy DRFs (default 1 ms)")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--_heavy-client", dest="heavy_client", type=int, help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.heavy_client is not None:
        _heavy(ns.heavy_client, ns.heavy, ns.drfs, ns.period_ms, ns.duration)
        return
    server = subprocess.Popen(
        [sys.executable, "-m", "pacsys.supervised.cli", "--workers", "2", "--backend", "sim", "--host", "127.0.0.1"]
        + ["--port", "0", "--log-level", "warning"],
        stdout=subprocess.PIPE,
        text=True,
    )
    heavy = None
    try:
        assert server.stdout is not None
        match = SERVING.search(server.stdout.readline())
        if match is None:
            raise SystemExit("the server did not start")
        port = int(match.group(1))
        normal = Normal(port)
        time.sleep(ns.warmup)
        mark = normal.window()
        time.sleep(ns.duration)
        normal.report("alone", mark)
        heavy = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.bench_fairness", "--_heavy-client", str(port)]
            + ["--heavy", str(ns.heavy), "--drfs", str(ns.drfs), "--period-ms", str(ns.period_ms)]
            + ["--duration", str(ns.warmup + ns.duration)],
            env=os.environ,
        )
        time.sleep(ns.warmup)
        mark = normal.window()
        time.sleep(ns.duration)
        normal.report(f"with {ns.heavy} x {ns.drfs} DRFs @p,{ns.period_ms}", mark)
        heavy.wait(ns.duration + 30)
        normal.close()
    finally:
        for proc in (heavy, server):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()


if __name__ == "__main__":
    main()
