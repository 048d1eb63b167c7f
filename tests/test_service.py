"""`pacsys-supervisor --workers 4` as a real process, driven by real gRPC clients."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import grpc
import psutil
import pytest
from helpers import wait_for

from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2, DAQ_pb2_grpc

TOKEN = "s3cret-token"


class Service:
    def __init__(self, *args, env=None):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pacsys.supervised.cli", "--host", "127.0.0.1", "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        line = self.proc.stdout.readline()  # the serving line, or EOF when it failed to start
        match = re.search(r"serving DAQ on \S+:(\d+) \((.*)\)", line)
        if match is None:
            self.proc.kill()
            raise AssertionError(f"no serving line: {line!r} {self.proc.stderr.read()}")
        self.port = int(match.group(1))
        self.description = match.group(2)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = DAQ_pb2_grpc.DAQStub(self.channel)

    def status(self):
        return json.loads(self.channel.unary_unary("/pacsys.supervisor.Admin/Status")(b"", timeout=5))

    def read(self, drfs, timeout=10):
        return list(self.stub.Read(DAQ_pb2.ReadingList(drf=drfs), timeout=timeout))

    def set(self, device, value, token=None):
        request = DAQ_pb2.SettingList()
        s = request.setting.add()
        s.device = device
        s.value.scalar = value
        metadata = [("authorization", f"Bearer {token}")] if token else None
        return self.stub.Set(request, timeout=10, metadata=metadata)

    def terminate(self, timeout=30):
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def service():
    started = []

    def start(*args, **kwargs):
        s = Service(*args, **kwargs)
        started.append(s)
        return s

    yield start
    for s in started:
        s.terminate()


def _gone(pid):
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_four_workers_serve_reads_streams_and_token_gated_writes(service):
    svc = service("--workers", "4", "--token", TOKEN, "--allow-writes", "Z:ACLTST")
    assert "4 workers ready" in svc.description
    drfs = [f"Z:SIM{i:03d}@I" for i in range(40)] + ["M:OUTTMP@I", "G:AMANDA@I"]
    replies = svc.read(drfs)
    assert sorted(r.index for r in replies) == list(range(len(drfs)))
    assert all(r.WhichOneof("value") == "readings" for r in replies)
    workers = svc.status()["workers"]
    assert len(workers) == 4 and sum(1 for w in workers if w["requests"]) == 4

    call = svc.stub.Read(DAQ_pb2.ReadingList(drf=["M:OUTTMP@p,100", "G:AMANDA@p,100"]))
    seen = set()
    for reply in call:
        seen.add(reply.index)
        if seen == {0, 1}:
            break
    call.cancel()

    with pytest.raises(grpc.RpcError) as no_token:
        svc.set("Z:ACLTST", 3.0)
    assert no_token.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert [s.status_code for s in svc.set("Z:ACLTST", 3.0, token=TOKEN).status] == [0]
    with pytest.raises(grpc.RpcError) as denied:
        svc.set("M:OUTTMP", 70.0, token=TOKEN)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert svc.read(["Z:ACLTST.SETTING@I"])[0].readings.reading[0].data.scalar == pytest.approx(3.0)

    pids = [w["pid"] for w in workers]
    assert svc.terminate() == 0
    wait_for(lambda: all(_gone(pid) for pid in pids), timeout=10, what="every worker gone with the service")


def test_custom_factory_backend_runs_in_the_workers(service):
    tests_dir = os.path.dirname(__file__)
    env = {"PYTHONPATH": os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")])}
    svc = service("--workers", "2", "--backend", "fault_backends:scripted", env=env)
    pid = int(svc.read(["Z:PID@I"])[0].readings.reading[0].data.scalar)
    assert pid in [w["pid"] for w in svc.status()["workers"]]


def test_a_supervisor_chained_behind_another(service):
    upstream = service("--workers", "1", "--allow-writes", "Z:*")
    front = service("--workers", "2", "--backend", f"grpc://127.0.0.1:{upstream.port}", "--allow-writes", "Z:*")
    (reply,) = front.read(["G:AMANDA@I"])
    assert reply.readings.reading[0].data.scalar == pytest.approx(42.0, abs=1.0)
    assert [s.status_code for s in front.set("Z:ACLTST", 7.0).status] == [0]
    assert upstream.read(["Z:ACLTST.SETTING@I"])[0].readings.reading[0].data.scalar == pytest.approx(7.0)
    call = front.stub.Read(DAQ_pb2.ReadingList(drf=["M:OUTTMP@p,100"]))
    assert next(call).WhichOneof("value") == "readings"
    call.cancel()


def test_a_backend_that_cannot_be_built_exits_nonzero_with_its_reason():
    proc = subprocess.run(
        [sys.executable, "-m", "pacsys.supervised.cli", "--port", "0", "--workers", "2", "--backend", "nosuchmod:make"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "nosuchmod" in proc.stderr


def test_status_command_shows_the_workers(service):
    svc = service("--workers", "2")
    svc.read(["M:OUTTMP@I"])
    pids = [w["pid"] for w in svc.status()["workers"]]
    out = subprocess.run(
        [sys.executable, "-m", "pacsys.supervised.cli", "status", "--addr", f"127.0.0.1:{svc.port}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert "READY" in out.stdout and "requests Read/allow=1" in out.stdout
    rows = [line.split() for line in out.stdout.splitlines() if line.split()[:1] in (["0"], ["1"])]
    assert [int(r[2]) for r in rows] == pids and all(r[1] == "ready" for r in rows)


def test_systemd_notify_protocol(service, tmp_path):
    import socket

    address = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(30)
    try:
        svc = service("--workers", "1", env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000"})
        messages = []
        while not any("WATCHDOG=1" in m for m in messages):
            messages.append(sock.recv(4096).decode())
        assert messages[0].startswith("READY=1") and f"port {svc.port}" in messages[0]
        svc.proc.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in messages[-1]:
            messages.append(sock.recv(4096).decode())
        assert svc.proc.wait(30) == 0
    finally:
        sock.close()


def test_sigterm_under_load_exits_0_within_the_grace_and_leaves_no_worker(service):
    import threading

    svc = service("--workers", "2", "--shutdown-grace", "3")
    pids = [w["pid"] for w in svc.status()["workers"]]
    stop = threading.Event()
    outcomes = []

    def client(k):
        stub = DAQ_pb2_grpc.DAQStub(grpc.insecure_channel(f"127.0.0.1:{svc.port}"))
        while not stop.is_set():
            try:
                list(stub.Read(DAQ_pb2.ReadingList(drf=[f"Z:SIM{k:03d}@I"]), timeout=5))
                outcomes.append("ok")
            except grpc.RpcError as exc:
                outcomes.append(exc.code())
                return

    stream = svc.stub.Read(DAQ_pb2.ReadingList(drf=["M:OUTTMP@p,100"]))
    next(stream)
    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(16)]
    for t in threads:
        t.start()
    wait_for(lambda: outcomes.count("ok") >= 100, what="the load to run")
    started = time.monotonic()
    svc.proc.send_signal(signal.SIGTERM)
    assert svc.proc.wait(30) == 0
    took = time.monotonic() - started
    stop.set()
    with pytest.raises(grpc.RpcError) as ended:
        for _ in stream:
            pass
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE  # clients reconnect elsewhere
    for t in threads:
        t.join(10)
    # A call racing the drain is refused with a status the pacsys client retries on; none
    # fails with anything else (INTERNAL, UNKNOWN, ...).
    failures = {o for o in outcomes if o != "ok"}
    assert failures <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}, failures
    assert took < 3 + 10, f"shutdown took {took:.1f} s"
    assert all(_gone(pid) for pid in pids)


def test_a_chained_supervisor_passes_the_callers_token_and_the_upstream_denial(service):
    upstream = service("--workers", "1", "--token", TOKEN, "--allow-writes", "Z:ACLTST")
    front = service(
        "--workers", "1", "--backend", f"grpc://127.0.0.1:{upstream.port}?pass_token=1", "--allow-writes", "Z:*"
    )
    assert [s.status_code for s in front.set("Z:ACLTST", 2.0, token=TOKEN).status] == [0]
    with pytest.raises(grpc.RpcError) as no_token:
        front.set("Z:ACLTST", 2.0)
    assert no_token.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as denied:
        front.set("Z:SIM001", 2.0, token=TOKEN)  # the front allows Z:*, the upstream only Z:ACLTST
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
