"""Load benchmark: the same loads against the null server, the in-process modes and the pool.

Run from the repository root: `python -m benchmarks.bench_load [--quick] [--only LOAD ...]
[--modes null,inproc,...] [--client-procs K]`. Every server runs in a subprocess
(`benchmarks.serve`) and every client in a spawned load-generator process, so no two share a GIL.
The script prints what it measured; it never judges it.

Loads (each: warm-up, then a timed window; only calls that complete inside it are counted):
    read1     32 concurrent one-shot reads of one DRF (Z:SIM000..Z:SIM099@I, spread), memory backend
    read100   8 concurrent one-shot reads of 100 DRFs each, memory backend
    blocking  64 concurrent one-DRF reads, sync backend sleeping 10 ms per call
    cpu       32 concurrent one-DRF reads, sync backend burning 1 ms of CPU per call
    write     32 concurrent one-setting Sets, memory backend
Modes: null (bare grpc.aio server), inproc (SupervisedServer(backend); sync backends through
pacsys's thread-pool adapter), to_thread (sync backends through asyncio.to_thread; skipped for async
backends, where it is inproc), pool1/pool2/pool4 (WorkerPool with 1, 2, 4 workers).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import multiprocessing
import os
import time
from dataclasses import dataclass

import grpc
import psutil

from benchmarks.serve import ServerProcess, parse_modes

MEMORY = "benchmarks.backends:memory"
DEVICES = [f"Z:SIM{i:03d}" for i in range(100)]


@dataclass(frozen=True)
class Load:
    name: str
    backend: str
    concurrency: int
    drfs: int = 1  # DRFs per read, or settings per Set
    write: bool = False


LOADS = {
    load.name: load
    for load in (
        Load("read1", MEMORY, 32),
        Load("read100", MEMORY, 8, drfs=100),
        Load("blocking", "benchmarks.backends:blocking_10ms", 64),
        Load("cpu", "benchmarks.backends:cpu_1ms", 32),
        Load("write", MEMORY, 32, write=True),
    )
}
MODES = ["null", "inproc", "to_thread", "pool1", "pool2", "pool4"]


# -- the load generator (runs in a spawned process) --------------------------------------------


async def _generate(port: int, load: Load, first: int, count: int, t_start: float, t_end: float) -> dict:
    from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2, DAQ_pb2_grpc

    if load.write:
        requests = [
            DAQ_pb2.SettingList(setting=[DAQ_pb2.Setting(device=f"{d}.SETTING", value={"scalar": float(i)})])
            for i, d in enumerate(DEVICES)
        ]
    elif load.drfs == 1:
        requests = [DAQ_pb2.ReadingList(drf=[f"{d}@I"]) for d in DEVICES]
    else:
        requests = [DAQ_pb2.ReadingList(drf=[f"{d}@I" for d in DEVICES[: load.drfs]])]
    latencies: list[float] = []
    totals = {"replies": 0, "errors": 0, "bad": 0}
    cpu: list[float] = []  # this process's CPU time at t_start and t_end
    for t in (t_start, t_end):
        asyncio.get_running_loop().call_later(max(0.0, t - time.time()), lambda: cpu.append(time.process_time()))

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await channel.channel_ready()
        stub = DAQ_pb2_grpc.DAQStub(channel)

        async def call(request) -> int:
            if load.write:
                reply = await stub.Set(request)
                return sum(1 for s in reply.status if s.status_code == 0)
            n = 0
            async for reply in stub.Read(request):
                n += reply.WhichOneof("value") == "readings"
            return n

        async def caller(index: int) -> None:
            while (t0 := time.time()) < t_end:
                try:
                    n = await call(requests[index % len(requests)])
                except grpc.aio.AioRpcError:
                    totals["errors"] += 1
                    await asyncio.sleep(0.01)
                    continue
                index += load.concurrency  # each coroutine walks its own devices
                t1 = time.time()
                if t_start <= t1 < t_end:
                    latencies.append(t1 - t0)
                    totals["replies"] += n
                    totals["bad"] += load.drfs - n

        await asyncio.gather(*(caller(first + k) for k in range(count)))
    return {"latencies": latencies, "cpu": cpu[1] - cpu[0] if len(cpu) == 2 else 0.0, **totals}


_loop: asyncio.AbstractEventLoop | None = None


def run_on_loop(coro):
    """Run `coro` on this process's one event loop (gRPC aio stays bound to the loop it first used)."""
    global _loop
    if _loop is None:
        _loop = asyncio.new_event_loop()
        asyncio.set_event_loop(_loop)
    return _loop.run_until_complete(coro)


def generate(port: int, load: Load, first: int, count: int, t_start: float, t_end: float) -> dict:
    return run_on_loop(_generate(port, load, first, count, t_start, t_end))


def _spawned(delay: float) -> None:
    import grpc  # noqa: F401 - imported once per load-generator process

    time.sleep(delay)


class LoadGenerator:
    """K spawned processes sharing the coroutines of a load between them."""

    def __init__(self, procs: int):
        self.procs = procs
        context = multiprocessing.get_context("spawn")
        self.executor = concurrent.futures.ProcessPoolExecutor(procs, mp_context=context)
        list(self.executor.map(_spawned, [0.3] * procs))  # start all K processes now

    def map(self, fn, calls: list[tuple], t_end: float) -> list:
        """fn(*args) for each args tuple, one tuple per process; wait until all return."""
        futures = [self.executor.submit(fn, *args) for args in calls]
        return [f.result(timeout=t_end - time.time() + 60) for f in futures]

    def run(self, port: int, load: Load, t_start: float, t_end: float) -> dict:
        shares = [load.concurrency // self.procs + (i < load.concurrency % self.procs) for i in range(self.procs)]
        firsts = [sum(shares[:i]) for i in range(self.procs)]
        calls = [(port, load, first, n, t_start, t_end) for first, n in zip(firsts, shares, strict=True) if n]
        parts = self.map(generate, calls, t_end)
        return {
            "latencies": sorted(x for p in parts for x in p["latencies"]),
            **{k: sum(p[k] for p in parts) for k in ("replies", "errors", "bad", "cpu")},
        }

    def close(self) -> None:
        processes = list((self.executor._processes or {}).values())
        self.executor.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.join(5)
            if process.is_alive():
                process.kill()


# -- measuring -------------------------------------------------------------------------------


def cpu_seconds(process: psutil.Process) -> tuple[float, float]:
    """(front CPU seconds, CPU seconds of its child processes: the workers)."""
    try:
        t = process.cpu_times()
        children = 0.0
        for child in process.children(recursive=True):
            try:
                c = child.cpu_times()
                children += c.user + c.system
            except psutil.Error:
                pass
        return t.user + t.system, children
    except psutil.Error:
        return 0.0, 0.0


def measure(generator: LoadGenerator, server: ServerProcess, load: Load, warmup: float, duration: float) -> dict:
    t_start = time.time() + 0.3 + warmup  # 0.3 s for the clients to connect
    t_end = t_start + duration
    front = psutil.Process(server.pid)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(generator.run, server.port, load, t_start, t_end)
        time.sleep(max(0.0, t_start - time.time()))
        cpu0 = cpu_seconds(front)
        time.sleep(max(0.0, t_end - time.time()))
        cpu1 = cpu_seconds(front)
        out = future.result()
    lat = out["latencies"]
    calls = len(lat)
    return {
        "calls_s": calls / duration,
        "readings_s": out["replies"] / duration,
        "p50": lat[(calls - 1) // 2] * 1e3 if lat else float("nan"),
        "p99": lat[int((calls - 1) * 0.99)] * 1e3 if lat else float("nan"),
        "front_us": (cpu1[0] - cpu0[0]) / calls * 1e6 if calls else float("nan"),
        "workers_us": (cpu1[1] - cpu0[1]) / calls * 1e6 if calls else float("nan"),
        "client_us": out["cpu"] / calls * 1e6 if calls else float("nan"),
        "errors": out["errors"] + out["bad"],
    }


def _is_async(spec: str) -> bool:
    from pacsys.aio import AsyncBackend
    from pacsys.backends.spec import build_backend

    return isinstance(build_backend(spec), AsyncBackend)


def _server_args(mode: str, backend: str) -> tuple[str, str, int]:
    if mode.startswith("pool"):
        return "pool", backend, int(mode[4:])
    return mode, backend, 0


def print_table(results: dict[tuple[str, str], dict], loads: list[Load], modes: list[str]) -> None:
    header = (
        f"{'load':<9} {'mode':<7} {'calls/s':>9} {'readings/s':>11} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'front':>6} {'workers':>7} {'client':>6} {'/null':>6} {'/inproc':>8} {'errors':>6}"
    )
    print()
    print(header)
    print("-" * len(header))
    for load in loads:
        null = results.get((load.name, "null"), {}).get("calls_s")
        inproc = results.get((load.name, "inproc"), {}).get("calls_s")
        for mode in modes:
            r = results.get((load.name, mode))
            if r is None:
                continue
            vs_null = f"{r['calls_s'] / null:.2f}" if null else "-"
            vs_inproc = f"{r['calls_s'] / inproc:.2f}" if inproc else "-"
            print(
                f"{load.name:<9} {mode:<7} {r['calls_s']:>9.0f} {r['readings_s']:>11.0f} {r['p50']:>8.2f} "
                f"{r['p99']:>8.2f} {r['front_us']:>6.0f} {r['workers_us']:>7.0f} {r['client_us']:>6.0f} {vs_null:>6} {vs_inproc:>8} "
                f"{r['errors']:>6}"
            )
    print(
        "\nreadings/s of 'write': accepted settings. front, workers, client: CPU microseconds per call of the "
        "server process, its worker processes, the load generators. /null, /inproc: calls/s ratios. "
        "errors: failed calls plus replies that were not data."
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="0.5 s warm-up and 1.5 s per run")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--only", action="append", choices=list(LOADS), help="run only this load (repeatable)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--client-procs", type=int, default=1, help="load-generator processes (default 1)")
    args = parser.parse_args(argv)
    if args.quick:
        args.warmup, args.duration = 0.5, 1.5
    try:
        modes = parse_modes(args.modes, ("null", "inproc", "to_thread"))
    except ValueError as exc:
        parser.error(str(exc))
    loads = [LOADS[name] for name in (args.only or LOADS)]
    backends = list(dict.fromkeys(load.backend for load in loads))
    async_backends = {b for b in backends if _is_async(b)}

    print(
        f"cores={psutil.cpu_count()} loadavg={os.getloadavg()[0]:.2f} client_procs={args.client_procs} "
        f"warmup={args.warmup}s duration={args.duration}s"
    )
    results: dict[tuple[str, str], dict] = {}
    generator = LoadGenerator(args.client_procs)
    try:
        for mode in modes:
            for backend in backends:
                if mode == "to_thread" and backend in async_backends:
                    continue  # an async backend is awaited directly: to_thread == inproc
                with ServerProcess.serving(*_server_args(mode, backend)) as server:
                    for load in (x for x in loads if x.backend == backend):
                        r = measure(generator, server, load, args.warmup, args.duration)
                        results[(load.name, mode)] = r
                        print(f"  {load.name:<9} {mode:<7} {r['calls_s']:>8.0f} calls/s", flush=True)
    finally:
        generator.close()
    print_table(results, loads, modes)
    print(f"loadavg at the end: {os.getloadavg()[0]:.2f} (other processes on this machine skew the numbers)")
    if "to_thread" in modes and async_backends:
        print("to_thread rows are absent for async backends (memory): awaited directly, to_thread == inproc.")


if __name__ == "__main__":
    main()
