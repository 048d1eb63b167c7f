"""Two pacsys-supervisor processes behind haproxy on loopback, configured from ops/haproxy.cfg.

Used by tests/test_pair.py and benchmarks/bench_pair.py. The instances are real
`pacsys-supervisor` processes (sim backend); haproxy runs `ops/haproxy.cfg` with only its
addresses changed to free loopback ports (`render_haproxy_cfg`), so what is tested is the
file operators deploy. Everything started here is stopped by `Pair.close()`.
"""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc

from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2, DAQ_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
HAPROXY_CFG = REPO / "ops" / "haproxy.cfg"
SERVING = re.compile(r"^pacsys-supervisor: serving DAQ on ")
# haproxy sees an instance down within inter x fall (+ one interval of phase): 3 s with
# ops/haproxy.cfg's "inter 1s fall 2". The instances keep serving a little longer than that.
DRAIN_DELAY = 4.0
SHUTDOWN_GRACE = 3.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")


def render_haproxy_cfg(text: str, listen: int, stats: int, servers: dict[str, tuple[int, int]]) -> str:
    """ops/haproxy.cfg with loopback addresses: the listener, the stats page, and each server's ports.

    `servers` maps a server name of the file to (service port, metrics port). Every
    substitution must match as often as expected, so a change to the file's layout fails loudly.
    """

    def sub(pattern: str, replacement: str, text: str, count: int = 1) -> str:
        new, n = re.subn(pattern, replacement, text, flags=re.MULTILINE)
        if n != count:
            raise ValueError(f"{HAPROXY_CFG}: expected {count} lines matching {pattern!r}, found {n}")
        return new

    text = sub(r"^(\s*bind) :50051\b", rf"\1 127.0.0.1:{listen}", text)
    text = sub(r"^(\s*bind) :8404$", rf"\1 127.0.0.1:{stats}", text)
    for name, (port, metrics) in servers.items():
        # Each server is listed twice: for reads (supervisors) and for writes (writers).
        pattern = rf"^(\s*server {name}) \S+ (.*)port \d+( backup)?$"
        text = sub(pattern, rf"\1 127.0.0.1:{port} \2port {metrics}\3", text, count=2)
    return text


class Instance:
    """One pacsys-supervisor process on fixed loopback ports (restartable on the same ports)."""

    def __init__(self, name: str, logdir: Path, *extra: str):
        self.name = name
        self.port = free_port()
        self.metrics_port = free_port()
        self.logdir = logdir
        self.extra = extra
        self.proc: subprocess.Popen[str] | None = None
        self.starts = 0

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        self.starts += 1
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH")))))
        log = open(self.logdir / f"{self.name}.{self.starts}.log", "w")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pacsys.supervised.cli",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--metrics-port",
                str(self.metrics_port),
                "--workers",
                "1",
                "--drain-delay",
                str(DRAIN_DELAY),
                "--shutdown-grace",
                str(SHUTDOWN_GRACE),
                *self.extra,
            ],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            cwd=REPO,
            env=env,
        )
        log.close()
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        for line in self.proc.stdout:  # the serving line comes once the workers are ready
            if SERVING.match(line):
                break
            if time.monotonic() > deadline:
                break
        else:
            raise RuntimeError(f"instance {self.name} exited before serving: see {self.logdir}")
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()  # keep the pipe drained

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def metric(self, name: str, labels: str = "") -> float:
        """One sample of this instance's /metrics (0 when absent); `labels` as written in the exposition."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, flags=re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    def reads_served(self) -> float:
        return self.metric("pacsys_requests_total", '{decision="allow",rpc="Read"}')

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


class Pair:
    """Instances `a` and `b` behind haproxy; `stub` is a DAQ client of the balancer's address."""

    def __init__(self, workdir: Path, *extra: str, haproxy: str | None = None):
        """`extra`: more pacsys-supervisor options for both instances; "{name}" in one is the instance's name."""
        self.workdir = workdir
        self.haproxy = haproxy or shutil.which("haproxy") or "haproxy"
        self.instances = {
            name: Instance(name, workdir, *(arg.replace("{name}", name) for arg in extra)) for name in ("a", "b")
        }
        self.port = free_port()
        self.stats_port = free_port()
        self.haproxy_proc: subprocess.Popen[bytes] | None = None
        self.channel: grpc.Channel | None = None

    @property
    def a(self) -> Instance:
        return self.instances["a"]

    @property
    def b(self) -> Instance:
        return self.instances["b"]

    def start(self) -> None:
        threads = [threading.Thread(target=i.start) for i in self.instances.values()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i in self.instances.values():
            if not i.running:
                raise RuntimeError(f"instance {i.name} did not start: see {self.workdir}")
        cfg = self.workdir / "haproxy.cfg"
        servers = {name: (i.port, i.metrics_port) for name, i in self.instances.items()}
        cfg.write_text(render_haproxy_cfg(HAPROXY_CFG.read_text(), self.port, self.stats_port, servers))
        with open(self.workdir / "haproxy.log", "wb") as log:
            self.haproxy_proc = subprocess.Popen([self.haproxy, "-db", "-f", str(cfg)], stdout=log, stderr=log)
        self.wait_up("a", "b")
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = DAQ_pb2_grpc.DAQStub(self.channel)

    def server_status(self) -> dict[tuple[str, str], str]:
        """haproxy's view of each (backend, server): UP, DOWN, "UP 1/2" (coming up), "DOWN 1/2"..."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.stats_port}/;csv", timeout=5) as reply:
                text = reply.read().decode()
        except (urllib.error.URLError, ConnectionError):
            return {}
        rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
        return {(r["pxname"], r["svname"]): r["status"] for r in rows if r["svname"] in self.instances}

    def _all(self, name: str, status: str) -> bool:
        view = self.server_status()
        mine = [v for (_, server), v in view.items() if server == name]
        return bool(mine) and all(v == status for v in mine)

    def wait_up(self, *names: str, timeout: float = 30.0) -> None:
        """Until every backend of haproxy (reads and writes) sees these instances UP."""
        wait_until(lambda: all(self._all(n, "UP") for n in names), timeout, f"haproxy to see {', '.join(names)} UP")

    def wait_down(self, name: str, timeout: float = 30.0) -> None:
        wait_until(lambda: self._all(name, "DOWN"), timeout, f"haproxy to see {name} DOWN")

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
        for i in self.instances.values():
            i.stop()
        if self.haproxy_proc is not None:
            if self.haproxy_proc.poll() is None:
                self.haproxy_proc.send_signal(signal.SIGTERM)
            try:
                self.haproxy_proc.wait(10)
            except subprocess.TimeoutExpired:
                self.haproxy_proc.kill()
                self.haproxy_proc.wait(10)


class Load:
    """`clients` threads making one-shot reads through the balancer until stopped.

    Each client has its own channel, so its own connection, as separate programs would
    (haproxy balances connections). Each call is recorded as (start, end, status): the
    failures, when they happened, and the longest wait around an event can be read from `calls`.
    """

    def __init__(self, target: str, clients: int = 4, timeout: float = 10.0):
        self.timeout = timeout
        self.calls: list[tuple[float, float, str]] = []
        self._stop = threading.Event()
        # A channel of its own per client: grpc would otherwise share one connection between them.
        self._channels = [
            grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(clients)
        ]
        self._threads = [threading.Thread(target=self._client, args=(k,), daemon=True) for k in range(clients)]

    def _client(self, k: int) -> None:
        stub = DAQ_pb2_grpc.DAQStub(self._channels[k])
        n = 0
        while not self._stop.is_set():
            drf = f"Z:SIM{(k * 17 + n) % 100:03d}@I"
            n += 1
            start = time.monotonic()
            try:
                replies = list(stub.Read(DAQ_pb2.ReadingList(drf=[drf]), timeout=self.timeout))
                ok = len(replies) == 1 and replies[0].WhichOneof("value") == "readings"
                code = "OK" if ok else f"bad reply {replies!r}"
            except grpc.RpcError as exc:
                code = f"{exc.code().name}: {exc.details()}"
            self.calls.append((start, time.monotonic(), code))

    def failures(self, since: float = 0.0) -> list[tuple[float, float, str]]:
        return [c for c in self.calls if c[2] != "OK" and c[1] >= since]

    def succeeded(self, since: float = 0.0) -> int:
        return sum(1 for c in self.calls if c[2] == "OK" and c[0] >= since)

    def longest(self, since: float, until: float) -> float:
        """The longest call that was running at some moment between `since` and `until`."""
        return max((end - start for start, end, _ in self.calls if end >= since and start <= until), default=0.0)

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)
        for channel in self._channels:
            channel.close()
