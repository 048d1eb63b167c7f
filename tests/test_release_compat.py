"""Public behaviours shared with the pacsys release (0.3.0), one test per behaviour of issue 13.

Each was checked against the release side by side; the tests state what it does.
"""

import asyncio
import json
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2, DAQ_pb2_grpc
from pacsys.aio import AsyncBackend
from pacsys.backends import Backend
from pacsys.drf import prepare_for_write
from pacsys.drf_utils import get_device_name
from pacsys.errors import DeviceError
from pacsys.supervised import AuditLog, PolicyDecision, RequestContext, SupervisedServer, read_audit
from pacsys.testing import AsyncFakeBackend, FakeBackend
from pacsys.types import BackendCapability, DeviceMeta, DispatchMode, Reading, ValueType

ROOT = Path(__file__).resolve().parent.parent


# 1 ---------------------------------------------------------------------------------------------


def test_1_audit_takes_the_decision_and_out_lines_carry_the_peer(tmp_path):
    path = tmp_path / "audit.jsonl"
    ctx = RequestContext(["M:OUTTMP@I"], "Read", "ipv4:10.0.0.7:4000", {}, [], None, frozenset({0}))
    with AuditLog(path, log_responses=True) as audit:
        seq = audit.log_request(ctx, PolicyDecision(True))
        audit.log_response(seq, "ipv4:10.0.0.7:4000", "Read", DAQ_pb2.ReadingReply(index=0))
        denied = audit.log_request(ctx, PolicyDecision(False, "Device M:OUTTMP is denied", policy="deny"))
    assert (seq, denied) == (1, 2)
    first, out, second = read_audit(path)
    assert first["allowed"] is True and first["reason"] is None
    assert out["dir"] == "out" and out["seq"] == 1 and out["peer"] == "ipv4:10.0.0.7:4000"
    assert second["allowed"] is False and second["reason"] == "Device M:OUTTMP is denied"


# 2 ---------------------------------------------------------------------------------------------


def test_2_fake_dispatches_callbacks_synchronously_by_default():
    fb = FakeBackend()
    assert fb.dispatch_mode is DispatchMode.DIRECT
    got = []
    fb.subscribe(["M:OUTTMP"], callback=lambda reading, _h: got.append(reading.value))
    fb.emit_reading("M:OUTTMP", 1.5)
    assert got == [1.5]  # delivered before emit_reading returned


# 3 ---------------------------------------------------------------------------------------------


def test_3_emit_error_ends_subscriptions_with_the_exception():
    fb = FakeBackend()
    errors = []
    handle = fb.subscribe(["M:OUTTMP"], callback=lambda r, h: None, on_error=lambda exc, h: errors.append(exc))
    boom = RuntimeError("boom")
    fb.emit_error(boom)
    assert handle.exc is boom and handle.stopped and errors == [boom]

    async def async_twin():
        afb = AsyncFakeBackend()
        h = await afb.subscribe(["M:OUTTMP"])
        afb.emit_error(boom)
        with pytest.raises(RuntimeError, match="boom"):
            async for _ in h.readings(timeout=5):
                pass

    asyncio.run(async_twin())


# 4 ---------------------------------------------------------------------------------------------


def test_4_set_write_result_error_code_fails_the_next_write():
    fb = FakeBackend()
    fb.set_write_result("M:OUTTMP", error_code=-99)
    result = fb.write("M:OUTTMP", 1.0)
    assert result.error_code == -99 and result.success is False
    fb.set_write_result("M:OUTTMP", success=False)
    assert fb.write("M:OUTTMP", 1.0).error_code == -1


# 5 ---------------------------------------------------------------------------------------------


def test_5_unconfigured_device_and_unset_property():
    fb = FakeBackend()
    nope = fb.get("M:NOPE")
    assert (nope.facility_code, nope.error_code, nope.message) == (1, -1, "No reading configured for M:NOPE")
    fb.set_reading("M:OUTTMP", 72.5)
    setting = fb.get("M:OUTTMP.SETTING")
    assert (setting.facility_code, setting.error_code) == (16, -13)
    assert setting.message == "No such property for M:OUTTMP" and setting.value is None


# 6 ---------------------------------------------------------------------------------------------


def test_6_units_and_description_fill_the_meta():
    fb = FakeBackend()
    fb.set_reading("M:OUTTMP", 72.5, units="degF", description="outdoor temperature")
    reading = fb.get("M:OUTTMP")
    assert isinstance(reading.meta, DeviceMeta)
    assert (reading.meta.name, reading.meta.units, reading.meta.description) == (
        "M:OUTTMP",
        "degF",
        "outdoor temperature",
    )
    assert reading.units == "degF"
    got = []
    fb.subscribe(["M:OUTTMP"], callback=lambda r, h: got.append(r))
    fb.emit_reading("M:OUTTMP", 73.0, units="degC")
    assert got[0].meta.units == "degC"


# 7 ---------------------------------------------------------------------------------------------


def test_7_ranged_reads_and_writes():
    fb = FakeBackend()
    fb.set_reading("B:HS23T", [1.0, 2.0, 3.0, 4.0, 5.0])
    assert fb.read("B:HS23T[0:2]") == [1.0, 2.0, 3.0]
    assert fb.read("B:HS23T[3]") == 4.0
    assert fb.write("B:HS23T.READING[1:2]@N", [20.0, 30.0]).success
    assert fb.read("B:HS23T") == [1.0, 20.0, 30.0, 4.0, 5.0]


# 8 ---------------------------------------------------------------------------------------------


def test_8_event_offsets_tell_which_event_a_reading_answers():
    fb = FakeBackend()
    when = datetime(2026, 1, 1, tzinfo=UTC)
    fb.set_reading("M:OUTTMP", 72.5, timestamp=when)

    def shifted(drf):
        r = fb.get(drf)
        return round(r.value - 72.5, 6), r.timestamp - when

    for exact in ("M:OUTTMP", "M:OUTTMP@I", "M:OUTTMP@U"):
        assert shifted(exact) == (0, timedelta(0))
    assert shifted("M:OUTTMP@p,500") == (0.5, timedelta(microseconds=500))
    assert shifted("M:OUTTMP@q,1000") == (1.0, timedelta(milliseconds=1))
    assert shifted("M:OUTTMP@e,02") == (-0.02, timedelta(microseconds=20))
    assert shifted("M:OUTTMP@e,02,e,100") == (-0.021, timedelta(microseconds=21))
    text = "s,M:OUTTMP,1,0,="
    offset = 2 + (sum(map(ord, text)) % 1000) / 1000
    assert shifted(f"M:OUTTMP@{text}")[0] == pytest.approx(offset) == pytest.approx(2.073)
    with pytest.raises(DeviceError):
        fb.read("M:OUTTMP@N")
    fb.set_reading("M:OUTTMP@p,500", 1.0)
    fb.set_reading("M:OUTTMP@e,02", 2.0)
    assert (fb.read("M:OUTTMP@p,500"), fb.read("M:OUTTMP@e,02")) == (1.0, 2.0)


# 9 ---------------------------------------------------------------------------------------------

_NUMPY_CHECK = """
import json, sys
sys.path.insert(0, sys.argv[1])  # this project's pacsys, not the release's
import numpy as np
import pacsys.types
from pacsys.types import Reading, ValueType
assert pacsys.types.__file__.startswith(sys.argv[1]), pacsys.types.__file__
r = Reading(drf="B:X", value_type=ValueType.SCALAR_ARRAY, value=np.array([1.0, 2.0]))
same = Reading(drf="B:X", value_type=ValueType.SCALAR_ARRAY, value=np.array([1.0, 2.0]))
assert isinstance(r.value, np.ndarray)
assert r == same and hash(r) == hash(same) and len({r, same}) == 1
timed = Reading(
    drf="B:X", value_type=ValueType.TIMED_SCALAR_ARRAY,
    value={"data": np.array([1.0, 2.0]), "micros": np.array([10, 20])},
)
text = json.dumps(timed.to_dict())
assert json.loads(text)["value"] == {"data": [1.0, 2.0], "micros": [10, 20]}
hash(timed)
print("ok")
"""


def test_9_numpy_arrays_are_kept_hashable_and_json_safe():
    # numpy is not a dependency of this project; the release's venv has it.
    from release_venv import release_python

    out = subprocess.run(
        [str(release_python()), "-I", "-c", _NUMPY_CHECK, str(ROOT)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# 10 --------------------------------------------------------------------------------------------


class Informative(AsyncBackend):
    """Answers every DRF with a good reading carrying DBM 16 "info" and no timestamp."""

    @property
    def capabilities(self):
        return BackendCapability.READ

    async def get_many(self, drfs, timeout=None):
        return [Reading(drf=d, value_type=ValueType.SCALAR, value=1.0, facility_code=16, message="info") for d in drfs]

    async def close(self):
        pass


def _read_one(port):
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        (reply,) = DAQ_pb2_grpc.DAQStub(channel).Read(DAQ_pb2.ReadingList(drf=["M:OUTTMP@I"]), timeout=10)
    return reply.readings.reading[0]


def test_10_wire_passes_the_status_on_and_invents_no_timestamp(running):
    with SupervisedServer(Informative(), port=0, host="127.0.0.1") as srv:
        in_process = _read_one(srv.port)
    through_workers = _read_one(running(backend="test_release_compat:Informative", workers=1).server.port)
    for reading in (in_process, through_workers):
        assert reading.data.scalar == 1.0
        assert (reading.status.facility_code, reading.status.status_code, reading.status.message) == (16, 0, "info")
        assert not reading.HasField("timestamp")


# 11 --------------------------------------------------------------------------------------------


def test_11_fakes_are_authenticated_and_async_backends_say_so():
    for fake in (FakeBackend(), AsyncFakeBackend()):
        assert fake.authenticated is True and fake.principal == "test-user@FNAL.GOV"
    for base in (Backend, AsyncBackend):
        assert isinstance(base.authenticated, property) and isinstance(base.principal, property)
    assert Informative().authenticated is False and Informative().principal is None


# 12 --------------------------------------------------------------------------------------------


def test_12_prepare_for_write_drops_a_status_field():
    assert prepare_for_write("M:OUTTMP.STATUS.ON") == "M:OUTTMP.CONTROL@N"
    assert prepare_for_write("M:OUTTMP.STATUS.RAW") == "M:OUTTMP.CONTROL.RAW@N"
    assert prepare_for_write("M:OUTTMP") == "M:OUTTMP.SETTING@N"


# 13 --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("drf", ["", "M:OUTTMP.FOO"])
def test_13_get_device_name_refuses_empty_and_unknown_properties(drf):
    with pytest.raises(ValueError):
        get_device_name(drf)
    assert get_device_name("m_outtmp.setting@p,1000") == "M:OUTTMP"


def test_json_of_a_reading_round_trips():
    reading = Reading(drf="M:X", value_type=ValueType.SCALAR, value=1.0, timestamp=datetime(2026, 1, 1, tzinfo=UTC))
    assert Reading.from_dict(json.loads(json.dumps(reading.to_dict()))) == reading
