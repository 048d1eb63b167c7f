"""Health (Check, Watch, List), reflection (v1 and v1alpha) and the status RPC, seen through real gRPC clients."""

import json
import logging
import os
import signal

import grpc
import pytest
from google.protobuf.descriptor_pb2 import FileDescriptorProto
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from helpers import FAST, wait_for

from pacsys.pool.pool import WorkerPool
from pacsys.supervised import SupervisedServer, cli
from pacsys.testing import FakeBackend

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _check(channel, service):
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


@pytest.fixture
def pool_server(tmp_path, monkeypatch):
    # While $FAULT_FLAG exists no worker can start: the slot keeps trying, and stays down.
    monkeypatch.setenv("FAULT_FLAG", str(tmp_path / "broken"))
    pool = WorkerPool(backend="fault_backends:broken_everywhere_when_flagged", workers=1, **FAST)
    server = SupervisedServer(pool, port=0, host="127.0.0.1", close_backend=True)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield server, pool, channel
    channel.close()
    server.stop()


def test_health_follows_the_workers_and_the_drain(pool_server, tmp_path):
    server, pool, channel = pool_server
    for service in ("", "services.daq.DAQ", "liveness", "readiness"):
        assert _check(channel, service) == SERVING
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service="readiness"))
    assert next(watch).status == SERVING
    (tmp_path / "broken").touch()
    os.kill(pool.worker_states()[0].pid, signal.SIGKILL)  # and its replacements cannot start
    assert next(watch).status == NOT_SERVING
    assert _check(channel, "") == NOT_SERVING
    assert _check(channel, "liveness") == SERVING
    watch.cancel()
    addr = f"127.0.0.1:{server.port}"
    assert cli.main(["probe", "--addr", addr]) == 1  # not serving
    assert cli.main(["probe", "--addr", addr, "--service", "liveness"]) == 0


def test_probe_exit_codes_follow_the_service(pool_server):
    server, _, _ = pool_server
    assert cli.main(["probe", "--addr", f"127.0.0.1:{server.port}"]) == 0
    server.stop()
    assert cli.main(["probe", "--addr", f"127.0.0.1:{server.port}", "--timeout", "2"]) == 2  # unreachable


def test_drain_reports_not_serving_before_the_port_closes():
    server = SupervisedServer(FakeBackend(), port=0, host="127.0.0.1", shutdown_grace=1.0)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
    assert next(watch).status == SERVING
    server.stop()
    statuses = []
    try:
        for reply in watch:
            statuses.append(reply.status)
    except grpc.RpcError:
        pass
    assert statuses[:1] == [NOT_SERVING]
    channel.close()


def test_reflection_lists_the_daq_service(pool_server):
    _, _, channel = pool_server
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (reply,) = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
    names = {s.name for s in reply.list_services_response.service}
    assert {"services.daq.DAQ", "grpc.health.v1.Health"} <= names


def test_status_rpc_describes_the_workers(pool_server):
    server, pool, channel = pool_server
    status = channel.unary_unary("/pacsys.supervisor.Admin/Status")
    view = json.loads(status(b"", timeout=5))
    assert view["ready"] is True
    (worker,) = view["workers"]
    assert worker["pid"] == pool.worker_states()[0].pid and worker["state"] == "ready"
    wait_for(lambda: json.loads(status(b"", timeout=5))["workers"][0].get("rss_bytes", 0) > 0, what="rss")


def test_health_list_answers_every_known_service(pool_server, caplog, tmp_path):
    server, pool, channel = pool_server
    stub = health_pb2_grpc.HealthStub(channel)
    reply = stub.List(health_pb2.HealthListRequest(), timeout=5)
    assert {name: s.status for name, s in reply.statuses.items()} == {
        "": SERVING,
        "services.daq.DAQ": SERVING,
        "readiness": SERVING,
        "liveness": SERVING,
    }
    (tmp_path / "broken").touch()
    os.kill(pool.worker_states()[0].pid, signal.SIGKILL)  # and its replacements cannot start
    wait_for(lambda: _check(channel, "readiness") == NOT_SERVING, what="NOT_SERVING")
    reply = stub.List(health_pb2.HealthListRequest(), timeout=5)
    assert reply.statuses["readiness"].status == NOT_SERVING and reply.statuses["liveness"].status == SERVING


def test_a_clients_unimplemented_call_is_not_an_error(pool_server, caplog):
    _, _, channel = pool_server
    for method in ("/grpc.health.v1.Health/NoSuchMethod", "/no.such.Service/Call", "/services.daq.DAQ/Delete"):
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary(method)(b"", timeout=5)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED, method
    health_pb2_grpc.HealthStub(channel).List(health_pb2.HealthListRequest(), timeout=5)
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_answers_on_v1_and_v1alpha(pool_server, version):
    _, _, channel = pool_server
    # v1 and v1alpha messages have the same fields and numbers: one set of classes speaks both.
    call = channel.stream_stream(
        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="services.daq.DAQ"),
    ]
    listed, described = list(call(iter(requests), timeout=5))
    names = {s.name for s in listed.list_services_response.service}
    assert names == {
        "services.daq.DAQ",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    files = [FileDescriptorProto.FromString(b) for b in described.file_descriptor_response.file_descriptor_proto]
    assert any(s.name == "DAQ" for f in files for s in f.service)
