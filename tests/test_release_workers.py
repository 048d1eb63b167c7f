"""The pacsys release's own backends, unchanged, in workers that run in the release's environment.

The front runs here; its workers run under the interpreter of a venv with `pacsys==0.3.0`
from the package index (`worker_python`), where `import pacsys` is the release. Two fronts:
(a) workers hosting the release's FakeBackend, (b) workers hosting the release's gRPC
backend, pointed at a second pacsys-supervisor (a real process) serving `sim`. Reads, a
write and a stream go through the front; a worker is killed and the service carries on.
"""

import logging
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
import release_venv
from helpers import wait_for
from release_venv import release_python

from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2

SERVING = re.compile(r"serving DAQ on 127\.0\.0\.1:(\d+)")


@pytest.fixture(scope="module")
def release_py():
    return str(release_python())


@pytest.fixture
def upstream_sim():
    """A second pacsys-supervisor, serving simulated devices; yields its port."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pacsys.supervised.cli", "--backend", "sim", "--workers", "0"]
        + ["--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        port = None
        for line in proc.stdout:  # the command prints its address once it serves
            if m := SERVING.search(line):
                port = int(m[1])
                break
        assert port is not None, "the upstream pacsys-supervisor did not start"
        yield port
    finally:
        proc.terminate()
        proc.wait(20)


def test_the_release_venv_is_made_by_the_documented_recipe(release_py):
    """The venv these tests use was made by docs/supervised.md's recipe, with ops/release-backends.txt."""
    lines = release_venv.recipe()
    assert any("--no-deps" in line and line.endswith(release_venv.RELEASE) for line in lines), lines
    assert lines[-1].endswith("pip install -r ops/release-backends.txt"), lines
    made_from = (release_venv.VENV / "installed.txt").read_text().splitlines()[0]
    assert made_from == release_venv._stamp(lines)


def _value(reply):
    assert reply.WhichOneof("value") == "readings", reply
    return reply.readings.reading[0].data.scalar


def _release_backends_loaded(caplog, release_py):
    """Each worker says which class it hosts and the file it came from: the release's, never ours."""
    venv = str(Path(release_py).parent.parent)  # .../bin/python -> the venv
    lines = [r.getMessage() for r in caplog.records if "event=worker_ready" in r.getMessage()]
    assert lines
    for line in lines:
        assert f"from {venv}/" in line and "/pacsys/" in line, line


def _kill_owner(r, device):
    pid = r.owner_pid(device)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: pid not in [w.pid for w in r.pool.worker_states()], what="the killed worker replaced")
    return pid


def test_release_fake_backend_in_release_workers(running, release_py, caplog):
    caplog.set_level(logging.INFO, logger="pacsys.workers")
    r = running(backend="pacsys.testing:FakeBackend", workers=2, worker_python=release_py)
    _release_backends_loaded(caplog, release_py)

    (nope,) = r.read(["M:NOPE@I"])  # the release's fake: nothing configured yet
    assert (nope.status.facility_code, nope.status.status_code) == (1, -1)
    assert nope.status.message == "No reading configured for M:NOPE@I"

    assert r.set("Z:ACLTST", 5.0).status[0].status_code == 0
    assert _value(r.read(["Z:ACLTST@I"])[0]) == 5.0  # the write reached the release's fake

    _kill_owner(r, "Z:ACLTST")
    wait_for(lambda: r.pool.ready_count == 2, what="both workers ready again")
    (again,) = r.read(["M:NOPE@I"])  # served on: by the other worker or the replacement
    assert again.status.message == "No reading configured for M:NOPE@I"
    assert r.set("Z:ACLTST", 6.0).status[0].status_code == 0
    assert _value(r.read(["Z:ACLTST@I"])[0]) == 6.0


def test_release_grpc_backend_in_release_workers(running, release_py, upstream_sim, caplog):
    caplog.set_level(logging.INFO, logger="pacsys.workers")
    spec = f"pacsys.backends.grpc_backend:GRPCBackend?host=127.0.0.1&port={upstream_sim}"
    r = running(backend=spec, workers=2, worker_python=release_py)
    _release_backends_loaded(caplog, release_py)

    first, second = r.read(["M:OUTTMP@I", "G:AMANDA@I"])
    assert 60 < _value(first) < 90 and 30 < _value(second) < 50  # the simulator's ranges

    seen = []
    stream = r.stub.Read(DAQ_pb2.ReadingList(drf=["M:OUTTMP@p,100"]), timeout=60)

    def consume():
        try:
            for reply in stream:
                seen.append(_value(reply))
        except grpc.RpcError:
            pass  # cancelled at the end

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    try:
        wait_for(lambda: len(seen) >= 5, what="stream readings")
        _kill_owner(r, "M:OUTTMP")
        after = len(seen)
        wait_for(lambda: len(seen) >= after + 5, what="stream readings after the kill")
        assert thread.is_alive()  # the stream stayed open through the kill
        assert all(60 < v < 90 for v in seen)
    finally:
        stream.cancel()
        thread.join(10)
    wait_for(lambda: r.pool.ready_count == 2, what="both workers ready again")
    assert 60 < _value(r.read(["M:OUTTMP@I"])[0]) < 90


def test_a_spec_of_our_own_backends_fails_clearly_under_the_release(release_py):
    from helpers import Running

    with pytest.raises(Exception, match="worker_python .* could not build.*module:factory"):
        Running(backend="sim", workers=1, worker_python=release_py)
