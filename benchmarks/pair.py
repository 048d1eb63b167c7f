"""Two pacsys-supervisor processes behind haproxy on loopback, as the files in ops/ ship them.

Used by tests/test_pair*.py and benchmarks/bench_pair.py. The instances are real
`pacsys-supervisor` processes run from `ops/supervisor.container.toml` as it is (listening
on `[::]`, serving TLS, a plaintext listener beside it, sim backend) with only what a
deployment provides changed: ports, the token file, the audit paths and the certificate files. haproxy runs `ops/haproxy.cfg`
with only its addresses and its CA file changed (`render_haproxy_cfg`), so what is tested is
what operators deploy. Clients connect over 127.0.0.1. The certificates are made with the
openssl command (`Certificates`). Nothing here resolves a name: every address is a literal
one. Everything started here is stopped by `Pair.close()`.
"""

from __future__ import annotations

import csv
import errno
import io
import os
import random
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
CONTAINER_CONFIG = REPO / "ops" / "supervisor.container.toml"
TOKEN = "pair-token"
# haproxy sees an instance down within inter x fall (+ one interval of phase): 3 s with
# ops/haproxy.cfg's "inter 1s fall 2". The instances keep serving a little longer than that.
DRAIN_DELAY = 4.0
SHUTDOWN_GRACE = 3.0


_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port free on every address, IPv4 and IPv6 (instances may listen on [::]), below
    the kernel's ephemeral port range, and not handed out before by this process.

    Instances are restarted on the same ports, so their ports are chosen here rather than
    by the kernel at bind time. A port of the ephemeral range could be taken by any
    outgoing connection on the machine (a health check, a metrics request) between this
    choice and the instance's bind; the kernel never gives a connection a port below it.
    """
    low = _ephemeral_range()[0]
    while True:
        port = random.randrange(low // 2, low)
        if port not in _handed_out and _bindable(port):
            _handed_out.add(port)
            return port


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def _bindable(port: int) -> bool:
    families = [(socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")]  # [::] is dual-stack where IPv6 exists
    for family, address in families:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((address, port))
                return True
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
    return False


def wait_until(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")


class Certificates:
    """A deployment's CA and the instances' certificate, made with the openssl command.

    The certificate names what ops/haproxy.cfg checks (`verifyhost`), as ops/README.md tells
    operators to make it, unless another `name` is given.
    """

    def __init__(self, directory: Path, name: str | None = None):
        self.ca, self.ca_key = directory / "ca.crt", directory / "ca.key"
        self.cert, self.key = directory / "server.crt", directory / "server.key"
        name = name or verified_name()
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"]
        self._openssl("req", "-x509", *ec, "-keyout", self.ca_key, "-out", self.ca, "-subj", "/CN=pacsys test CA")
        self._openssl(
            "req", "-x509", *ec, "-keyout", self.key, "-out", self.cert, "-subj", f"/CN={name}",
            "-addext", f"subjectAltName=DNS:{name}", "-addext", "basicConstraints=critical,CA:FALSE",
            "-CA", self.ca, "-CAkey", self.ca_key,
        )  # fmt: skip

    @staticmethod
    def _openssl(*args: str | Path) -> None:
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


def verified_name() -> str:
    """The name haproxy checks in the instances' certificates (ops/haproxy.cfg's verifyhost)."""
    match = re.search(r"^\s*default-server .*\bverifyhost (\S+)", HAPROXY_CFG.read_text(), flags=re.MULTILINE)
    if match is None:
        raise ValueError(f"{HAPROXY_CFG}: no default-server line with verifyhost")
    return match.group(1)


def render_haproxy_cfg(
    text: str, listen: int, stats: int, servers: dict[str, tuple[int, int]], ca_file: Path | None = None
) -> str:
    """ops/haproxy.cfg with loopback addresses: the listener, the stats page, and each server's ports.

    `servers` maps a server name of the file to (service port, metrics port); `ca_file`
    replaces the file's CA. Every substitution must match as often as expected, so a change
    to the file's layout fails loudly; a server line left naming a host (which haproxy would
    resolve through the system's name servers) is an error.
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
    if ca_file is not None:
        text = sub(r"\bca-file \S+", f"ca-file {ca_file}", text)
    named = [line for line in text.splitlines() if re.match(r"\s*server \S+ (?!127\.0\.0\.1:)", line)]
    if named:
        raise ValueError(f"server lines still name a host (would be resolved): {named}")
    return text


def plain_options(drain_delay: float = DRAIN_DELAY) -> list[str]:
    """Options of an instance serving plaintext on 127.0.0.1 (one worker)."""
    return [
        "--host",
        "127.0.0.1",
        "--workers",
        "1",
        "--drain-delay",
        str(drain_delay),
        "--shutdown-grace",
        str(SHUTDOWN_GRACE),
    ]


def shipped_options(workdir: Path, name: str, certificates: Certificates, token_file: Path) -> list[str]:
    """Options of an instance run from ops/supervisor.container.toml as it is, but for the files a
    deployment provides: the token, the audit paths, the certificate and its key."""
    return [
        "--config", str(CONTAINER_CONFIG),
        "--token-file", str(token_file),
        "--audit-path", str(workdir / f"audit-{name}.jsonl"),
        "--tls-cert", str(certificates.cert),
        "--tls-key", str(certificates.key),
    ]  # fmt: skip


class Instance:
    """One pacsys-supervisor process on fixed ports (restartable on the same ports).

    `options` are its command-line options other than --port, --metrics-port and
    --plaintext-port. Clients reach it at 127.0.0.1 (`addr`), whether it listens there or on
    every address. `port`: its service port (instances with --reuse-port may share one);
    `plaintext_port`: a plaintext listener beside TLS (True: a port of its own).
    """

    def __init__(self, name: str, logdir: Path, *options: str, port: int | None = None, plaintext_port: bool = False):
        self.name = name
        self.port = port or free_port()
        self.plaintext_port = free_port() if plaintext_port else None
        self.metrics_port = free_port()
        self.logdir = logdir
        self.options = options
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        """Start it and return once it is ready (its /readyz answers 200)."""
        self.starts += 1
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH")))))
        argv = [sys.executable, "-m", "pacsys.supervised.cli", "--port", str(self.port)]
        argv += ["--metrics-port", str(self.metrics_port), *self.options]
        if self.plaintext_port is not None:
            argv += ["--plaintext-port", str(self.plaintext_port)]
        with open(self.logdir / f"{self.name}.{self.starts}.log", "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log, cwd=REPO, env=env)
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"instance {self.name} exited with {self.proc.returncode}: see {self.logdir}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"instance {self.name} not ready within {timeout:g} s: see {self.logdir}")
            time.sleep(0.05)

    def log_text(self) -> str:
        """What its latest start wrote to stdout and stderr so far."""
        return (self.logdir / f"{self.name}.{self.starts}.log").read_text(errors="replace")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/readyz", timeout=5) as reply:
                return reply.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

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
    """Instances `a` and `b` as shipped, behind haproxy; `stub` is a DAQ client of the balancer's address.

    `token` is the bearer token the instances accept (their token file); `certificates` the
    deployment's CA and the instances' certificate.
    """

    def __init__(
        self,
        workdir: Path,
        *extra: str,
        haproxy: str | None = None,
        certificate_name: str | None = None,
        edit_haproxy_cfg: Callable[[str], str] | None = None,
    ):
        """`extra`: more pacsys-supervisor options for both instances; "{name}" in one is the instance's name.
        `certificate_name`: the name in the instances' certificate, if not the one haproxy checks.
        `edit_haproxy_cfg`: a change a test makes to the rendered haproxy config (more frontends...)."""
        self.workdir = workdir
        self.haproxy = haproxy or shutil.which("haproxy") or "haproxy"
        self.token = TOKEN
        token_file = workdir / "token"
        token_file.write_text(TOKEN + "\n")
        self.certificates = Certificates(workdir, certificate_name)
        self.instances = {
            name: Instance(
                name,
                workdir,
                *shipped_options(workdir, name, self.certificates, token_file),
                *(arg.replace("{name}", name) for arg in extra),
                plaintext_port=True,  # the shipped config's plaintext_port, a port of each one's own here
            )
            for name in ("a", "b")
        }
        self.port = free_port()
        self.stats_port = free_port()
        self.haproxy_proc: subprocess.Popen[bytes] | None = None
        self.channel: grpc.Channel | None = None
        self.edit_haproxy_cfg = edit_haproxy_cfg

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
            if not i.ready():
                raise RuntimeError(f"instance {i.name} did not start: see {self.workdir}")
        cfg = self.workdir / "haproxy.cfg"
        servers = {name: (i.port, i.metrics_port) for name, i in self.instances.items()}
        text = render_haproxy_cfg(HAPROXY_CFG.read_text(), self.port, self.stats_port, servers, self.certificates.ca)
        if self.edit_haproxy_cfg is not None:
            text = self.edit_haproxy_cfg(text)
        cfg.write_text(text)
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
