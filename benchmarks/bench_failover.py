"""Fail-over figures: restart-to-ready time, stream gap, and one-shot calls lost.

`python -m benchmarks.bench_failover [--kills N]`: a pool of 2 sim workers behind a real
server, 50 client streams at 10 Hz and 8 clients of one-shot reads; each round kills the
worker that holds the most subscriptions with SIGKILL and prints what the pool measured.
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import statistics
import threading
import time

import grpc

from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2, DAQ_pb2_grpc
from pacsys.pool.pool import WorkerPool
from pacsys.supervised import SupervisedServer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kills", type=int, default=5)
    args = parser.parse_args()
    pool = WorkerPool(backend="sim", workers=2, restart_backoff_initial=0.1, restart_intensity=100)
    server = SupervisedServer(pool, port=0, host="127.0.0.1", close_backend=True)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = DAQ_pb2_grpc.DAQStub(channel)
    stop = threading.Event()
    calls, failures = [0], [0]
    codes: collections.Counter = collections.Counter()

    def oneshots(k: int) -> None:
        while not stop.is_set():
            try:
                list(stub.Read(DAQ_pb2.ReadingList(drf=[f"Z:SIM{k * 7 % 100:03d}@I"]), timeout=5))
                calls[0] += 1
            except grpc.RpcError as exc:
                failures[0] += 1
                codes[exc.code().name] += 1

    streams = [stub.Read(DAQ_pb2.ReadingList(drf=[f"Z:SIM{i:03d}@p,100"])) for i in range(50)]
    ended = [0]

    def consume(call) -> None:
        try:
            for _ in call:
                pass
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                ended[0] += 1

    consumers = [threading.Thread(target=consume, args=(c,), daemon=True) for c in streams]
    callers = [threading.Thread(target=oneshots, args=(k,), daemon=True) for k in range(8)]
    for t in consumers + callers:
        t.start()
    time.sleep(2)
    to_ready, gaps = [], []
    try:
        for _ in range(args.kills):
            rows = pool.worker_states()
            victim = max(rows, key=lambda r: r.subscriptions)
            before_gaps = pool.stats.stream_gaps
            assert victim.pid is not None
            os.kill(victim.pid, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                rows = pool.worker_states()
                if pool.ready_count == 2 and victim.pid not in [r.pid for r in rows]:
                    break
                time.sleep(0.01)
            time.sleep(1.5)  # let the moved subscriptions deliver and move back
            to_ready.append(pool.stats.last_restart_to_ready_seconds or float("nan"))
            gaps.append(pool.stats.max_gap_seconds)
            print(
                f"kill pid {victim.pid} ({victim.subscriptions} subscriptions): restart-to-ready "
                f"{to_ready[-1] * 1e3:.0f} ms, gaps {pool.stats.stream_gaps - before_gaps}, "
                f"longest gap so far {gaps[-1] * 1e3:.0f} ms"
            )
    finally:
        stop.set()
        for t in callers:  # let each finish its call: closing the channel under it is no failure
            t.join(10)
        for c in streams:
            c.cancel()
        channel.close()
        server.stop()
    print(
        f"restart-to-ready median {statistics.median(to_ready) * 1e3:.0f} ms, longest stream gap "
        f"{max(gaps) * 1e3:.0f} ms, one-shot calls {calls[0]} with {failures[0]} failed"
        f"{f' {dict(codes)}' if codes else ''}, streams ended {ended[0]}"
    )


if __name__ == "__main__":
    main()
