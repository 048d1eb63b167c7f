"""Real `pacsys-supervisor` processes for tests, and real gRPC clients for them.

The `supervisor` and `daq` fixtures clean up what they start: every process is killed, every
channel closed. Nothing waits by sleeping: tests wait for the lines a process writes.
"""

import functools
import os
import re
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2, DAQ_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
STARTUP_DEADLINE = 30.0
FAKE = ("--workers", "0", "--port", "0", "--backend", "fake")  # a quick in-process service
SERVING = re.compile(r"^pacsys-supervisor: serving DAQ on (\S+):(\d+) \((.*)\)$")


def process_env(extra: dict[str, str] | None = None, tests_on_path: bool = False) -> dict[str, str]:
    """This environment without PACSYS_SUPERVISOR_* settings, the repository (and with
    `tests_on_path` the tests, for their backends) importable, and `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSYS_SUPERVISOR_")}
    paths = [str(REPO), *([str(REPO / "tests")] if tests_on_path else []), env.get("PYTHONPATH")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class Supervisor:
    """A pacsys-supervisor process with its stdout and stderr collected line by line."""

    def __init__(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        tests_on_path: bool = False,
        umask: int = -1,
        nofile: int | None = None,
    ):
        """`nofile`: the process's open-file limit (soft and hard), set in the child."""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pacsys.supervised.cli", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=process_env(env, tests_on_path),
            cwd=REPO,
            umask=umask,
            preexec_fn=None if nofile is None else functools.partial(_limit_open_files, nofile),
        )
        self.lines: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self._changed = threading.Condition()
        self._readers = [
            threading.Thread(target=self._read, args=(name, stream), daemon=True)
            for name, stream in (("stdout", self.proc.stdout), ("stderr", self.proc.stderr))
        ]
        for reader in self._readers:
            reader.start()
        self.port: int | None = None

    def _read(self, name: str, stream) -> None:
        for line in stream:
            with self._changed:
                self.lines[name].append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self.lines[name].append("")  # EOF marker wakes waiters
            self._changed.notify_all()

    def output(self) -> str:
        return "\n".join(self.lines["stdout"] + ["--- stderr ---"] + self.lines["stderr"])

    def wait_line(self, stream: str, pattern: str | re.Pattern, timeout: float = 30.0, start: int = 0) -> re.Match:
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines[stream][start:]:
                    match = regex.search(line)
                    if match:
                        return match
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and self.lines[stream][-1:] == [""]):
                    pytest.fail(f"no {stream} line matching {regex.pattern!r}:\n{self.output()}")
                self._changed.wait(min(remaining, 0.5))

    def mark(self, stream: str = "stderr") -> int:
        with self._changed:
            return len(self.lines[stream])

    def wait_serving(self) -> int:
        match = self.wait_line("stdout", SERVING, timeout=STARTUP_DEADLINE)
        self.port = int(match.group(2))
        return self.port

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"pacsys-supervisor did not exit within {timeout} s:\n{self.output()}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for reader in self._readers:
            reader.join(5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def _limit_open_files(n: int) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))


@pytest.fixture
def supervisor():
    started: list[Supervisor] = []

    def start(*args: str, serving: bool = True, **options) -> Supervisor:
        sup = Supervisor(*args, **options)
        started.append(sup)
        if serving:
            sup.wait_serving()
        return sup

    yield start
    for sup in started:
        sup.kill()


def run_cli(*args: str, timeout: float = 30.0, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pacsys.supervised.cli", *args],
        capture_output=True,
        text=True,
        env=process_env(env),
        cwd=REPO,
        timeout=timeout,
    )


# -- a gRPC client ----------------------------------------------------------------------------------------


@pytest.fixture
def daq():
    channels: list[grpc.Channel] = []

    def stub(port: int) -> DAQ_pb2_grpc.DAQStub:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        channels.append(channel)
        grpc.channel_ready_future(channel).result(timeout=10)
        return DAQ_pb2_grpc.DAQStub(channel)

    yield stub
    for channel in channels:
        channel.close()


def read_scalar(stub: DAQ_pb2_grpc.DAQStub, drf: str) -> float:
    replies = list(stub.Read(DAQ_pb2.ReadingList(drf=[drf]), timeout=10))
    assert len(replies) == 1 and replies[0].WhichOneof("value") == "readings", replies
    return replies[0].readings.reading[0].data.scalar


def set_scalar(stub: DAQ_pb2_grpc.DAQStub, device: str, value: float) -> grpc.StatusCode:
    """The call's status code; OK only when every setting succeeded."""
    request = DAQ_pb2.SettingList()
    setting = request.setting.add()
    setting.device = device
    setting.value.scalar = value
    try:
        reply = stub.Set(request, timeout=10)
    except grpc.RpcError as exc:
        return exc.code()
    assert [s.status_code for s in reply.status] == [0], reply
    return grpc.StatusCode.OK


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
