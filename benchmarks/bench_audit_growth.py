"""How fast one unauthenticated client can grow the audit log of a real pacsys-supervisor.

    python -m benchmarks.bench_audit_growth                 # the service's defaults, 10 s
    python -m benchmarks.bench_audit_growth --seconds 20 -- --audit-client-bytes-per-second 0

A `pacsys-supervisor` process (sim backend, 2 workers, 127.0.0.1, a free port, an audit log
in a temporary directory; arguments after `--` are passed to it) is sent one-shot Reads of
1,000 valid 512-character DRFs of unknown devices (`Z:U00000[0:000...1]@I`), `--concurrency`
at a time from one client, for `--seconds`. It prints the requests answered, the bytes the
audit files grew by (the log and its rotated files) and that per second and per request,
what the audit metrics say was summarised, and the load average. It measures; it does not
pass or fail. Loopback only; it stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc

from benchmarks.pair import free_port
from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2, DAQ_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
SERVING = re.compile(r"serving DAQ on (\S+):(\d+)")
DRF_CHARS = 512
DRFS_PER_REQUEST = 1000


def long_drf(i: int) -> str:
    """A valid DRF of exactly DRF_CHARS characters naming a device that does not exist."""
    head, tail = f"Z:U{i:05d}[0:", "]@I"
    return head + "0" * (DRF_CHARS - len(head) - len(tail) - 1) + "1" + tail


def audit_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("audit.jsonl*"))


def audit_metrics(port: int) -> list[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return [line for line in text.splitlines() if line.startswith("pacsys_audit_") and "_created" not in line]


async def size_at_half_time(directory: Path, seconds: float) -> tuple[float, int]:
    """(when, audit bytes) half way through: the second half shows the rate once a burst is spent."""
    await asyncio.sleep(seconds / 2)
    return time.monotonic(), audit_bytes(directory)


async def run(address: str, directory: Path, seconds: float, concurrency: int) -> tuple[int, int, tuple[float, int]]:
    half = asyncio.create_task(size_at_half_time(directory, seconds))
    answered, failed = await flood(address, seconds, concurrency)
    return answered, failed, await half


async def flood(address: str, seconds: float, concurrency: int) -> tuple[int, int]:
    request = DAQ_pb2.ReadingList(drf=[long_drf(i) for i in range(DRFS_PER_REQUEST)])
    answered = failed = 0
    deadline = time.monotonic() + seconds
    options = [("grpc.max_send_message_length", 8 * 1024 * 1024), ("grpc.max_receive_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        stub = DAQ_pb2_grpc.DAQStub(channel)

        async def one_client_task() -> None:
            nonlocal answered, failed
            while time.monotonic() < deadline:
                try:
                    async for _ in stub.Read(request, timeout=30):
                        pass
                    answered += 1
                except grpc.aio.AioRpcError:
                    failed += 1

        await asyncio.gather(*(one_client_task() for _ in range(concurrency)))
    return answered, failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="how long the client sends (default 10)")
    parser.add_argument("--concurrency", type=int, default=4, help="calls in flight at once (default 4)")
    parser.add_argument("service_args", nargs="*", help="more pacsys-supervisor options (after --)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-audit-"))
    metrics_port = free_port()
    cmd = [sys.executable, "-m", "pacsys.supervised.cli", "--host", "127.0.0.1", "--port", "0"]
    cmd += ["--metrics-port", str(metrics_port), "--audit-path", str(workdir / "audit.jsonl"), *args.service_args]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    with (workdir / "front.log").open("w") as front_log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=front_log, text=True, env=env, cwd=REPO)
    try:
        assert proc.stdout is not None
        match = SERVING.search(proc.stdout.readline())
        if match is None:
            raise SystemExit(f"the service did not start; see {workdir / 'front.log'}")
        address = f"127.0.0.1:{match.group(2)}"
        before = audit_bytes(workdir)
        started = time.monotonic()
        answered, failed, (half_at, half_size) = asyncio.run(run(address, workdir, args.seconds, args.concurrency))
        ended = time.monotonic()
        elapsed = ended - started
        grown = audit_bytes(workdir) - before
        second_half = (audit_bytes(workdir) - half_size) / (ended - half_at)
        print(f"service: {' '.join(cmd[3:])}")
        print(
            f"{answered} Reads of {DRFS_PER_REQUEST} x {DRF_CHARS}-character DRFs answered, {failed} failed, "
            f"in {elapsed:.1f} s ({answered / elapsed:.1f}/s)"
        )
        per_request = grown / answered if answered else float("nan")
        print(
            f"audit grew {grown} bytes: {grown / elapsed / 1000:.1f} KB/s, {per_request:.0f} bytes per request; "
            f"{second_half / 1000:.1f} KB/s in the second half"
        )
        for line in audit_metrics(metrics_port):
            print(f"  {line}")
        print(f"load average: {os.getloadavg()}")
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
