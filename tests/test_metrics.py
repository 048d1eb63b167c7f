"""Metrics and HTTP probes scraped over real HTTP after known traffic."""

import importlib.metadata
import os
import platform
import signal
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import FAST, wait_for

from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2, DAQ_pb2_grpc
from pacsys.pool.pool import WorkerPool
from pacsys.supervised import ReadOnlyPolicy, SupervisedServer
from pacsys.supervised.metrics import SLOT_STATES, MetricsServer
from pacsys.testing import FakeBackend


def _get(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _value(text, name, **labels):
    want = {f'{k}="{v}"' for k, v in labels.items()}
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        metric, _, label_text = series.partition("{")
        if metric == name and set(filter(None, label_text.rstrip("}").split(","))) == want:
            return float(value)
    raise AssertionError(f"{name} {labels} not in the metrics")


@pytest.fixture
def stack():
    pool = WorkerPool(backend="sim", workers=2, **FAST)
    server = SupervisedServer(pool, port=0, host="127.0.0.1", policies=[ReadOnlyPolicy()], close_backend=True)
    server.start()
    metrics = MetricsServer(server, port=0, host="127.0.0.1")
    metrics.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield server, pool, metrics, DAQ_pb2_grpc.DAQStub(channel)
    channel.close()
    metrics.stop()
    server.stop()


def test_labelled_counters_start_at_zero_for_every_known_value(stack):
    """So that increase() sees the first exit of each reason, the first refusal of each kind."""
    from pacsys.pool.supervision import EndReason
    from pacsys.supervised.metrics import DECISIONS, LIMITS

    server, pool, metrics, stub = stack
    status, text = _get(metrics.port, "/metrics")
    assert status == 200
    for rpc in ("Read", "Set"):
        for decision in DECISIONS:
            assert _value(text, "pacsys_requests_total", rpc=rpc, decision=decision) == 0
    assert _value(text, "pacsys_policy_denials_total", policy="ReadOnlyPolicy") == 0
    for limit in LIMITS:
        assert _value(text, "pacsys_limits_hit_total", limit=limit) == 0
    for reason in EndReason:
        if reason.is_exit:
            assert _value(text, "pacsys_worker_exits_total", reason=reason) == 0
        if reason.is_recycle:
            assert _value(text, "pacsys_worker_recycles_total", reason=reason) == 0
    # And each counts from there.
    with pytest.raises(grpc.RpcError):
        list(stub.Read(DAQ_pb2.ReadingList(drf=["M:OUTTMP@p,0"]), timeout=5))
    text = _get(metrics.port, "/metrics")[1]
    assert _value(text, "pacsys_limits_hit_total", limit="max_rate_hz") == 1
    assert _value(text, "pacsys_requests_total", rpc="Read", decision="limit") == 1


def test_every_limit_counted_in_the_code_is_a_known_one_and_a_setting():
    """The known limits (exported at 0) cover every name the code counts a limit under."""
    import re
    from pathlib import Path

    from pacsys.settings import FIELDS
    from pacsys.supervised._queue_budget import PER_PEER, SERVICE
    from pacsys.supervised.metrics import LIMITS

    root = Path(__file__).resolve().parent.parent
    source = "\n".join(p.read_text() for p in (root / "pacsys").rglob("*.py"))
    counted = set(re.findall(r'limits_hit\["(\w+)"\]', source)) | set(re.findall(r'PeerLimit\(\s*"(\w+)"', source))
    counted |= {f"max_{what}_per_request" for what in ("drfs", "settings")}  # limits_hit[f"max_{what}_per_request"]
    counted |= {"max_stream_rate", "max_peer_rate"}  # chosen by a conditional expression
    counted |= {PER_PEER, SERVICE}  # limits_hit[cut.limit]: the queue budget's
    assert counted == set(LIMITS)
    assert set(LIMITS) <= set(FIELDS)


def test_metrics_count_known_traffic(stack):
    server, pool, metrics, stub = stack
    for _ in range(3):
        list(stub.Read(DAQ_pb2.ReadingList(drf=["M:OUTTMP@I", "G:AMANDA@I"]), timeout=5))
    request = DAQ_pb2.SettingList(setting=[DAQ_pb2.Setting(device="Z:ACLTST")])
    request.setting[0].value.scalar = 1.0
    with pytest.raises(grpc.RpcError):
        stub.Set(request, timeout=5)
    call = stub.Read(DAQ_pb2.ReadingList(drf=["Z:SIM001@p,50"]))
    next(call)
    status, text = _get(metrics.port, "/metrics")
    assert status == 200
    assert _value(text, "pacsys_requests_total", rpc="Read", decision="allow") == 4
    assert _value(text, "pacsys_requests_total", rpc="Set", decision="denied") == 1
    assert _value(text, "pacsys_policy_denials_total", policy="ReadOnlyPolicy") == 1
    assert _value(text, "pacsys_request_latency_seconds_count", rpc="Read") == 4
    assert _value(text, "pacsys_active_streams") == 1
    assert _value(text, "pacsys_backend_subscriptions") == 1
    assert _value(text, "pacsys_worker_up", slot="0") == 1
    assert _value(text, "pacsys_worker_pid", slot="1") == pool.worker_states()[1].pid
    assert _value(text, "pacsys_worker_rss_bytes", slot="0") > 0
    call.cancel()


def test_http_probes_follow_readiness_and_liveness(tmp_path, monkeypatch):
    """No worker can start: readiness fails at once, liveness after unready_limit; both come back."""
    flag = tmp_path / "broken"
    monkeypatch.setenv("FAULT_FLAG", str(flag))
    pool = WorkerPool(backend="fault_backends:broken_everywhere_when_flagged", workers=2, unready_limit=1.0, **FAST)
    server = SupervisedServer(pool, port=0, host="127.0.0.1", close_backend=True)
    server.start()
    metrics = MetricsServer(server, port=0, host="127.0.0.1")
    metrics.start()
    try:
        assert _get(metrics.port, "/healthz")[0] == 200
        assert _get(metrics.port, "/readyz")[0] == 200
        flag.touch()
        for row in pool.worker_states():
            os.kill(row.pid, signal.SIGKILL)
        wait_for(lambda: _get(metrics.port, "/readyz")[0] == 503, what="readyz to fail")
        wait_for(lambda: _get(metrics.port, "/healthz")[0] == 503, what="healthz to fail after unready_limit")
        wait_for(lambda: _liveness(server.port) == "NOT_SERVING", what="the gRPC liveness probe to say the same")
        text = _get(metrics.port, "/metrics")[1]
        assert _value(text, "pacsys_alive") == 0
        assert _value(text, "pacsys_unready_seconds") > 1.0
        assert _value(text, "pacsys_worker_exits_total", reason="signal") == 2
        # A restart's failed start is counted once its process has started and failed: on a
        # loaded machine that can come after unready_limit.
        wait_for(
            lambda: (
                _value(_get(metrics.port, "/metrics")[1], "pacsys_worker_exits_total", reason="startup_failed") >= 1
            ),
            what="a restart's failed start counted",
        )
        assert sum(_value(text, "pacsys_worker_state", slot="0", state=s) for s in SLOT_STATES) == 1
        flag.unlink()  # the backend can start again: the pool, which never stopped trying, recovers
        wait_for(lambda: _get(metrics.port, "/healthz")[0] == 200, what="healthz back")
        wait_for(lambda: _get(metrics.port, "/readyz")[0] == 200, what="readyz back")
        wait_for(lambda: _liveness(server.port) == "SERVING", what="liveness back")
    finally:
        metrics.stop()
        server.stop()


def _liveness(port):
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=5)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def test_front_process_gc_and_build_info(stack):
    _, _, metrics, _ = stack
    _, text = _get(metrics.port, "/metrics")
    info = _value(
        text,
        "pacsys_build_info",
        version=importlib.metadata.version("pacsys-supervisor"),
        python=platform.python_version(),
    )
    assert info == 1
    assert _value(text, "process_resident_memory_bytes") > 10e6
    assert _value(text, "process_open_fds") > 0
    assert _value(text, "process_start_time_seconds") > 1.7e9
    assert _value(text, "python_gc_collections_total", generation="0") >= 0
    assert _value(text, "pacsys_log_values_cut_total") >= 0


def test_ipv6_any_address_listens_on_both_families():
    server = SupervisedServer(FakeBackend(), port=0, host="127.0.0.1")
    server.start()
    metrics = MetricsServer(server, port=0, host="[::]")
    metrics.start()
    try:
        for host in ("127.0.0.1", "[::1]"):
            with urllib.request.urlopen(f"http://{host}:{metrics.port}/healthz", timeout=5) as reply:
                assert reply.status == 200, host
    finally:
        metrics.stop()
        server.stop()


def test_stopping_with_connections_open_logs_no_error(caplog):
    """Connections still open when the metrics server stops end quietly (no asyncio ERROR traceback)."""
    import logging
    import socket

    server = SupervisedServer(FakeBackend(), port=0, host="127.0.0.1")
    server.start()
    metrics = MetricsServer(server, port=0, host="127.0.0.1", timeout=30)
    metrics.start()
    idle = [socket.create_connection(("127.0.0.1", metrics.port), timeout=5) for _ in range(3)]
    for sock in idle:
        # A request begun and never finished: the server holds the connection (a silent one
        # would wait in the kernel's queue, never accepted: TCP_DEFER_ACCEPT).
        sock.sendall(b"GET /readyz HTTP/1.0\r\n")
    try:
        assert _get(metrics.port, "/readyz") == (200, "ready\n")  # the idle ones were accepted before it
        with caplog.at_level(logging.WARNING):
            metrics.stop()
        assert not metrics._thread.is_alive()
        assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
        for sock in idle:
            sock.settimeout(5)
            assert sock.recv(1) == b""  # closed by the server
    finally:
        for sock in idle:
            sock.close()
        server.stop()
