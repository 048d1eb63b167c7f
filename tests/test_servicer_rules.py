"""The servicer's door: validation, limits, error mapping, policy reordering and the audit trail."""

import grpc
import pytest
from helpers import wait_for

from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2, DAQ_pb2_grpc
from pacsys.aio import AsyncBackend
from pacsys.errors import AuthenticationError
from pacsys.supervised import (
    AuditLog,
    Policy,
    PolicyDecision,
    ServicerLimits,
    SupervisedServer,
    read_audit,
)
from pacsys.testing import FakeBackend
from pacsys.types import BackendCapability


class Raising(AsyncBackend):
    """get_many raises whatever exception the test put in `error`."""

    error: BaseException = RuntimeError("boom")

    @property
    def capabilities(self):
        return BackendCapability.READ

    async def get_many(self, drfs, timeout=None):
        raise self.error

    async def close(self):
        pass


class Reverse(Policy):
    def check(self, ctx):
        from dataclasses import replace

        return PolicyDecision(allowed=True, ctx=replace(ctx, drfs=list(reversed(ctx.drfs))))


class DropLast(Policy):
    def check(self, ctx):
        from dataclasses import replace

        return PolicyDecision(allowed=True, ctx=replace(ctx, drfs=ctx.drfs[:-1]))


class Exploding(Policy):
    def check(self, ctx):
        raise KeyError("oops")


def _serve(backend, **kwargs):
    server = SupervisedServer(backend, port=0, host="127.0.0.1", **kwargs)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    return server, channel, DAQ_pb2_grpc.DAQStub(channel)


@pytest.fixture
def fake():
    fb = FakeBackend()
    fb.set_reading("M:OUTTMP", 72.5)
    fb.set_reading("G:AMANDA", 42.0)
    return fb


@pytest.fixture
def served():
    opened = []

    def serve(backend, **kwargs):
        server, channel, stub = _serve(backend, **kwargs)
        opened.append((server, channel))
        return stub

    yield serve
    for server, channel in opened:
        channel.close()
        server.stop()


def _code(call):
    with pytest.raises(grpc.RpcError) as exc_info:
        call()
    return exc_info.value.code(), exc_info.value.details()


def _read(stub, drfs):
    return list(stub.Read(DAQ_pb2.ReadingList(drf=drfs), timeout=5))


def test_bad_input_is_refused_at_the_door(served, fake):
    stub = served(fake, limits=ServicerLimits(max_drfs_per_request=3, max_settings_per_request=1))
    assert _code(lambda: _read(stub, []))[0] == grpc.StatusCode.INVALID_ARGUMENT
    code, details = _code(lambda: _read(stub, ["M:OUTTMP@I", "M:OUTTMP.FOO@I"]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "M:OUTTMP.FOO" in details
    assert _code(lambda: _read(stub, ["M:OUTTMP@I"] * 4))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    unset = DAQ_pb2.SettingList(setting=[DAQ_pb2.Setting(device="M:OUTTMP")])
    code, details = _code(lambda: stub.Set(unset, timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "M:OUTTMP" in details
    assert fake.reads == [] and fake.writes == []  # nothing malformed reached the backend


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (NotImplementedError("no"), grpc.StatusCode.UNIMPLEMENTED),
        (AuthenticationError("who"), grpc.StatusCode.UNAUTHENTICATED),
        (ValueError("bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (RuntimeError("bug"), grpc.StatusCode.INTERNAL),
    ],
)
def test_backend_errors_map_to_grpc_codes(served, error, code):
    backend = Raising()
    backend.error = error
    stub = served(backend)
    assert _code(lambda: _read(stub, ["M:OUTTMP@I"]))[0] == code


def test_a_policy_that_raises_is_internal_policy_error(served, fake):
    stub = served(fake, policies=[Exploding()])
    code, details = _code(lambda: _read(stub, ["M:OUTTMP@I"]))
    assert code == grpc.StatusCode.INTERNAL and details.startswith("Policy error")


def test_reordering_policy_keeps_reply_indices_and_dropping_is_refused(served, fake):
    stub = served(fake, policies=[Reverse()])
    replies = _read(stub, ["M:OUTTMP@I", "G:AMANDA@I"])
    values = {r.index: r.readings.reading[0].data.scalar for r in replies}
    assert values == {0: pytest.approx(72.5), 1: pytest.approx(42.0)}
    dropping = served(fake, policies=[DropLast()])
    assert _code(lambda: _read(dropping, ["M:OUTTMP@I", "G:AMANDA@I"]))[0] == grpc.StatusCode.INVALID_ARGUMENT


def test_token_gates_writes_but_not_reads(served, fake):
    stub = served(fake, token="t0ken")
    request = DAQ_pb2.SettingList()
    s = request.setting.add()
    s.device = "M:OUTTMP"
    s.value.scalar = 1.0
    assert _code(lambda: stub.Set(request, timeout=5))[0] == grpc.StatusCode.UNAUTHENTICATED
    bad = [("authorization", "Bearer nope")]
    assert _code(lambda: stub.Set(request, timeout=5, metadata=bad))[0] == grpc.StatusCode.UNAUTHENTICATED
    assert not fake.was_written("M:OUTTMP")
    good = [("authorization", "Bearer t0ken")]
    assert [x.status_code for x in stub.Set(request, timeout=5, metadata=good).status] == [0]
    assert len(_read(stub, ["M:OUTTMP@I"])) == 1


def test_audit_records_who_set_what(served, fake, tmp_path):
    audit = AuditLog(str(tmp_path / "audit.jsonl"), log_responses=True)
    stub = served(fake, audit_log=audit)
    request = DAQ_pb2.SettingList()
    s = request.setting.add()
    s.device = "M:OUTTMP"
    s.value.scalar = 80.0
    stub.Set(request, timeout=5)
    _read(stub, ["G:AMANDA@I"])
    audit.close()
    entries = list(read_audit(str(tmp_path / "audit.jsonl")))
    sets = [e for e in entries if e.get("method") == "Set" and e["dir"] == "in"]
    assert sets and sets[0]["allowed"] is True and sets[0]["drfs"] == ["M:OUTTMP"]
    assert sets[0]["values"] == [["M:OUTTMP", 80.0]]
    assert any(e["dir"] == "out" and e["seq"] == sets[0]["seq"] for e in entries)


@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])
def test_either_event_loop_serves(served, fake, event_loop):
    stub = served(fake, event_loop=event_loop)
    assert _read(stub, ["M:OUTTMP@I"])[0].readings.reading[0].data.scalar == pytest.approx(72.5)


def test_stream_buffer_limit_applies_in_process(fake):
    server, channel, stub = _serve(fake, limits=ServicerLimits(stream_buffer=5))
    try:
        call = stub.Read(DAQ_pb2.ReadingList(drf=["M:OUTTMP@p,1000"]))
        wait_for(lambda: server.servicer._streams, timeout=10, what="the stream")
        (handle,) = server.servicer._streams
        assert handle._buffer.maxlen == 5
        call.cancel()
    finally:
        channel.close()
        server.stop()


def test_audit_records_refused_writes_too(served, fake, tmp_path):
    audit = AuditLog(str(tmp_path / "audit.jsonl"))
    stub = served(fake, audit_log=audit, token="right")
    request = DAQ_pb2.SettingList(setting=[DAQ_pb2.Setting(device="M:OUTTMP")])
    request.setting[0].value.scalar = 1.0
    with pytest.raises(grpc.RpcError):
        stub.Set(request, timeout=5, metadata=[("authorization", "Bearer wrong")])
    audit.close()
    (entry,) = list(read_audit(str(tmp_path / "audit.jsonl")))
    assert entry["method"] == "Set" and entry["allowed"] is False
    assert entry["reason"].startswith("UNAUTHENTICATED") and entry["drfs"] == ["M:OUTTMP"]
