"""Writes with two instances: the recipe of ops/README.md ("Writes with several instances").

ops/haproxy.cfg sends every Set to instance a (backend writers) and to b only while a is
down, and each slew-limited device also has a value_range. Here both instances stand in
front of one device (a simulator served by a third gateway, reached through `grpc://`), as
two gateways stand in front of one accelerator. Shown through haproxy: every write goes to
a (all Sets are in a's audit log, none in b's) and no jump gets through; after a is killed,
writes go to b, which judges each step from the device's value as a did (a slew limit's
steps hold from b's first write on), and the range holds too.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys

import grpc
import pytest

from benchmarks.pair import Pair
from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2
from pacsys.backends.sim import SimBackend
from pacsys.supervised import SupervisedServer

pytestmark = [
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals"),
    pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed (apt-get install haproxy)"),
]

TOKEN = "pair-writes-token"
DEVICE = "Z:ACLTST"
CONFIG = f"""
backend = "grpc://127.0.0.1:{{upstream}}"
allow_writes = ["{DEVICE}"]
token_file = "{{token}}"

[[policies]]
type = "value_range"
limits = {{ "{DEVICE}" = [-10.0, 10.0] }}

[[policies]]
type = "slew_rate"
limits = {{ "{DEVICE}" = {{ max_step = 1.0 }} }}
"""


@pytest.fixture(scope="module")
def device():
    """The one device both instances write: a simulator behind a gateway of its own."""
    with SupervisedServer(SimBackend(), port=0, host="127.0.0.1") as upstream:
        yield upstream


@pytest.fixture(scope="module")
def pair(tmp_path_factory, device):
    workdir = tmp_path_factory.mktemp("pair-writes")
    token = workdir / "token"
    token.write_text(TOKEN + "\n")
    config = workdir / "supervisor.toml"
    config.write_text(CONFIG.replace("{token}", str(token)).replace("{upstream}", str(device.port)))
    p = Pair(workdir, "--config", str(config), "--audit-path", str(workdir / "audit-{name}.jsonl"))
    try:
        p.start()
        yield p
    finally:
        p.close()


def write(pair: Pair, value: float) -> grpc.StatusCode:
    request = DAQ_pb2.SettingList()
    setting = request.setting.add()
    setting.device = DEVICE
    setting.value.scalar = value
    try:
        reply = pair.stub.Set(request, timeout=10, metadata=[("authorization", f"Bearer {TOKEN}")])
    except grpc.RpcError as exc:
        return exc.code()
    assert [s.status_code for s in reply.status] == [0], reply
    return grpc.StatusCode.OK


def audited_sets(pair: Pair, name: str) -> list[dict]:
    path = pair.workdir / f"audit-{name}.jsonl"
    if not path.exists():
        return []
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [e for e in entries if e.get("method") == "Set" and "allowed" in e]


def test_writes_go_through_one_instance_and_stay_bounded_after_a_fail_over(pair):
    allowed, denied = grpc.StatusCode.OK, grpc.StatusCode.PERMISSION_DENIED
    assert write(pair, 0.0) == allowed
    value = 0.0
    for _ in range(8):
        value += 0.5
        assert write(pair, value) == allowed  # a step within max_step
        assert write(pair, value + 5.0) == denied  # a jump: one history sees every write
    assert len(audited_sets(pair, "a")) == 17
    assert audited_sets(pair, "b") == []

    pair.a.signal(signal.SIGKILL)
    pair.a.wait(10)
    pair.wait_down("a")
    # b has written nothing yet, but it judges each step from the device's value (4.0).
    assert write(pair, 50.0) == denied  # the range
    assert write(pair, 9.0) == denied  # a step of 5
    assert write(pair, 4.5) == allowed
    assert write(pair, 9.5) == denied
    assert [(e["allowed"], e["values"][0][1]) for e in audited_sets(pair, "b")] == [
        (False, 50.0),
        (False, 9.0),
        (True, 4.5),
        (False, 9.5),
    ]
