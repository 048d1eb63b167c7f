"""Capacity benchmark (issue 21): the front's cost per call and per reading, measured with cheap clients.

Run from the repository root: `python -m benchmarks.bench_capacity [--servers null,release,ours,...]
[--loads read1,read100,streams,overload] [--baseline REV_OR_DIR] [--repeat N] [--quick]`.
It prints what it measured; it never judges it. A default run takes about three minutes.

Why: a Python gRPC client costs as much CPU per call as the server it measures, so on a
2-core machine it hides the server's own cost. Here the clients cost much less than the servers:

read1, read100  one-shot Reads of 1 DRF (`Z:SIM000@I`) and of 100 DRFs (`Z:SIM000..099@I`) by
         h2load (Debian's nghttp2-client; installed with apt-get when missing and possible,
         else these loads are skipped and the reason printed): `--h2-connections` connections
         x `--h2-streams` calls in flight on each (4 x 16), one request file replayed: `--warmup`
         seconds, then as many calls as that rate makes in `--duration` seconds, counted.
         h2load counts a call that ends with a gRPC error (HTTP 200, grpc-status != 0 in the
         trailers) as succeeded, so every reply is also checked by its bytes: a correct reply
         carries the DATA bytes a probe call through grpcio measured (20 probes, their replies
         decoded and checked first), an error carries none. "ok" is the DATA bytes received
         over (calls done x bytes per correct call): about 1.00 when every call was answered
         with readings (varints make it vary by about 1%), 0 when every call failed. The rates
         and ratios count only calls with replies (done x min(ok, 1)).
streams  `--streams` streams (1,000) of `Z:SIM{i mod 100}@p,20` (50 Hz) read by the frame-counting
         HTTP/2 reader (`benchmarks.h2_reader`, a few microseconds per reply) from one client
         process, 100 streams per connection, each connection from its own loopback address
         (127.0.0.2, 127.0.0.3, ...: each one client as far as per-client limits go).
         Offered 50,000 readings/s: about what the null server delivers on 2 quiet cores, more
         than it delivers while other work shares them.
overload Twice as many streams (`--overload-streams`, 2,000: 100,000 readings/s offered, about
         twice what the null server delivers on 2 quiet cores), the same for every server so
         that they compare, to see who starves: per stream the
         longest time inside the window without a reading, and how many streams went more than
         1 s without one while others were served, and how many never got a first reading.
         Not run for the release (its streams starve under `streams` already; keeps the run short).

Servers, each a subprocess started and ended here, one after another:
    null     `benchmarks.null_server`: a bare grpc.aio DAQ service answering from memory (the ceiling)
    release  the pacsys 0.3.0 release's SupervisedServer over its FakeBackend, run by
             tests/.release-venv's interpreter (`benchmarks/release_server.py`; skipped with the
             reason when that venv cannot be made)
    ours     `pacsys-supervisor --workers 2 --backend sim` with its default settings
    ours0    the same with `--workers 0` (the backend in the front process)
    base     `pacsys-supervisor --workers 2 --backend sim` of another tree: `--baseline REV` makes a
             temporary git worktree of REV (removed afterwards), `--baseline DIR` uses a checkout;
             run with the tree on PYTHONPATH (present only with --baseline)
    ours:N   with `--instances 1,2,4`: `ours` as N pacsys-supervisor instances sharing one port
             (`--reuse-port`; the kernel gives each new connection to one of them), each with
             `--instance-workers` workers (1). Their CPU is added up; "fronts' CPU shares" says
             how evenly the connections fell. The kernel spreads connections, not calls: give
             the clients many connections (`--h2-connections 32 --h2-streams 2`,
             `--streams-per-connection 25`), the same for every server of the run.

`--profile DIR` also records each server's profile during each counted window with py-spy
(DIR/SERVER-LOAD.txt; summarize with `python -m benchmarks.profile_summary`); the sampling
slows the server, so the figures of such a run are not the ones to compare.

Printed per load and server: calls or replies per second, the ratio to the null server of the
same round, the CPU microseconds per call and per reply of the front process and, separately,
of its child processes (the workers), and of the client; the load average before each server.
The machine's other work moves every figure: compare ratios within one round, and use
`--repeat` to see how much they move between rounds (every other round runs the servers in
the reverse order). The CPU per call moves much less than the rates when other work takes
the cores (it counts only the time the server ran), so it is the figure to compare between
runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import resource
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from benchmarks.bench_load import LoadGenerator, cpu_seconds, run_on_loop
from benchmarks.h2_reader import count_streams
from benchmarks.pair import free_port
from benchmarks.serve import ROOT, ServerProcess

RELEASE_SERVER = ROOT / "benchmarks" / "release_server.py"
READ_PATH = "/services.daq.DAQ/Read"
SERVERS = ["null", "release", "ours", "ours0", "base"]
LOADS = ["read1", "read100", "streams", "overload"]
ONE_SHOT = {"read1": ["Z:SIM000@I"], "read100": [f"Z:SIM{i:03d}@I" for i in range(100)]}
STREAM_HZ = 50
STREAMS_PER_CONNECTION = 100
STARVED_S = 1.0
# Seconds between opening one connection's 100 streams and the next's: gRPC's C core cancels
# calls at random once more than 1,000 wait to be taken by the server (its
# grpc.server.max_pending_requests), and a saturated asyncio server takes them slowly.
OPEN_STAGGER_S = 0.05


# -- servers ---------------------------------------------------------------------------------


@dataclass
class ServerSpec:
    name: str
    argv: list[str]
    cwd: Path = ROOT
    env: dict[str, str] = field(default_factory=dict)  # added to this process's environment
    note: str = ""
    instances: int = 1  # pacsys-supervisor processes sharing one port (--reuse-port)


class ServerGroup:
    """A server's processes: one, or `spec.instances` pacsys-supervisor instances on one port
    (`--reuse-port`, the kernel spreading the clients' connections over them). `port`; `pid`
    (the first one's, for a profile); `cpu()` adds up all of them."""

    def __init__(self, spec: ServerSpec, directory: Path):
        self.spec = spec
        self.name = spec.name
        self.directory = directory
        self.processes: list[ServerProcess] = []
        self.port = 0

    def __enter__(self) -> ServerGroup:
        argv = self.spec.argv
        if self.spec.instances > 1:
            at = argv.index("--port") + 1
            argv = [*argv[:at], str(free_port()), *argv[at + 1 :], "--reuse-port"]
        try:
            for k in range(self.spec.instances):
                name = self.name if self.spec.instances == 1 else f"{self.name}-{k}"
                process = ServerProcess(argv, self.spec.cwd, self.spec.env, self.directory / f"{name}.log", name)
                self.processes.append(process.__enter__())
        except BaseException:
            self.__exit__()
            raise
        ports = {p.port for p in self.processes}
        if len(ports) != 1:
            self.__exit__()
            raise RuntimeError(f"{self.name}: its instances listen on {sorted(ports)}, not on one port")
        self.port = ports.pop()
        return self

    @property
    def pid(self) -> int:
        return self.processes[0].pid

    def cpu(self) -> tuple[float, float]:
        """(CPU seconds of the front processes, of their child processes: the workers)."""
        times = [cpu_seconds(psutil.Process(p.pid)) for p in self.processes]
        return sum(t[0] for t in times), sum(t[1] for t in times)

    def fronts_cpu(self) -> list[float]:
        return [cpu_seconds(psutil.Process(p.pid))[0] for p in self.processes]

    def __exit__(self, *exc_info) -> None:
        for process in self.processes:
            process.stop()


def supervisor_argv(workers: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pacsys.supervised.cli",
        "--workers",
        str(workers),
        "--backend",
        "sim",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
    ]


def release_python() -> tuple[Path | None, str]:
    """The release venv's interpreter (made when missing), or None and why not."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from release_venv import _python, build
    finally:
        sys.path.pop(0)
    why = build()
    return (None, why) if why else (_python(), "")


class Baseline:
    """The tree `--baseline` names: a checkout directory, or a git revision put in a temporary worktree."""

    def __init__(self, what: str):
        self.what = what
        self.tree: Path | None = None
        self._temporary: Path | None = None

    def __enter__(self) -> Baseline:
        if Path(self.what).is_dir():
            self.tree = Path(self.what).resolve()
        else:
            self._temporary = Path(tempfile.mkdtemp(prefix="bench-baseline-"))
            tree = self._temporary / "tree"
            added = subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), self.what],
                capture_output=True,
                text=True,
            )
            if added.returncode != 0:
                self.__exit__()
                raise RuntimeError(f"--baseline {self.what}: git worktree add failed: {added.stderr.strip()[-300:]}")
            self.tree = tree
        found = subprocess.run(
            [sys.executable, "-c", "import pacsys, workers; print(pacsys.__file__)"],
            cwd=self.tree,
            env={**os.environ, "PYTHONPATH": str(self.tree)},
            capture_output=True,
            text=True,
        )
        if not found.stdout.strip().startswith(str(self.tree)):
            self.__exit__()
            raise RuntimeError(f"--baseline {self.what}: its pacsys does not import ({found.stderr.strip()[-300:]})")
        return self

    def label(self) -> str:
        assert self.tree is not None
        head = subprocess.run(
            ["git", "-C", str(self.tree), "log", "-1", "--format=%h %cs"], capture_output=True, text=True
        ).stdout.strip()
        return head or str(self.tree)

    def __exit__(self, *exc_info) -> None:
        if self._temporary is not None:
            if (self._temporary / "tree").exists():
                subprocess.run(
                    ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(self._temporary / "tree")],
                    capture_output=True,
                )
            shutil.rmtree(self._temporary, ignore_errors=True)
            self._temporary = None


def server_specs(
    names: list[str], baseline: Baseline | None, instances: list[int] | None = None, instance_workers: int = 1
) -> tuple[list[ServerSpec], list[str]]:
    """The servers to run, and why any asked for cannot run; with `instances`, `ours` is run as
    each count of instances on one port, each with `instance_workers` workers."""
    specs: list[ServerSpec] = []
    skipped: list[str] = []
    for name in names:
        if name == "null":
            specs.append(ServerSpec(name, [sys.executable, "-m", "benchmarks.null_server"]))
        elif name == "release":
            python, why = release_python()
            if python is None:
                skipped.append(f"release: {why}")
            else:
                specs.append(ServerSpec(name, [str(python), "-I", str(RELEASE_SERVER)], note="pacsys 0.3.0"))
        elif name == "ours" and instances:
            for n in instances:
                note = (
                    f"{n} instance{'s' if n > 1 else ''} on one port (--reuse-port), --workers {instance_workers} each"
                )
                specs.append(ServerSpec(f"ours:{n}", supervisor_argv(instance_workers), note=note, instances=n))
        elif name == "ours":
            specs.append(ServerSpec(name, supervisor_argv(2), note="--workers 2"))
        elif name == "ours0":
            specs.append(ServerSpec(name, supervisor_argv(0), note="--workers 0"))
        elif name == "base":
            if baseline is None or baseline.tree is None:
                skipped.append("base: no --baseline given")
            else:
                env = {"PYTHONPATH": str(baseline.tree)}
                note = f"--workers 2, {baseline.label()}"
                specs.append(ServerSpec(name, supervisor_argv(2), cwd=baseline.tree, env=env, note=note))
    return specs, skipped


# -- one-shot calls by h2load ----------------------------------------------------------------


def ensure_h2load() -> str | None:
    """None when h2load can run, else why not (installed with apt-get when it can be)."""
    if shutil.which("h2load"):
        return None
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        return "h2load is not installed and cannot be here (needs apt-get as root: apt-get install nghttp2-client)"
    done = subprocess.run(
        ["apt-get", "install", "-y", "-q", "nghttp2-client"],
        capture_output=True,
        text=True,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        timeout=600,
    )
    if done.returncode != 0 or shutil.which("h2load") is None:
        tail = " / ".join((done.stderr or done.stdout).strip().splitlines()[-2:])
        return f"h2load is not installed and apt-get install nghttp2-client failed: {tail}"
    return None


def request_file(drfs: list[str], directory: Path) -> Path:
    """The gRPC request message as h2load posts it: 5-byte prefix (uncompressed, length) + ReadingList."""
    from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2

    body = DAQ_pb2.ReadingList(drf=drfs).SerializeToString()
    path = directory / f"read{len(drfs)}.bin"
    path.write_bytes(b"\x00" + struct.pack(">I", len(body)) + body)
    return path


def probe(port: int, drfs: list[str], calls: int = 20) -> float:
    """Mean DATA bytes of a correct reply to `drfs` (every reply checked); RuntimeError if any is wrong."""
    import grpc

    from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2

    sizes = []
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        read = channel.unary_stream(READ_PATH, request_serializer=DAQ_pb2.ReadingList.SerializeToString)
        for _ in range(calls):
            try:
                replies = list(read(DAQ_pb2.ReadingList(drf=drfs), timeout=30))
            except grpc.RpcError as exc:
                raise RuntimeError(f"probe call failed: {exc.code().name} {exc.details()}") from None
            indices = set()
            for raw in replies:
                reply = DAQ_pb2.ReadingReply.FromString(raw)
                if reply.WhichOneof("value") != "readings" or not all(
                    r.data.WhichOneof("value") for r in reply.readings.reading
                ):
                    raise RuntimeError(f"probe reply is not a reading: {str(reply)[:200]!r}")
                indices.add(reply.index)
            if indices != set(range(len(drfs))):
                raise RuntimeError(f"probe got replies for {len(indices)} of {len(drfs)} DRFs")
            sizes.append(sum(5 + len(raw) for raw in replies))
    return sum(sizes) / len(sizes)


H2LOAD_REQUESTS = re.compile(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed")
H2LOAD_DATA = re.compile(r"traffic: .*, \S+ \((\d+)\) data")


def h2load(port: int, data: Path, args: argparse.Namespace, seconds: float = 0.0, calls: int = 0) -> dict:
    """Run h2load for `seconds`, or until `calls` calls are done; the calls done, failed, DATA bytes, seconds."""
    argv = ["h2load", "-t", "1", "-c", str(args.h2_connections), "-m", str(args.h2_streams)]
    argv += ["-n", str(calls)] if calls else ["-D", f"{max(1, round(seconds * 1000))}ms"]
    argv += ["-d", str(data), "-H", "content-type: application/grpc", "-H", "te: trailers"]
    argv += [f"http://127.0.0.1:{port}{READ_PATH}"]
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60 + 10 * (seconds or args.duration))
    elapsed = time.monotonic() - started
    requests = H2LOAD_REQUESTS.search(done.stdout)
    traffic = H2LOAD_DATA.search(done.stdout)
    if done.returncode != 0 or requests is None or traffic is None:
        raise RuntimeError(f"h2load failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-300:]}")
    return {
        "done": int(requests.group(3)),
        "failed": int(requests.group(5)),
        "data": int(traffic.group(1)),
        "s": elapsed,
    }


def answered_share(run: dict, expected: float) -> float:
    """DATA bytes h2load received over those of `done` correct replies of `expected` bytes each.

    About 1 when every call was answered with its readings, 0 when every call ended with a gRPC
    error (trailers only, no DATA): h2load itself counts both as succeeded (HTTP status 200).
    """
    return run["data"] / (run["done"] * expected) if run["done"] else 0.0


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def one_shot(server: ServerGroup, load: str, directory: Path, args: argparse.Namespace) -> dict:
    """Warm-up for `--warmup` s, then a counted run of as many calls as the warm-up did in `--duration` s.

    The counted run is a number of calls, not a time, so that no call is in flight when it ends: the
    DATA bytes then belong to the calls done, and "ok" is exact up to the varints' sizes.
    """
    drfs = ONE_SHOT[load]
    expected = probe(server.port, drfs)
    data = request_file(drfs, directory)
    warm = h2load(server.port, data, args, seconds=args.warmup)
    calls = max(10 * args.h2_connections * args.h2_streams, round(warm["done"] / args.warmup * args.duration))
    with profiled(server, load, args):
        cpu0, client0, fronts0 = server.cpu(), children_cpu(), server.fronts_cpu()
        run = h2load(server.port, data, args, calls=calls)
        cpu1, client1, fronts1 = server.cpu(), children_cpu(), server.fronts_cpu()
    ok = answered_share(run, expected)
    good = run["done"] * min(ok, 1.0)
    per_call = 1e6 / good if good else float("nan")
    return {
        "rate": good / run["s"],
        "ok": ok,
        "failed": run["failed"],
        "front_call": (cpu1[0] - cpu0[0]) * per_call,
        "workers_call": (cpu1[1] - cpu0[1]) * per_call,
        "client_call": (client1 - client0) * per_call,
        "replies": len(drfs),
        "seconds": run["s"],
        "shares": _shares(fronts0, fronts1),
    }


def _shares(before: list[float], after: list[float]) -> list[float]:
    """Each front's share of the fronts' CPU between two readings: how evenly the kernel spread the load."""
    used = [b - a for a, b in zip(before, after, strict=True)]
    total = sum(used)
    return [u / total for u in used] if total > 0 else []


# -- streams by the frame-counting reader -----------------------------------------------------


def read_streams(
    port: int, requests: list[bytes], t_start: float, t_end: float, per_connection: int = STREAMS_PER_CONNECTION
) -> dict:
    """In the client process: the streams over connections of `per_connection` streams, each from its own address."""

    async def connection(k: int, share: list[bytes]) -> dict:
        await asyncio.sleep(k * OPEN_STAGGER_S)
        return await count_streams(port, READ_PATH, share, t_start, t_end, local_host=f"127.0.0.{2 + k}")

    async def all_connections() -> list[dict]:
        shares = [requests[i : i + per_connection] for i in range(0, len(requests), per_connection)]
        return await asyncio.gather(*(connection(k, share) for k, share in enumerate(shares)))

    parts = run_on_loop(all_connections())
    firsts = [p["last_first"] for p in parts]
    return {
        "counts": [n for p in parts for n in p["counts"]],
        "gaps": [g for p in parts for g in p["gaps"]],
        "served_gaps": [g for p in parts for g in p["served_gaps"]],
        "waits": [None if f is None else f - p["opened"] for p in parts for f in p["firsts"]],
        "ended": [e for p in parts for e in p["ended"]],
        "firsts": [f for p in parts for f in p["firsts"]],
        "errors": sum(p["errors"] for p in parts),
        "cpu": parts[0]["cpu"],  # the process's CPU: every connection measured the same process
        "open_s": None if None in firsts else max(firsts) - min(p["opened"] for p in parts),  # type: ignore[type-var]
    }


def streams(server: ServerGroup, load: str, count: int, generator: LoadGenerator, args: argparse.Namespace) -> dict:
    from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2

    period_ms = 1000 // STREAM_HZ
    requests = [
        DAQ_pb2.ReadingList(drf=[f"Z:SIM{i % 100:03d}@p,{period_ms}"]).SerializeToString() for i in range(count)
    ]
    t_start = time.time() + 0.5 + args.stream_warmup
    t_end = t_start + args.duration
    result: list[dict] = []
    work = [(server.port, requests, t_start, t_end, args.streams_per_connection)]
    reader = threading.Thread(target=lambda: result.extend(generator.map(read_streams, work, t_end)))
    reader.start()
    time.sleep(max(0.0, t_start - time.time()))
    with profiled(server, load, args):
        cpu0, fronts0 = server.cpu(), server.fronts_cpu()
        time.sleep(max(0.0, t_end - time.time()))
        cpu1, fronts1 = server.cpu(), server.fronts_cpu()
    reader.join()
    if not result:
        raise RuntimeError("the stream reader process returned nothing")
    r = result[0]
    delivered = sum(r["counts"])
    per_reply = 1e6 / delivered if delivered else float("nan")
    expected = STREAM_HZ * args.duration
    return {
        "streams": count,
        "rate": delivered / args.duration,
        "offered": count * STREAM_HZ,
        "front_call": (cpu1[0] - cpu0[0]) * per_reply,
        "workers_call": (cpu1[1] - cpu0[1]) * per_reply,
        "client_call": r["cpu"] * per_reply,
        "worst": min(r["counts"]) / expected,
        # Fairness among the streams served for the whole window (taken before it began).
        "served_shares": sorted(
            n / expected
            for n, f, e in zip(r["counts"], r["firsts"], r["ended"], strict=True)
            if f is not None and f < t_start and not e
        ),
        # Starvation among the streams still open (one that ended is an error, counted apart):
        # those never served at all (the server had not taken the call, or never sent on it),
        # those whose first reading came more than STARVED_S after they were opened (taken late),
        # and those that, once served, went more than STARVED_S without a reading in the window.
        "longest_gap": max((g for g, e in zip(r["gaps"], r["ended"], strict=True) if not e), default=float("nan")),
        "unserved": sum(f is None and not e for f, e in zip(r["firsts"], r["ended"], strict=True)),
        "late": sum(w is not None and w > STARVED_S for w in r["waits"]),
        "starved": sum(
            g is not None and g > STARVED_S and not e for g, e in zip(r["served_gaps"], r["ended"], strict=True)
        ),
        "errors": r["errors"],
        "open_s": r["open_s"],
        "replies": 1,
        "shares": _shares(fronts0, fronts1),
    }


# -- profiles ----------------------------------------------------------------------------------


@contextmanager
def profiled(server: ServerGroup, load: str, args: argparse.Namespace) -> Iterator[None]:
    """With `--profile DIR`: py-spy samples the server process while the block runs (the counted window).

    Writes DIR/SERVER-LOAD.txt in py-spy's raw (collapsed stacks) format, native frames and
    threads included, idle threads not; `python -m benchmarks.profile_summary` reads it. The
    sampling pauses the server 100 times a second: the figures of a profiled run are lower.
    """
    if not args.profile:
        yield
        return
    path = Path(args.profile) / f"{server.name}-{load}.txt"
    argv = ["py-spy", "record", "--pid", str(server.pid), "--rate", "100", "--native", "--threads", "--function"]
    spy = subprocess.Popen(
        [*argv, "--format", "raw", "--output", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)  # py-spy writes its file when interrupted
        try:
            _, err = spy.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            spy.kill()
            _, err = spy.communicate()
        if not path.exists():
            print(f"  no profile of {server.name} {load}: {err.decode(errors='replace').strip()[-300:]}")


# -- the run ---------------------------------------------------------------------------------


def loadavg() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def run_server(spec: ServerSpec, loads: list[str], directory: Path, generator: LoadGenerator, args) -> dict:
    results: dict[str, dict] = {}
    with ServerGroup(spec, directory) as server:
        time.sleep(args.settle)  # workers ready, startup work done
        for load in loads:
            try:
                if load in ONE_SHOT:
                    if args.no_h2load:
                        continue
                    results[load] = one_shot(server, load, directory, args)
                elif load == "streams":
                    results[load] = streams(server, load, args.streams, generator, args)
                elif load == "overload" and spec.name != "release":
                    count = args.overload_streams or 2 * args.streams
                    results[load] = streams(server, load, count, generator, args)
            except RuntimeError as exc:
                results[load] = {"error": str(exc)}
            _progress(spec.name, load, results.get(load))
    return results


def _progress(server: str, load: str, r: dict | None) -> None:
    if r is None:
        return
    if "error" in r:
        print(f"  {server:<8} {load:<9} ERROR {r['error']}", flush=True)
    else:
        print(f"  {server:<8} {load:<9} {r['rate']:>9,.0f}/s (loadavg {loadavg()})", flush=True)


def print_round(round_no: int, results: dict[str, dict], specs: list[ServerSpec], loads: list[str], loads_at) -> None:
    print(
        f"\nround {round_no}: loadavg before each server: " + ", ".join(f"{s.name} {loads_at[s.name]}" for s in specs)
    )
    header = (
        f"{'load':<9} {'server':<8} {'rate/s':>9} {'/null':>6} {'front us/call':>13} {'us/reply':>8} "
        f"{'workers us/call':>15} {'client us/call':>14}  checks"
    )
    print(header)
    print("-" * len(header))
    for load in loads:
        null = results.get("null", {}).get(load, {}).get("rate")
        for spec in specs:
            r = results.get(spec.name, {}).get(load)
            if r is None:
                continue
            if "error" in r:
                print(f"{load:<9} {spec.name:<8} ERROR {r['error']}")
                continue
            ratio = f"{r['rate'] / null:.2f}" if null else "-"
            if load in ONE_SHOT:
                checks = f"ok {r['ok']:.2f} h2load-failed {r['failed']}"
            else:
                opened = "never" if r["open_s"] is None else f"{r['open_s']:.1f}s"
                shares = r["served_shares"]
                served = (
                    f"{len(shares)} served all window, shares {shares[0]:.2f}/{shares[len(shares) // 2]:.2f}/{shares[-1]:.2f}"
                    if shares
                    else "none served all window"
                )
                checks = (
                    f"{r['streams']} streams offer {r['offered']:,}/s; worst {r['worst']:.2f}; {served}; "
                    f"longest gap {r['longest_gap']:.2f}s; starved>1s {r['starved']}; first>1s {r['late']}; "
                    f"never served {r['unserved']}; "
                    f"open {opened}; ended {r['errors']}"
                )
            if len(r.get("shares", [])) > 1:
                checks += "; fronts' CPU shares " + "/".join(f"{x:.2f}" for x in r["shares"])
            print(
                f"{load:<9} {spec.name:<8} {r['rate']:>9,.0f} {ratio:>6} {r['front_call']:>13.0f} "
                f"{r['front_call'] / r['replies']:>8.1f} {r['workers_call']:>15.0f} {r['client_call']:>14.0f}  {checks}"
            )


def print_spread(rounds: list[dict[str, dict]], specs: list[ServerSpec], loads: list[str]) -> None:
    """Each server's rate and ratio to the null server in every round, and their medians."""
    print(f"\nover {len(rounds)} rounds: rate/s and /null of each round (median)")
    for load in loads:
        for spec in specs:
            rates, ratios = [], []
            for results in rounds:
                r = results.get(spec.name, {}).get(load, {})
                null = results.get("null", {}).get(load, {}).get("rate")
                if "rate" in r:
                    rates.append(r["rate"])
                    if null:
                        ratios.append(r["rate"] / null)
            if rates:
                print(
                    f"{load:<9} {spec.name:<8} {' '.join(f'{x:,.0f}' for x in rates)} ({statistics.median(rates):,.0f})"
                    + (
                        f"   /null {' '.join(f'{x:.2f}' for x in ratios)} ({statistics.median(ratios):.2f})"
                        if ratios
                        else ""
                    )
                )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--servers",
        help="comma-separated, of " + ",".join(SERVERS) + " (default: all; base only with --baseline)",
    )
    parser.add_argument("--loads", default=",".join(LOADS), help="comma-separated: " + ",".join(LOADS))
    parser.add_argument(
        "--baseline", metavar="REV_OR_DIR", help="the 'base' server's tree: a git revision or a checkout"
    )
    parser.add_argument("--repeat", type=int, default=1, help="rounds over all servers (default 1)")
    parser.add_argument(
        "--quick", action="store_true", help="shorter windows: 0.5 s warm-up, 2 s counted, 3 s stream warm-up"
    )
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of h2load before each counted one-shot run")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds counted per load (default 4)")
    parser.add_argument(
        "--stream-warmup",
        type=float,
        default=6.0,
        help="seconds between opening the streams and counting (default 6: a saturated front accepts new streams slowly)",
    )
    parser.add_argument("--settle", type=float, default=1.0, help="seconds between a server's start and its first load")
    parser.add_argument("--streams", type=int, default=1000, help="streams of the 'streams' load (default 1000)")
    parser.add_argument(
        "--overload-streams", type=int, default=0, help="streams of 'overload' (default: twice --streams)"
    )
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="record each server's profile during each counted window with py-spy (pip install py-spy) into DIR",
    )
    parser.add_argument(
        "--instances",
        help="comma-separated counts (e.g. 1,2,4): run 'ours' as that many instances sharing one port "
        "(--reuse-port), each with --instance-workers workers",
    )
    parser.add_argument("--instance-workers", type=int, default=1, help="workers per instance with --instances")
    parser.add_argument(
        "--streams-per-connection",
        type=int,
        default=STREAMS_PER_CONNECTION,
        help=f"streams on each of the frame reader's connections (default {STREAMS_PER_CONNECTION})",
    )
    parser.add_argument("--h2-connections", type=int, default=4, help="h2load connections (default 4)")
    parser.add_argument("--h2-streams", type=int, default=16, help="h2load calls in flight per connection (default 16)")
    args = parser.parse_args(argv)
    if args.quick:
        args.warmup, args.duration, args.stream_warmup = 0.5, 2.0, 3.0
    default = [n for n in SERVERS if n != "base" or args.baseline]
    names = [n.strip() for n in args.servers.split(",") if n.strip()] if args.servers else default
    loads = [n.strip() for n in args.loads.split(",") if n.strip()]
    for bad in [n for n in names if n not in SERVERS] + [n for n in loads if n not in LOADS]:
        parser.error(f"unknown server or load {bad!r}")
    if args.profile:
        if shutil.which("py-spy") is None:
            parser.error("--profile needs py-spy (pip install py-spy)")
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    args.no_h2load = None
    if any(load in ONE_SHOT for load in loads):
        args.no_h2load = ensure_h2load()

    print(
        f"cores={psutil.cpu_count()} loadavg={loadavg()} duration={args.duration}s warmup={args.warmup}s "
        f"stream_warmup={args.stream_warmup}s h2load={args.h2_connections}x{args.h2_streams}"
    )
    if args.no_h2load:
        print(f"one-shot loads skipped: {args.no_h2load}")
    with ExitStack() as stack:
        try:
            baseline = stack.enter_context(Baseline(args.baseline)) if args.baseline and "base" in names else None
        except RuntimeError as exc:
            sys.exit(str(exc))
        instances = [int(n) for n in args.instances.split(",")] if args.instances else None
        specs, skipped = server_specs(names, baseline, instances, args.instance_workers)
        for why in skipped:
            print(f"skipped {why}")
        for spec in specs:
            print(f"server {spec.name}: {spec.note or ' '.join(spec.argv[1:])}")
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-capacity-")))
        generator = LoadGenerator(1)
        stack.callback(generator.close)
        rounds: list[dict[str, dict]] = []
        for round_no in range(1, args.repeat + 1):
            results: dict[str, dict] = {}
            rounds.append(results)
            loads_at: dict[str, str] = {}
            # Every other round runs the servers in the reverse order: the machine's other work
            # drifts, and a server always measured last would always meet its drift.
            for spec in specs if round_no % 2 else specs[::-1]:
                loads_at[spec.name] = loadavg()
                try:
                    results[spec.name] = run_server(spec, loads, directory, generator, args)
                except RuntimeError as exc:
                    print(f"  {spec.name}: {exc}", flush=True)
            print_round(round_no, results, specs, loads, loads_at)
        if len(rounds) > 1:
            print_spread(rounds, specs, loads)
    print(
        "\nrate/s: calls/s (read1, read100: calls answered with readings) or replies/s (streams, overload); "
        "/null: ratio to the null server of the same round. front, workers, client: CPU microseconds per call "
        "(per reply for streams) of the server process, its child processes, the load generator; us/reply: "
        "the front's per reading. ok: DATA bytes received / bytes of correct replies (1.00: every call answered). "
        "worst: the lowest stream's share of its 50 Hz; longest gap: the longest time a stream went without a "
        "reading inside the window; served all window: streams served before the window began, and their "
        "shares of 50 Hz (min/median/max); "
        f"starved>1s: streams that, once served, went more than {STARVED_S:g} s without a reading; first>1s: streams "
        f"whose first reading came more than {STARVED_S:g} s after they were opened (the server took them late); "
        "never served: streams without a single reading by the window's end; open: seconds until "
        "every stream had its first reading; ended: streams the server ended (an error: none should end)."
    )
    print(f"loadavg at the end: {loadavg()} (other processes on this machine move every figure)")


if __name__ == "__main__":
    main()
