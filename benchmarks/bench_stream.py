"""Streaming benchmark (issue 6): many periodic streams, fan-out of one DRF, one stalled client.

Run from the repository root: `python -m benchmarks.bench_stream [--quick] [--streams S]
[--period-ms P] [--devices D] [--modes null,inproc,pool2] [--only spread|fanout|stall]
[--client h2|grpc] [--client-procs K] [--warmup W] [--duration T]`. It prints what it measured;
it never judges it.

The client shares the machine's cores with the server it measures, so by default spread and
fanout read through `benchmarks.h2_reader` (HTTP/2 frames counted, read every 5 ms: a few
microseconds per reply); `--client grpc` uses a grpc.aio client (about 50 µs per reply, which
on 2 cores caps any server near half of 25,000 replies/s).

spread   S streams, stream i reads `Z:SIM{i mod D}@p,P`, against the null streaming server,
         SupervisedServer(sim) in-process and SupervisedServer(WorkerPool(sim, 2)), each in a
         subprocess. Prints delivered replies/s and the delivery ratio: delivered / (S * window / P),
         the whole and the worst single stream.
fanout   100 clients on one DRF against SupervisedServer(WorkerPool(sim, 2)) run in this process
         (in a thread), printing the pool's backend subscription count and the delivery ratio.
stall    100 clients, one of which opens a stream of all D devices and never reads; the 99 others
         read one DRF each. Prints the others' delivery ratio and the front process's RSS before
         the clients connect, at the end of the window and after they left.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import psutil

from benchmarks.bench_load import LoadGenerator, run_on_loop
from benchmarks.h2_reader import count_streams
from benchmarks.serve import ONE_HOST_LIMITS, ServerProcess, parse_modes

MODES = ["null", "inproc", "pool2"]
SECTIONS = ["spread", "fanout", "stall"]


# -- stream clients (in a spawned process) -------------------------------------------------------


async def _streams(port: int, streams: list[tuple[list[str], bool]], t_start: float, t_end: float) -> dict:
    """Open one Read per (drfs, stalled); count replies received in [t_start, t_end) per stream."""
    from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2

    counts = [0] * len(streams)
    firsts: list[float | None] = [None] * len(streams)
    errors = 0
    cpu: list[float] = []
    loop = asyncio.get_running_loop()
    for t in (t_start, t_end):
        loop.call_later(max(0.0, t - time.time()), lambda: cpu.append(time.process_time()))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await channel.channel_ready()
        opened = time.time()
        # Replies stay bytes: the client only counts them (its CPU is part of the budget).
        read = channel.unary_stream("/services.daq.DAQ/Read", request_serializer=DAQ_pb2.ReadingList.SerializeToString)

        async def stream(index: int, drfs: list[str], stalled: bool) -> None:
            nonlocal errors
            call = read(DAQ_pb2.ReadingList(drf=drfs))
            try:
                if stalled:
                    await call.initial_metadata()
                    await asyncio.sleep(max(0.0, t_end - time.time()))  # open, never read
                    return
                async for _ in call:
                    now = time.time()
                    if firsts[index] is None:
                        firsts[index] = now
                    if now >= t_end:
                        return
                    if now >= t_start:
                        counts[index] += 1
            except grpc.aio.AioRpcError:
                errors += 1
            finally:
                call.cancel()

        await asyncio.gather(*(stream(i, drfs, stalled) for i, (drfs, stalled) in enumerate(streams)))
    live = [f for f, (_, stalled) in zip(firsts, streams, strict=True) if not stalled]
    last_first = None if None in live else max(f for f in live if f is not None)
    return {
        "counts": counts,
        "errors": errors,
        "cpu": cpu[1] - cpu[0] if len(cpu) == 2 else 0.0,
        "opened": opened,
        "last_first": last_first,
    }


def run_streams(port: int, streams: list[tuple[list[str], bool]], t_start: float, t_end: float) -> dict:
    return run_on_loop(_streams(port, streams, t_start, t_end))


def run_h2_streams(port: int, streams: list[tuple[list[str], bool]], t_start: float, t_end: float) -> dict:
    """The same load through the frame-counting reader (no stalled streams: it reads everything)."""
    from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2

    assert not any(stalled for _, stalled in streams), "the h2 reader cannot stall a stream"
    requests = [DAQ_pb2.ReadingList(drf=drfs).SerializeToString() for drfs, _ in streams]
    return run_on_loop(count_streams(port, "/services.daq.DAQ/Read", requests, t_start, t_end))


# -- measuring -------------------------------------------------------------------------------------


def _rss_mb(pid: int) -> float:
    try:
        return psutil.Process(pid).memory_info().rss / 2**20
    except psutil.Error:
        return float("nan")


def _cpu_s(pid: int) -> float:
    try:
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except psutil.Error:
        return 0.0


def measure(
    generator: LoadGenerator,
    port: int,
    front_pid: int,
    streams: list[tuple[list[str], bool]],
    period: float,
    args: argparse.Namespace,
    during=None,
    reader=None,
) -> dict:
    """Run `streams` against the server at `port`; `during()` is called halfway through the window.

    `reader` runs the streams in a client process: the one `--client` chose unless given.
    """
    reader = reader or (run_h2_streams if args.client == "h2" else run_streams)
    t_start = time.time() + 0.3 + args.warmup
    t_end = t_start + args.duration
    rss_before = _rss_mb(front_pid)
    procs = generator.procs
    calls = [(port, streams[i::procs], t_start, t_end) for i in range(procs) if streams[i::procs]]
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(generator.map, reader, calls, t_end)
        time.sleep(max(0.0, t_start - time.time()))
        cpu0 = _cpu_s(front_pid)
        time.sleep(max(0.0, t_start + args.duration / 2 - time.time()))
        extra = during() if during is not None else None
        time.sleep(max(0.0, t_end - time.time()))
        cpu1 = _cpu_s(front_pid)
        rss_end = _rss_mb(front_pid)
        parts = future.result()
    time.sleep(0.5)  # the server notices the cancelled streams
    counts: list[int] = [0] * len(streams)
    for i, part in enumerate(parts):
        counts[i::procs] = part["counts"]
    live = [(n, drfs) for n, (drfs, stalled) in zip(counts, streams, strict=True) if not stalled]
    delivered = sum(n for n, _ in live)
    expected = sum(len(drfs) for _, drfs in live) * args.duration / period
    worst = min(n / (len(drfs) * args.duration / period) for n, drfs in live)
    return {
        "replies_s": delivered / args.duration,
        "ratio": delivered / expected,
        "worst": worst,
        "front_us": (cpu1 - cpu0) / delivered * 1e6 if delivered else float("nan"),
        "client_us": sum(p["cpu"] for p in parts) / delivered * 1e6 if delivered else float("nan"),
        "errors": sum(p["errors"] for p in parts),
        # Seconds from opening the streams until every one had delivered (None: some never did).
        "open_s": None
        if any(p["last_first"] is None for p in parts)
        else max(p["last_first"] for p in parts) - min(p["opened"] for p in parts),
        "rss": (rss_before, rss_end, _rss_mb(front_pid)),
        "extra": extra,
    }


def _server_args(mode: str) -> tuple[str, str, int]:
    return ("pool", "sim", int(mode[4:])) if mode.startswith("pool") else (mode, "sim", 0)


def spread(generator: LoadGenerator, args: argparse.Namespace, modes: list[str]) -> None:
    period = args.period_ms / 1000
    streams = [([f"Z:SIM{i % args.devices:03d}@p,{args.period_ms}"], False) for i in range(args.streams)]
    print(f"\nspread: {args.streams} streams of DEV@p,{args.period_ms} over {args.devices} devices")
    print(
        f"{'mode':<7} {'replies/s':>10} {'expected/s':>10} {'ratio':>6} {'worst':>6} {'front':>6} {'client':>6} "
        f"{'open s':>6} err"
    )
    for mode in modes:
        with ServerProcess.serving(*_server_args(mode)) as server:
            r = measure(generator, server.port, server.pid, streams, period, args)
        print(
            f"{mode:<7} {r['replies_s']:>10.0f} {args.streams / period:>10.0f} {r['ratio']:>6.2f} "
            f"{r['worst']:>6.2f} {r['front_us']:>6.0f} {r['client_us']:>6.0f} {_seconds(r['open_s']):>6} "
            f"{r['errors']}",
            flush=True,
        )
    print(
        "ratio: delivered / expected over the window; worst: the lowest single stream's ratio; "
        "front, client: CPU microseconds per delivered reply; open s: seconds from opening the streams "
        "until every one had delivered ('never': some had not by the window's end; streams that start "
        "late count against the ratio, so give --warmup more than this)."
    )


def _seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f}"


def fanout(generator: LoadGenerator, args: argparse.Namespace) -> None:
    from pacsys.pool.pool import WorkerPool
    from pacsys.supervised import SupervisedServer

    pool = WorkerPool(backend="sim", workers=2)
    server = SupervisedServer(
        pool, port=0, host="127.0.0.1", close_backend=True, shutdown_grace=0.5, limits=ONE_HOST_LIMITS
    )
    drf = f"Z:SIM000@p,{args.period_ms}"

    def counts() -> tuple[int, int]:
        async def read() -> tuple[int, int]:
            return pool.subscription_count, pool.client_subscription_count

        assert server.loop is not None
        return asyncio.run_coroutine_threadsafe(read(), server.loop).result(10)

    server.start()
    try:
        r = measure(generator, server.port, os.getpid(), [([drf], False)] * 100, args.period_ms / 1000, args, counts)
    finally:
        server.stop()
    backend_subs, client_subs = r["extra"]
    print(f"\nfanout: 100 clients on {drf}, WorkerPool(sim, 2) in this process")
    print(
        f"backend subscriptions={backend_subs} client subscriptions={client_subs} "
        f"replies/s={r['replies_s']:.0f} ratio={r['ratio']:.2f} worst={r['worst']:.2f} errors={r['errors']}"
    )


def stall(generator: LoadGenerator, args: argparse.Namespace, modes: list[str]) -> None:
    period = args.period_ms / 1000
    everything = [f"Z:SIM{i:03d}@p,{args.period_ms}" for i in range(args.devices)]
    streams = [(everything, True)] + [([f"Z:SIM{i % args.devices:03d}@p,{args.period_ms}"], False) for i in range(99)]
    print(f"\nstall: 99 readers of one DRF each + 1 stream of {args.devices} DRFs that never reads")
    print(f"{'mode':<7} {'ratio':>6} {'worst':>6} {'RSS MB before':>13} {'end':>7} {'after':>7} err")
    for mode in modes:
        with ServerProcess.serving(*_server_args(mode)) as server:
            r = measure(generator, server.port, server.pid, streams, period, args, reader=run_streams)
        before, end, after = r["rss"]
        print(
            f"{mode:<7} {r['ratio']:>6.2f} {r['worst']:>6.2f} {before:>13.1f} {end:>7.1f} {after:>7.1f} {r['errors']}",
            flush=True,
        )
    print("ratio/worst: the 99 readers only; RSS of the front process (workers not included).")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 s warm-up and 2 s per run")
    parser.add_argument(
        "--warmup",
        type=float,
        default=8.0,
        help="seconds between opening the streams and counting (default 8: a saturated front "
        "accepts new streams slowly, see 'open s')",
    )
    parser.add_argument("--duration", type=float, default=6.0, help="seconds counted (default 6)")
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--period-ms", type=int, default=20)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated: null, inproc, poolN")
    parser.add_argument("--only", action="append", choices=SECTIONS, help="run only this part (repeatable)")
    parser.add_argument("--client-procs", type=int, default=1, help="stream-client processes (default 1)")
    parser.add_argument(
        "--client",
        choices=["h2", "grpc"],
        default="h2",
        help="spread/fanout reader: h2 counts HTTP/2 frames (cheap), grpc is a grpc.aio client (default h2; "
        "stall always uses grpc.aio, whose stalled stream is a real client's)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.warmup, args.duration = 1.0, 2.0
    try:
        modes = parse_modes(args.modes, ("null", "inproc"))
    except ValueError as exc:
        parser.error(str(exc))
    sections = args.only or SECTIONS
    print(
        f"cores={psutil.cpu_count()} loadavg={os.getloadavg()[0]:.2f} client={args.client} client_procs={args.client_procs} "
        f"warmup={args.warmup}s duration={args.duration}s"
    )
    generator = LoadGenerator(args.client_procs)
    try:
        if "spread" in sections:
            spread(generator, args, modes)
        if "fanout" in sections:
            fanout(generator, args)
        if "stall" in sections:
            stall(generator, args, modes)
    finally:
        generator.close()
    print(f"\nloadavg at the end: {os.getloadavg()[0]:.2f} (other processes on this machine skew the numbers)")


if __name__ == "__main__":
    main()
