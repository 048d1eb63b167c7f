"""Writes with two instances as shipped: the recipe of ops/README.md ("Writes with several instances").

The instances run ops/supervisor.container.toml as it is (listening on `[::]`, serving TLS,
the token file, `allow_writes`, a value range and a slew limit on Z:ACLTST), behind haproxy
running ops/haproxy.cfg; only ports, the backend and the files a deployment provides differ
(benchmarks/pair.py). A Set with the token through the balancer is accepted: haproxy carries
it to the instance over TLS, so the instance, which refuses a token over plaintext on a
non-loopback address, takes it. The hop is verified: instances whose certificate does not
name pacsys-supervisor get no call.

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
import tomllib

import grpc
import pytest

from benchmarks.pair import CONTAINER_CONFIG, Pair
from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2
from pacsys.backends.sim import SimBackend
from pacsys.supervised import SupervisedServer

pytestmark = [
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals"),
    pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed (apt-get install haproxy)"),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command"),
]

DEVICE = "Z:ACLTST"


@pytest.fixture(scope="module")
def device():
    """The one device both instances write: a simulator behind a gateway of its own."""
    with SupervisedServer(SimBackend(), port=0, host="127.0.0.1") as upstream:
        yield upstream


@pytest.fixture(scope="module")
def pair(tmp_path_factory, device):
    # The backend is the deployment's ("your backend", says the shipped file): here the shared device.
    p = Pair(tmp_path_factory.mktemp("pair-writes"), "--backend", f"grpc://127.0.0.1:{device.port}")
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
        reply = pair.stub.Set(request, timeout=10, metadata=[("authorization", f"Bearer {pair.token}")])
    except grpc.RpcError as exc:
        assert exc.code() != grpc.StatusCode.UNAUTHENTICATED, exc.details()
        return exc.code()
    assert [s.status_code for s in reply.status] == [0], reply
    return grpc.StatusCode.OK


def audited_sets(pair: Pair, name: str) -> list[dict]:
    path = pair.workdir / f"audit-{name}.jsonl"
    if not path.exists():
        return []
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [e for e in entries if e.get("method") == "Set" and "allowed" in e]


def test_the_shipped_instances_listen_everywhere_serve_tls_and_take_a_token_write_through_haproxy(pair):
    shipped = tomllib.loads(CONTAINER_CONFIG.read_text())
    assert shipped["host"] == "[::]" and shipped["tls_cert"] and shipped["token_file"]
    assert shipped["allow_writes"] == [DEVICE]
    assert not any(option in pair.a.options for option in ("--host", "--allow-token-plaintext"))
    assert write(pair, 0.0) == grpc.StatusCode.OK
    assert [(e["allowed"], e["values"]) for e in audited_sets(pair, "a")][-1] == (True, [[DEVICE, 0.0]])


def test_haproxy_sends_nothing_to_an_instance_whose_certificate_does_not_name_pacsys_supervisor(tmp_path):
    """The hop is verified, not only encrypted: a certificate of the deployment's CA for another
    name is refused (calls fail with UNAVAILABLE), though the checks, on the metrics port, pass."""
    impostor = Pair(tmp_path, certificate_name="pacsys-impostor")
    try:
        impostor.start()  # returns once haproxy sees both instances UP
        assert write(impostor, 0.0) == grpc.StatusCode.UNAVAILABLE
        assert audited_sets(impostor, "a") == audited_sets(impostor, "b") == []
    finally:
        impostor.close()


def test_writes_go_through_one_instance_and_stay_bounded_after_a_fail_over(pair):
    allowed, denied = grpc.StatusCode.OK, grpc.StatusCode.PERMISSION_DENIED
    before = len(audited_sets(pair, "a"))
    assert write(pair, 0.0) == allowed
    value = 0.0
    for _ in range(8):
        value += 0.5
        assert write(pair, value) == allowed  # a step within max_step
        assert write(pair, value + 5.0) == denied  # a jump: one history sees every write
    assert len(audited_sets(pair, "a")) == before + 17
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
