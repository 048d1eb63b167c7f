"""Fuzzed requests through a real server on loopback: never INTERNAL or UNKNOWN, never past the
deadline. A few hundred examples per property, so the suite stays fast."""

import grpc
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2, DAQ_pb2_grpc
from pacsys.drf import DRFError, parse_cached
from pacsys.supervised import ServicerLimits, SupervisedServer
from pacsys.testing import FakeBackend

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED}
TOKEN = "t0ken"


@pytest.fixture(scope="module")
def daq():
    fake = FakeBackend()
    fake.set_reading("M:OUTTMP", 72.5)
    server = SupervisedServer(
        fake, port=0, host="127.0.0.1", token=TOKEN, limits=ServicerLimits(refusal_log_interval=60.0)
    )
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield channel, DAQ_pb2_grpc.DAQStub(channel)
    channel.close()
    server.stop()


def _outcome(call):
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _is_stream(drf):
    try:
        return not parse_cached(drf).is_oneshot
    except DRFError:
        return False


_TEXT = st.text(st.characters(codec="utf-8"), max_size=700)


@FUZZ
@given(st.lists(_TEXT, max_size=4))
def test_fuzzed_one_shot_reads(daq, drfs):
    _, stub = daq
    request = DAQ_pb2.ReadingList(drf=[d + "@I" for d in drfs])
    assume(not any(_is_stream(d) for d in request.drf))  # "0@I" is device 0:I, a subscription
    assert _outcome(lambda: list(stub.Read(request, timeout=10))) not in NEVER


@FUZZ
@given(
    st.lists(
        st.tuples(_TEXT, st.one_of(st.floats(), st.text(max_size=50), st.none())),
        max_size=4,
    ),
    st.sampled_from([None, f"Bearer {TOKEN}", "Bearer wrong", "garbage"]),
)
def test_fuzzed_settings(daq, settings_, authorization):
    _, stub = daq
    request = DAQ_pb2.SettingList()
    for device, value in settings_:
        s = request.setting.add()
        s.device = device
        if isinstance(value, float):
            s.value.scalar = value
        elif isinstance(value, str):
            s.value.text = value
    metadata = [("authorization", authorization)] if authorization else None
    assert _outcome(lambda: stub.Set(request, timeout=10, metadata=metadata)) not in NEVER


@FUZZ
@given(st.binary(max_size=300), st.sampled_from(["Read", "Set"]))
def test_fuzzed_bodies(daq, body, method):
    channel, _ = daq
    if method == "Read":
        call = channel.unary_stream("/services.daq.DAQ/Read")
        outcome = _outcome(lambda: list(call(body, timeout=10)))
    else:
        outcome = _outcome(lambda: channel.unary_unary("/services.daq.DAQ/Set")(body, timeout=10))
    assert outcome not in NEVER
