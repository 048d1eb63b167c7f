"""What an unauthenticated client can fill, flood or read, through a real server on loopback.

One test (or a few) per finding of the security pass; each sends a bounded number of
requests and stops by itself.
"""

import json
import logging
import os
import shutil
import socket
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import wait_for

from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2, DAQ_pb2_grpc
from pacsys.supervised import AuditLog, ServicerLimits, SupervisedServer, read_audit
from pacsys.testing import FakeBackend

TOKEN = "t0ken"


class Served:
    def __init__(self, backend, host="127.0.0.1", **kwargs):
        self.server = SupervisedServer(backend, port=0, host=host, **kwargs)
        self.server.start()
        # A server on every address ([::]) is still called over loopback only.
        self.address = f"{'127.0.0.1' if host in ('127.0.0.1', '[::]') else host}:{self.server.port}"
        self.channel = grpc.insecure_channel(self.address)
        self.stub = DAQ_pb2_grpc.DAQStub(self.channel)

    def read(self, drfs, timeout=5, **kwargs):
        return list(self.stub.Read(DAQ_pb2.ReadingList(drf=drfs), timeout=timeout, **kwargs))

    def set(self, device, value, metadata=None):
        request = DAQ_pb2.SettingList(setting=[DAQ_pb2.Setting(device=device)])
        request.setting[0].value.scalar = value
        return self.stub.Set(request, timeout=5, metadata=metadata)

    def close(self):
        self.channel.close()
        self.server.stop()


@pytest.fixture
def serve():
    opened = []

    def start(backend=None, **kwargs):
        s = Served(backend if backend is not None else _fake(), **kwargs)
        opened.append(s)
        return s

    yield start
    for s in opened:
        s.close()


@pytest.fixture
def log_lines():
    """Every record of the pacsys loggers, formatted, while the test runs."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Keep(logging.DEBUG)
    root = logging.getLogger("pacsys")
    old_level = root.level
    root.setLevel(logging.DEBUG)
    root.addHandler(handler)
    yield records
    root.removeHandler(handler)
    root.setLevel(old_level)


def _fake():
    fb = FakeBackend()
    fb.set_reading("M:OUTTMP", 72.5)
    fb.set_reading("Z:ACLTST", 1.0)
    return fb


def _refused(call):
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def _size(path):
    return os.path.getsize(path)


# -- finding 1: refused requests cannot fill the disk ----------------------------------------------


def test_long_drfs_are_refused_at_the_door_and_leave_bounded_traces(serve, tmp_path, log_lines):
    path = str(tmp_path / "audit.jsonl")
    limits = ServicerLimits(refusal_log_interval=60.0)
    s = serve(audit_log=AuditLog(path), limits=limits)
    huge = "M:OUTTMP" + "X" * 100_000
    for _ in range(20):
        code, details = _refused(lambda: s.read([huge + "@I"]))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "100010 characters long (the limit is 512)" in details and len(details) < 300
    s.server.servicer.audit.flush()
    entries = [e for e in read_audit(path) if e["dir"] == "in"]
    assert len(entries) == 20  # one line per request...
    assert all(e["allowed"] is False for e in entries)
    assert _size(path) < 20 * 1500  # ... each a bounded excerpt (the DRFs were 2 MB in all)
    assert s.server.servicer.stats.limits_hit["max_drf_length"] == 20
    lines = [r.getMessage() for r in log_lines if r.getMessage().startswith("event=request rpc=Read")]
    assert len(lines) == 1 and len(lines[0]) < 1000  # the others are counted, not written
    assert s.server.servicer.stats.refusals_not_logged == 19


def test_suppressed_refusals_are_counted_in_the_next_line(serve, log_lines):
    s = serve(limits=ServicerLimits(refusal_log_interval=0.3))

    def refused_again_and_counted():  # each look sends one more refused request
        _refused(lambda: s.read(["M:OUTTMP.NOPE@I"]))
        return any("not_logged=" in r.getMessage() for r in log_lines)

    wait_for(refused_again_and_counted, what="a line counting the refusals not logged")
    lines = [r.getMessage() for r in log_lines if r.getMessage().startswith("event=request rpc=Read")]
    assert len(lines) >= 2 and "not_logged=" in lines[-1]


def test_a_huge_setting_value_is_audited_as_an_excerpt(serve, tmp_path):
    path = str(tmp_path / "audit.jsonl")
    s = serve(audit_log=AuditLog(path))
    request = DAQ_pb2.SettingList(setting=[DAQ_pb2.Setting(device="Z:ACLTST")])
    request.setting[0].value.text = "A" * 1_000_000
    s.stub.Set(request, timeout=10)
    s.server.servicer.audit.flush()
    assert _size(path) < 5000


# -- finding 3: writes the audit cannot record are not made ----------------------------------------


def test_writes_are_refused_while_the_audit_cannot_record_and_resume_by_themselves(serve, tmp_path):
    link = tmp_path / "audit.jsonl"
    real = tmp_path / "real.jsonl"
    os.symlink("/dev/full", link)  # every write fails with ENOSPC, as on a full disk
    fake = _fake()
    s = serve(fake, audit_log=AuditLog(str(link)))
    health = health_pb2_grpc.HealthStub(s.channel)
    code, details = _refused(lambda: s.set("Z:ACLTST", 5.0))
    assert code == grpc.StatusCode.UNAVAILABLE and "audit" in details
    assert fake.writes == []  # not made
    assert s.read(["M:OUTTMP@I"])  # reads go on
    assert s.server.servicer.stats.writes_refused_unaudited == 1

    def audit_health():
        return health.Check(health_pb2.HealthCheckRequest(service="audit"), timeout=5).status

    wait_for(lambda: audit_health() == health_pb2.HealthCheckResponse.NOT_SERVING, what="audit NOT_SERVING")
    status = s.server.status()["audit"]
    assert (status["healthy"], status["writes_refused"]) == (False, 1)
    # The disk has room again: the next write is recorded, and made.
    os.unlink(link)
    os.symlink(real, link)
    reply = s.set("Z:ACLTST", 6.0)
    assert [st.status_code for st in reply.status] == [0]
    assert fake.writes == [("Z:ACLTST", 6.0)]
    entries = [e for e in read_audit(str(real)) if e.get("method") == "Set"]
    assert entries[-1]["allowed"] is True and entries[-1]["values"] == [["Z:ACLTST", 6.0]]
    wait_for(lambda: audit_health() == health_pb2.HealthCheckResponse.SERVING, what="audit SERVING")


def test_a_deleted_audit_directory_refuses_writes_and_turns_audit_health_not_serving(serve, tmp_path):
    folder = tmp_path / "logs"
    folder.mkdir()
    fake = _fake()
    s = serve(fake, audit_log=AuditLog(str(folder / "audit.jsonl")))
    health = health_pb2_grpc.HealthStub(s.channel)

    def audit_health():
        return health.Check(health_pb2.HealthCheckRequest(service="audit"), timeout=5).status

    assert [st.status_code for st in s.set("Z:ACLTST", 1.0).status] == [0]
    assert audit_health() == health_pb2.HealthCheckResponse.SERVING
    shutil.rmtree(folder)
    # With no request at all, the audit health says so within a second or two (3 s: a loaded machine).
    wait_for(lambda: audit_health() == health_pb2.HealthCheckResponse.NOT_SERVING, timeout=3, what="NOT_SERVING")
    code, details = _refused(lambda: s.set("Z:ACLTST", 2.0))
    assert code == grpc.StatusCode.UNAVAILABLE and "audit" in details
    assert fake.writes == [("Z:ACLTST", 1.0)]
    assert s.read(["M:OUTTMP@I"])  # reads go on
    # The directory is back: the next write is recorded in a new file, and made.
    folder.mkdir()
    assert [st.status_code for st in s.set("Z:ACLTST", 3.0).status] == [0]
    assert [e["values"] for e in read_audit(str(folder / "audit.jsonl")) if e["method"] == "Set"] == [
        [["Z:ACLTST", 3.0]]
    ]
    wait_for(lambda: audit_health() == health_pb2.HealthCheckResponse.SERVING, what="audit SERVING")


def test_a_write_right_after_the_audit_file_is_deleted_is_refused(serve, tmp_path):
    """The first write after a deletion (before the server's own check) went to no file: refused."""
    path = tmp_path / "audit.jsonl"
    fake = _fake()
    s = serve(fake, audit_log=AuditLog(str(path)))
    path.unlink()
    code, _ = _refused(lambda: s.set("Z:ACLTST", 2.0))
    assert code == grpc.StatusCode.UNAVAILABLE and fake.writes == []
    assert [st.status_code for st in s.set("Z:ACLTST", 3.0).status] == [0]  # a new file under the name
    assert [e["values"] for e in read_audit(str(path)) if e["method"] == "Set"] == [[["Z:ACLTST", 3.0]]]


def test_unaudited_writes_can_be_allowed(serve, tmp_path):
    os.symlink("/dev/full", tmp_path / "audit.jsonl")
    fake = _fake()
    s = serve(fake, audit_log=AuditLog(str(tmp_path / "audit.jsonl")), allow_unaudited_writes=True)
    assert [st.status_code for st in s.set("Z:ACLTST", 5.0).status] == [0]
    assert fake.writes == [("Z:ACLTST", 5.0)]


# -- finding 7: garbage bodies ---------------------------------------------------------------------


@pytest.mark.parametrize("method", ["Read", "Set"])
def test_a_body_that_is_not_protobuf_is_invalid_argument_logged_and_audited(serve, tmp_path, log_lines, method):
    path = str(tmp_path / "audit.jsonl")
    s = serve(audit_log=AuditLog(path))
    raw = b"\xff\xff\xff\xff\x0f" * 20
    if method == "Read":
        call = s.channel.unary_stream(f"/services.daq.DAQ/{method}")
        code, details = _refused(lambda: list(call(raw, timeout=5)))
    else:
        call = s.channel.unary_unary(f"/services.daq.DAQ/{method}")
        code, details = _refused(lambda: call(raw, timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "100 bytes" in details
    s.server.servicer.audit.flush()
    (entry,) = [e for e in read_audit(path) if e["dir"] == "in"]
    assert entry["method"] == method and entry["allowed"] is False
    assert entry["reason"].startswith("INVALID_ARGUMENT: request is not a")
    assert not [r for r in log_lines if r.levelno >= logging.ERROR]  # no traceback per call
    assert [r for r in log_lines if f"rpc={method}" in r.getMessage() and "decision=invalid" in r.getMessage()]


# -- finding 9: refusals reported as refusals -------------------------------------------------------


def test_a_read_over_the_stream_limit_is_audited_and_counted_as_a_refusal(serve, tmp_path):
    path = str(tmp_path / "audit.jsonl")
    s = serve(audit_log=AuditLog(path), limits=ServicerLimits(max_streams=1))
    first = s.stub.Read(DAQ_pb2.ReadingList(drf=["M:OUTTMP@p,1000"]), timeout=30)
    wait_for(lambda: s.server.servicer.active_streams == 1, what="one open stream")
    code, details = _refused(lambda: s.read(["M:OUTTMP@p,1000"]))
    first.cancel()
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "too many open streams" in details
    s.server.servicer.audit.flush()
    entries = [e for e in read_audit(path) if e["dir"] == "in"]
    assert [e["allowed"] for e in entries] == [True, False]
    assert entries[1]["reason"].startswith("RESOURCE_EXHAUSTED: too many open streams")
    requests = s.server.servicer.stats.requests
    assert requests[("Read", "limit")] == 1 and requests[("Read", "error")] == 0


# -- finding 11: one authorization header ------------------------------------------------------------


def test_more_than_one_authorization_header_is_refused(serve):
    fake = _fake()
    s = serve(fake, token=TOKEN)
    both = [("authorization", "Bearer wrong"), ("authorization", f"Bearer {TOKEN}")]
    code, details = _refused(lambda: s.set("Z:ACLTST", 1.0, metadata=both))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "more than one authorization" in details
    same = [("authorization", f"Bearer {TOKEN}")] * 2
    assert _refused(lambda: s.set("Z:ACLTST", 1.0, metadata=same))[0] == grpc.StatusCode.UNAUTHENTICATED
    assert fake.writes == []
    assert [st.status_code for st in s.set("Z:ACLTST", 1.0, metadata=same[:1]).status] == [0]


# -- finding 6: per-client limits ----------------------------------------------------------------------


def test_one_client_cannot_take_every_stream(serve):
    # Two clients on one host: one over IPv4 loopback, one over IPv6 loopback (the server listens
    # on [::], both families, with no name to resolve; nothing is sent off loopback).
    s = serve(host="[::]", limits=ServicerLimits(max_streams=10, max_streams_per_peer=3))
    greedy = DAQ_pb2_grpc.DAQStub(s.channel)
    calls = [greedy.Read(DAQ_pb2.ReadingList(drf=["M:OUTTMP@p,1000"]), timeout=30) for _ in range(3)]
    wait_for(lambda: s.server.servicer.active_streams == 3, what="three streams")
    code, details = _refused(lambda: list(greedy.Read(DAQ_pb2.ReadingList(drf=["M:OUTTMP@p,1000"]), timeout=5)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "ipv4:127.0.0.1" in details
    with grpc.insecure_channel(f"[::1]:{s.server.port}") as other:
        call = DAQ_pb2_grpc.DAQStub(other).Read(DAQ_pb2.ReadingList(drf=["M:OUTTMP@p,1000"]), timeout=30)
        wait_for(lambda: s.server.servicer.active_streams == 4, what="the other client's stream")
        call.cancel()
    for c in calls:
        c.cancel()
    assert s.server.servicer.stats.limits_hit["max_streams_per_peer"] == 1


def test_health_watch_streams_have_limits_of_their_own(serve):
    s = serve(limits=ServicerLimits(max_streams=1, max_health_watches_per_peer=3))
    health = health_pb2_grpc.HealthStub(s.channel)
    watches = [health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30) for _ in range(3)]
    for w in watches:
        next(w)  # each is open and has answered
    code, _ = _refused(lambda: next(health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=5)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert s.server.servicer.stats.limits_hit["max_health_watches_per_peer"] == 1
    stream = s.stub.Read(DAQ_pb2.ReadingList(drf=["M:OUTTMP@p,1000"]), timeout=10)
    # Admitted: the watches hold none of the streams (max_streams is 1).
    wait_for(lambda: s.server.servicer.active_streams == 1, what="the stream admitted")
    assert stream.running()
    stream.cancel()
    for w in watches:
        w.cancel()
    wait_for(lambda: s.server.health._watches == 0, what="watches closed")


def test_one_shot_calls_in_flight_are_limited_per_client(serve):
    class Slow(FakeBackend):
        def __init__(self):
            super().__init__()
            self.release = threading.Event()

        def get_many(self, drfs, timeout=None):
            self.release.wait(10)
            return super().get_many(drfs, timeout)

    slow = Slow()
    slow.set_reading("M:OUTTMP", 1.0)
    s = serve(slow, limits=ServicerLimits(max_calls_per_peer=2))
    futures = [s.stub.Read(DAQ_pb2.ReadingList(drf=["M:OUTTMP@I"]), timeout=20) for _ in range(2)]
    wait_for(lambda: sum(p.calls for p in s.server.servicer.peers._table.values()) == 2, what="two calls in flight")
    code, details = _refused(lambda: s.read(["M:OUTTMP@I"]))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "calls in flight" in details
    slow.release.set()
    for f in futures:
        assert len(list(f)) == 1
    assert len(s.read(["M:OUTTMP@I"])) == 1


# -- finding 5: what one request and one client can ask ---------------------------------------------


@pytest.mark.parametrize("drf", ["M:OUTTMP@p,0", "M:OUTTMP@q,0", "M:OUTTMP@p,1000K", "M:OUTTMP@P,500U"])
def test_periods_faster_than_the_daq_are_refused(serve, drf):
    s = serve()
    code, details = _refused(lambda: s.read([drf]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "shorter than the shortest allowed" in details
    assert s.server.servicer.stats.limits_hit["max_rate_hz"] == 1


def test_a_stream_asking_for_more_readings_than_its_budget_is_refused(serve):
    s = serve()
    drfs = [f"Z:SIM{i:03d}@p,1" for i in range(1000)]  # 1,000,000 readings/s
    code, details = _refused(lambda: s.read(drfs))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "1000000 readings/s" in details
    assert s.server.servicer.stats.limits_hit["max_stream_rate"] == 1


def test_a_clients_streams_share_one_budget(serve):
    s = serve(limits=ServicerLimits(max_stream_rate=100, max_peer_rate=150))
    first = s.stub.Read(DAQ_pb2.ReadingList(drf=["M:OUTTMP@p,10"]), timeout=30)  # 100/s
    wait_for(lambda: s.server.servicer.active_streams == 1, what="first stream")
    code, details = _refused(lambda: s.read(["M:OUTTMP@p,10"]))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "200 readings/s" in details
    assert len(s.read(["M:OUTTMP@I"])) == 1  # one-shot reads are not streams
    first.cancel()
    assert s.server.servicer.stats.limits_hit["max_peer_rate"] == 1


def test_delivery_beyond_the_budget_is_paced_and_the_client_loses_its_own_oldest(serve):
    fake = _fake()
    # An event DRF counts 15/s at the door; the backend sends far more: delivery is paced.
    s = serve(fake, limits=ServicerLimits(max_stream_rate=50, stream_buffer=10))
    call = s.stub.Read(DAQ_pb2.ReadingList(drf=["M:OUTTMP@e,02"]), timeout=30)
    wait_for(lambda: s.server.servicer.active_streams == 1, what="stream open")
    received = []

    def reader():
        try:
            for reply in call:
                received.append(reply)
        except grpc.RpcError:
            pass  # cancelled at the end

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    started = time.monotonic()
    for i in range(2000):
        fake.emit_reading("M:OUTTMP@e,02", float(i))
        if i % 100 == 0:
            time.sleep(0.01)
    elapsed = time.monotonic() - started
    wait_for(lambda: s.server.servicer.stats.limits_hit["max_stream_rate"] > 0, what="pacing")
    call.cancel()
    t.join(10)
    # At most one second's burst plus the rate for the time it ran (and a margin for timing).
    assert len(received) <= 50 + 50 * (elapsed + 2), (len(received), elapsed)
    assert s.server.servicer.dropped_now() > 0 or s.server.servicer.stats.readings_dropped > 0


# -- finding 10: the status view -----------------------------------------------------------------------


def _status(channel, metadata=None):
    return json.loads(channel.unary_unary("/pacsys.supervisor.Admin/Status")(b"", timeout=5, metadata=metadata))


def test_status_answers_local_clients_and_remote_ones_with_the_token(serve):
    """A remote client stands here as a forwarded address from a trusted proxy on loopback
    (192.0.2.7, a documentation address, is a label in a header: nothing is sent to it)."""
    remote = [("x-forwarded-for", "192.0.2.7")]
    proxied = {"trusted_proxies": ["127.0.0.1"], "allow_token_plaintext": True}

    def auth(token):
        return [*remote, ("authorization", f"Bearer {token}")]

    s = serve(token=TOKEN, **proxied)
    assert _refused(lambda: _status(s.channel, remote))[0] == grpc.StatusCode.UNAUTHENTICATED
    view = _status(s.channel, auth(TOKEN))
    assert view["pid"] == os.getpid()
    s.server.admin_token = "admin-only"
    assert _refused(lambda: _status(s.channel, auth(TOKEN)))[0] == grpc.StatusCode.UNAUTHENTICATED
    assert _status(s.channel, auth("admin-only"))["pid"] == os.getpid()
    open_ = serve(**proxied)  # no token at all: local clients only
    code, details = _refused(lambda: _status(open_.channel, remote))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "local clients only" in details
    assert _status(open_.channel)["pid"] == os.getpid()  # the proxy's own call is local
    local = serve(token=TOKEN)
    assert _status(local.channel)["pid"] == os.getpid()


# -- the token over plaintext -----------------------------------------------------------------------------


def test_a_token_over_plaintext_is_refused_unless_allowed(serve):
    fake = _fake()
    s = serve(fake, token=TOKEN, allow_token_plaintext=False)
    code, details = _refused(lambda: s.set("Z:ACLTST", 1.0, metadata=[("authorization", f"Bearer {TOKEN}")]))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "plaintext" in details
    assert fake.writes == []
    loopback = serve(fake, token=TOKEN)  # the default on a loopback bind: allowed
    assert loopback.set("Z:ACLTST", 1.0, metadata=[("authorization", f"Bearer {TOKEN}")]).status[0].status_code == 0


# -- finding 8: the metrics port ------------------------------------------------------------------------


def _http_get(port, path):
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
        return reply.status, reply.read().decode()


def test_idle_metrics_connections_cost_no_thread_and_time_out(serve):
    from pacsys.supervised.metrics import MetricsServer

    s = serve()
    metrics = MetricsServer(s.server, port=0, host="127.0.0.1", max_connections=50, timeout=1.0)
    metrics.start()
    limits = s.server.servicer.stats.limits_hit
    idle = []
    try:
        assert _http_get(metrics.port, "/readyz") == (200, "ready\n")
        threads_before = threading.active_count()
        for _ in range(200):
            idle.append(socket.create_connection(("127.0.0.1", metrics.port), timeout=5))
        assert threading.active_count() <= threads_before + 1
        started = time.monotonic()
        status, text = _http_get(metrics.port, "/metrics")
        assert status == 200 and "pacsys_limits_hit_total" in text
        assert time.monotonic() - started < 5  # generous on a loaded machine; a thread per connection took seconds
        # The kernel hands each silent connection over after about the timeout; the server then
        # ends every one: those beyond 8 from this address at once (the oldest silent one gives
        # way to each newcomer), the last 8 after the timeout.
        wait_for(
            lambda: limits["metrics_max_connections_per_address"] + limits["metrics_timeout"] >= 200,
            what="every idle connection ended by the server",
        )
        assert limits["metrics_max_connections_per_address"] >= 150 and limits["metrics_timeout"] >= 1, limits
        for sock in idle:
            sock.settimeout(10)
            try:
                assert sock.recv(1) == b""  # timed out: closed
            except ConnectionResetError:
                pass  # evicted: reset
    finally:
        for sock in idle:
            sock.close()
        metrics.stop()


def test_a_health_watch_of_a_huge_service_name_is_refused(serve):
    s = serve()
    health = health_pb2_grpc.HealthStub(s.channel)
    code, _ = _refused(lambda: next(health.Watch(health_pb2.HealthCheckRequest(service="x" * 100_000), timeout=5)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert s.server.servicer.peers.streams == 0


@pytest.mark.parametrize(
    ("peer", "local"),
    [
        ("ipv4:127.0.0.1:5000", True),
        ("ipv4:127.0.0.2:5000", True),
        ("ipv6:%5B::1%5D:39092", True),
        ("ipv6:[::1]:39092", True),
        ("ipv6:%5B::ffff:127.0.0.1%5D:1", True),
        ("unix:/run/pacsys.sock", True),
        ("ipv4:10.0.0.5:5000", False),
        ("ipv6:%5Bfd00::2%5D:5000", False),
        ("ipv6:%5B::ffff:10.0.0.5%5D:1", False),
        ("garbage", False),
    ],
)
def test_which_peers_are_local(peer, local):
    from pacsys.supervised._peers import is_loopback

    assert is_loopback(peer) is local
