"""Machine protection (slew and range limits) holds for any shape of Set.

The policies on their own first (`_machine_protection`), then through real servers and real
gRPC clients: the simulator in process (and once behind a worker pool) for what a device
does, the FakeBackend where a backend must accept what the simulator would refuse (arrays,
raw bytes), or fail a read of the current value.
"""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
from helpers import FAST

from pacsys import status as st
from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2, DAQ_pb2_grpc
from pacsys.backends.sim import SimBackend
from pacsys.errors import BackendUnavailable
from pacsys.pool.pool import WorkerPool
from pacsys.supervised import (
    AuditLog,
    CurrentValue,
    Policy,
    PolicyDecision,
    ReadOnlyPolicy,
    RequestContext,
    SlewLimit,
    SlewRatePolicy,
    SupervisedServer,
    ValueRangePolicy,
    evaluate_policies,
    read_audit,
)
from pacsys.testing import FakeBackend
from pacsys.types import WriteResult

# -- the policies ------------------------------------------------------------------------


def set_ctx(*settings: tuple[str, object], current: dict[str, object] | None = None) -> RequestContext:
    """A Set, with the current values the gateway would have read (a str is a read error)."""
    values = {
        k: CurrentValue(error=v) if isinstance(v, str) else CurrentValue(value=v) for k, v in (current or {}).items()
    }
    return RequestContext(
        [d for d, _ in settings], "Set", "ipv4:10.0.0.1:5000", {}, list(settings), None, current=values
    )


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


UNJUDGEABLE = [
    ("M:OUTTMP", [50.0], "the value is an array"),
    ("M:OUTTMP", [5.0], "the value is an array"),  # one element, inside the range: still not a scalar
    ("M:OUTTMP", "50", "the value is text"),
    ("M:OUTTMP", ["50"], "the value is an array"),
    ("M:OUTTMP", b"\x40\x49\x00\x00\x00\x00\x00\x00", "the value is raw bytes"),
    ("M:OUTTMP", True, "the value is a bool"),
    ("M:OUTTMP", {"on": True}, "the value is a structured value"),
    ("M:OUTTMP", float("nan"), "the value is a non-finite number (nan)"),
    ("M:OUTTMP", float("inf"), "the value is a non-finite number (inf)"),
    ("M:OUTTMP[7]", 50.0, "an element range ([7])"),
    ("M:OUTTMP[1:2]", 50.0, "an element range ([1:2])"),
    ("M:OUTTMP.SETTING{0:8}", 50.0, "a byte range ({0:8})"),
    ("M:OUTTMP.SETTING.RAW", 50.0, "the RAW field"),
    ("M:OUTTMP.SETTING.PRIMARY", 50.0, "the PRIMARY field"),
    ("M:OUTTMP<-LOGGER:1:2", 50.0, "an extra (<-LOGGER)"),
]


class TestValueRange:
    policy = ValueRangePolicy({"M:*": (0.0, 100.0), "M:OUT*": (-5.0, 50.0)})

    @pytest.mark.parametrize("value", [0, 0.0, 50, 50.0])
    def test_bounds_are_inclusive_and_all_matching_patterns_apply(self, value):
        assert self.policy.check(set_ctx(("M:OUTTMP", value))).allowed

    @pytest.mark.parametrize("value", [-0.1, 50.5])
    def test_outside_denied_naming_device(self, value):
        decision = self.policy.check(set_ctx(("G:AMANDA", 1e9), ("m_outtmp@n", value)))
        assert not decision.allowed
        assert decision.reason.startswith(f"Value {value} for M:OUTTMP outside [")

    @pytest.mark.parametrize(
        "drf", ["M:OUTTMP", "M_OUTTMP", "M:OUTTMP.SETTING", "M:OUTTMP[0]", "M:OUTTMP[]", "M:OUTTMP.SETTING.SCALED"]
    )
    def test_every_spelling_of_the_setting_is_judged(self, drf):
        assert not self.policy.check(set_ctx((drf, 60.0))).allowed
        assert self.policy.check(set_ctx((drf, 40.0))).allowed

    @pytest.mark.parametrize(("drf", "value", "why"), UNJUDGEABLE)
    def test_what_the_limit_cannot_judge_is_refused_naming_the_setting(self, drf, value, why):
        decision = self.policy.check(set_ctx(("G:AMANDA", 1.0), (drf, value)))
        assert not decision.allowed
        assert decision.reason.startswith(f"Setting 1 ({drf}) cannot be judged by the range limit of M:OUTTMP: {why}")

    @pytest.mark.parametrize("drf", ["M|OUTTMP", "M:OUTTMP.CONTROL", "M:OUTTMP.ANALOG.MAX", "M:OUTTMP.DIGITAL"])
    def test_other_properties_are_outside_the_limit(self, drf):
        assert self.policy.check(set_ctx((drf, 1e9))).allowed
        assert self.policy.check(set_ctx((drf, "RESET"))).allowed

    def test_reads_and_unmatched_devices_pass(self):
        read = RequestContext(["M:OUTTMP"], "Read", "ipv4:10.0.0.1:5000", {}, [], None, allowed=frozenset({0}))
        assert self.policy.check(read).allowed
        assert self.policy.check(set_ctx(("G:AMANDA", 1e9), ("G:AMANDA", [1.0]), ("G:AMANDA", "text"))).allowed

    @pytest.mark.parametrize("limits", [{}, {"M:*": (2.0, 1.0)}])
    def test_bad_arguments(self, limits):
        with pytest.raises(ValueError):
            ValueRangePolicy(limits)


class TestSlewRate:
    def make(self, **limit: float) -> tuple[SlewRatePolicy, FakeClock]:
        clock = FakeClock()
        return SlewRatePolicy({"M:*": SlewLimit(**limit)}, clock=clock), clock

    def test_needs_the_setting_of_each_limited_device_once(self):
        policy, _ = self.make(max_step=1)
        ctx = set_ctx(("M:A", 1.0), ("m_a", 2.0), ("M:B.SETTING[0]", 3.0), ("M|A", "ON"), ("G:AMANDA", 4.0))
        assert list(policy.needs_current(ctx)) == ["M:A.SETTING", "M:B.SETTING"]
        read = RequestContext(["M:A"], "Read", "ipv4:10.0.0.1:5000", {}, [], None, allowed=frozenset({0}))
        assert not policy.needs_current(read)

    def test_the_first_write_is_judged_from_the_current_value(self):
        policy, _ = self.make(max_step=10)
        assert evaluate_policies([policy], set_ctx(("M:A", 110.0), current={"M:A.SETTING": 100.0})).allowed
        decision = evaluate_policies([policy], set_ctx(("M:A", 1000.0), current={"M:A.SETTING": 100.0}))
        assert decision.reason == "Step 900 for M:A.SETTING (setting 0) from its current value 100 exceeds max_step 10"

    @pytest.mark.parametrize(
        ("current", "why"),
        [
            ({}, "The current value of M:A.SETTING was not read: setting 0 (M:A) cannot be judged"),
            (
                {"M:A.SETTING": "status 17/-26 no such device"},
                "The current value of M:A.SETTING cannot be read (status 17/-26 no such device): setting 0 (M:A) refused",
            ),
            (
                {"M:A.SETTING": [1.0, 2.0]},
                "The current value of M:A.SETTING is an array, not a finite number: setting 0 (M:A) cannot be judged",
            ),
        ],
    )
    def test_without_a_current_number_the_write_is_refused(self, current, why):
        policy, _ = self.make(max_step=10)
        assert evaluate_policies([policy], set_ctx(("M:A", 1.0), current=current)).reason == why

    def test_settings_of_one_request_are_a_sequence_from_the_current_value(self):
        policy, _ = self.make(max_step=3)
        now = {"M:A.SETTING": 10.0}
        ramp = set_ctx(("M:A", 7.0), ("M:A.SETTING", 4.0), ("m_a", 1.0), ("M:A[0]", -2.0), current=now)
        assert evaluate_policies([policy], ramp).allowed
        decision = evaluate_policies([policy], set_ctx(("M:A", 7.0), ("M:A", 2.0), current=now))
        assert (
            decision.reason
            == "Step 5 for M:A.SETTING (setting 1) from setting 0's 7 in this request exceeds max_step 3"
        )

    @pytest.mark.parametrize(("drf", "value", "why"), UNJUDGEABLE)
    def test_what_the_limit_cannot_judge_is_refused_naming_the_setting(self, drf, value, why):
        policy, _ = self.make(max_step=1000)
        decision = evaluate_policies([policy], set_ctx((drf, value), current={"M:OUTTMP.SETTING": 50.0}))
        assert decision.reason.startswith(f"Setting 0 ({drf}) cannot be judged by the slew limit of M:OUTTMP: {why}")

    def test_other_properties_are_outside_the_limit(self):
        policy, _ = self.make(max_step=1)
        assert evaluate_policies([policy], set_ctx(("M|A", 1e9), ("M:A.ANALOG.MAX", 1e9))).allowed

    def test_max_rate_counts_from_the_last_write_the_backend_accepted(self):
        policy, clock = self.make(max_rate=2)
        now = {"M:A.SETTING": 0.0}
        first = set_ctx(("M:A", 100.0), current=now)
        assert evaluate_policies([policy], first).allowed  # no write yet to count the time from
        policy.on_written(first, [False])  # refused by the backend: still none
        clock.now += 1
        assert evaluate_policies([policy], first).allowed
        policy.on_written(first, [True])
        clock.now += 5
        now = {"M:A.SETTING": 100.0}
        assert evaluate_policies([policy], set_ctx(("M:A", 110.0), current=now)).allowed  # 2/s
        decision = evaluate_policies([policy], set_ctx(("M:A", 111.0), current=now))
        assert (
            decision.reason == "Rate 2.2/s for M:A.SETTING (setting 0) from its current value 100 exceeds max_rate 2/s"
        )

    def test_an_unknown_outcome_counts_as_written(self):
        policy, clock = self.make(max_rate=1)
        ctx = set_ctx(("M:A", 1.0), current={"M:A.SETTING": 0.0})
        policy.on_written(ctx, [None])  # may have reached the device
        clock.now += 1
        assert not evaluate_policies([policy], set_ctx(("M:A", 5.0), current={"M:A.SETTING": 1.0})).allowed

    def test_a_second_move_in_one_request_takes_no_time(self):
        policy, _ = self.make(max_rate=1)
        decision = evaluate_policies([policy], set_ctx(("M:A", 1.0), ("M:A", 2.0), current={"M:A.SETTING": 0.0}))
        assert decision.reason == (
            "Step 1 for M:A.SETTING (setting 1) from setting 0's 1 in this request takes no time: it exceeds max_rate 1/s"
        )

    def test_check_without_current_judges_all_but_the_movement(self):
        policy, _ = self.make(max_step=1)
        assert policy.check_without_current(set_ctx(("M:A", 1e9))).allowed
        assert not policy.check_without_current(set_ctx(("M:A[7]", 1.0))).allowed

    def test_a_write_denied_later_in_the_chain_is_not_reported(self):
        # The gateway reports outcomes only for what the whole chain allowed: nothing here.
        policy, _ = self.make(max_step=10)
        assert not evaluate_policies(
            [policy, ReadOnlyPolicy()], set_ctx(("M:A", 1.0), current={"M:A.SETTING": 0.0})
        ).allowed

    def test_slew_limit_validation(self):
        with pytest.raises(ValueError):
            SlewLimit()
        with pytest.raises(ValueError):
            SlewLimit(max_step=-1)
        with pytest.raises(ValueError):
            SlewRatePolicy({})
        with pytest.raises(AttributeError):
            SlewLimit(max_step=1).max_step = 2  # type: ignore[misc]


# -- through a real server -------------------------------------------------------------------

# The issue's request: walks a slew-limited device down through settings the backend refuses.
ISSUE_REQUEST = [("Z:ACLTST[7]", v) for v in (7.0, 4.0, 1.0, -2.0, -5.0, -8.0)] + [("Z:ACLTST", -10.0)]
ISSUE_DENIAL = "Setting 0 (Z:ACLTST[7]) cannot be judged by the slew limit of Z:ACLTST: an element range ([7])"


def setting_list(*settings: tuple[str, object]) -> DAQ_pb2.SettingList:
    request = DAQ_pb2.SettingList()
    for device, value in settings:
        s = request.setting.add()
        s.device = device
        if isinstance(value, bytes):
            s.value.raw = value
        elif isinstance(value, str):
            s.value.text = value
        elif isinstance(value, list):
            s.value.scalarArr.value.extend(value)
        else:
            s.value.scalar = value
    return request


class Served:
    """A SupervisedServer around `backend` with `policies`, and a client of it."""

    def __init__(self, backend, *policies, **options):
        self.server = SupervisedServer(backend, port=0, host="127.0.0.1", policies=list(policies), **options)
        self.server.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.server.port}")
        self.stub = DAQ_pb2_grpc.DAQStub(self.channel)

    def set(self, *settings: tuple[str, object]) -> list[int]:
        """The status code of each setting; a refused call raises grpc.RpcError."""
        return [s.status_code for s in self.stub.Set(setting_list(*settings), timeout=10).status]

    def denied(self, *settings: tuple[str, object]) -> str:
        with pytest.raises(grpc.RpcError) as refused:
            self.stub.Set(setting_list(*settings), timeout=10)
        assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED, refused.value.details()
        return refused.value.details()

    def setting(self, device: str = "Z:ACLTST") -> float:
        replies = list(self.stub.Read(DAQ_pb2.ReadingList(drf=[f"{device}.SETTING@I"]), timeout=10))
        return replies[0].readings.reading[0].data.scalar

    def close(self):
        self.channel.close()
        self.server.stop()


@pytest.fixture
def served():
    opened = []

    def serve(backend, *policies, **options):
        s = Served(backend, *policies, **options)
        opened.append(s)
        return s

    yield serve
    for s in opened:
        s.close()


def move(sim: SimBackend, value: float, device: str = "Z:ACLTST") -> None:
    """Someone else moves the device (not through the gateway)."""
    assert asyncio.run(sim.write_many([(device, value)]))[0].ok


def slew(step: float, device: str = "Z:ACLTST") -> SlewRatePolicy:
    return SlewRatePolicy({device: SlewLimit(max_step=step)})


def test_the_issue_request_is_refused_and_the_device_stays(served):
    sim = SimBackend()
    gateway = served(sim, slew(3.0))
    for value in (3.0, 6.0, 9.0, 10.0):
        assert gateway.set(("Z:ACLTST", value)) == [0]
    assert gateway.denied(*ISSUE_REQUEST).startswith(ISSUE_DENIAL)
    assert gateway.setting() == 10.0
    assert gateway.denied(("Z:ACLTST", -10.0)).startswith("Step 20 for Z:ACLTST.SETTING")  # a direct jump


def test_the_issue_request_through_a_worker_pool(served):
    gateway = served(WorkerPool(backend="sim", workers=1, **FAST), slew(3.0), close_backend=True)
    for value in (3.0, 6.0, 9.0, 10.0):
        assert gateway.set(("Z:ACLTST", value)) == [0]
    assert gateway.denied(*ISSUE_REQUEST).startswith(ISSUE_DENIAL)
    assert gateway.setting() == 10.0


def test_a_sequence_in_one_request_is_judged_from_the_real_value(served):
    sim = SimBackend()
    gateway = served(sim, slew(3.0))
    assert gateway.set(("Z:ACLTST", 2.0)) == [0]
    move(sim, 10.0)  # elsewhere: the gateway last wrote 2
    assert gateway.denied(("Z:ACLTST", 4.0), ("Z:ACLTST", 6.0)).startswith(
        "Step 6 for Z:ACLTST.SETTING (setting 0) from its current value 10 exceeds max_step 3"
    )
    assert gateway.setting() == 10.0
    assert gateway.set(("Z:ACLTST", 12.0), ("Z_ACLTST", 14.0), ("Z:ACLTST[0]", 16.0)) == [0, 0, 0]
    assert gateway.setting() == 16.0
    assert "from setting 0's 19 in this request" in gateway.denied(("Z:ACLTST", 19.0), ("Z:ACLTST", 23.0))
    assert gateway.setting() == 16.0


@pytest.mark.parametrize("other", [("Z:SIMPS.ANALOG.MAX", 12.0), ("Z|SIMPS", 1.0)])
def test_another_property_does_not_move_the_slew_history(served, other):
    sim = SimBackend()
    gateway = served(sim, slew(3.0, "Z:SIMPS"))
    assert gateway.set(("Z:SIMPS", 10.0)) == [0]
    assert gateway.set(other) == [0]  # not the setting: outside the limit
    assert gateway.denied(("Z:SIMPS", 13.5)).startswith(
        "Step 3.5 for Z:SIMPS.SETTING (setting 0) from its current value 10"
    )
    assert gateway.setting("Z:SIMPS") == 10.0


def test_a_setting_the_backend_rejected_does_not_move_the_history(served):
    fake = FakeBackend()
    fake.set_reading("Z:ACLTST.SETTING", 10.0)
    gateway = served(fake, slew(3.0))
    fake.set_write_result("Z:ACLTST", success=False, error_code=st.DPM_BAD_RANGE, message="rejected")
    assert gateway.set(("Z_ACLTST", 13.0)) == [st.DPM_BAD_RANGE]
    fake.set_write_result("Z:ACLTST", success=True)
    assert gateway.denied(("Z_ACLTST", 16.0)).startswith(
        "Step 6 for Z:ACLTST.SETTING (setting 0) from its current value 10"
    )
    assert fake.get_many(["Z:ACLTST.SETTING@I"])[0].value == 10.0


class RejectsThirteen(SimBackend):
    """The simulator, refusing any setting of 13."""

    async def write_many(self, settings, timeout=None):
        results = []
        for drf, value in settings:
            if value == 13.0:
                results.append(WriteResult(drf, st.DPM, st.DPM_BAD_RANGE, "13 is refused"))
            else:
                results.extend(await super().write_many([(drf, value)], timeout))
        return results


def test_after_a_rejected_setting_the_rest_of_its_sequence_is_not_sent(served, tmp_path):
    sim = RejectsThirteen()
    move(sim, 10.0)
    with AuditLog(tmp_path / "audit.jsonl", log_responses=True) as audit:
        gateway = served(sim, slew(3.0), audit_log=audit)
        reply = gateway.stub.Set(setting_list(("Z:ACLTST", 13.0), ("M:OUTTMP", 70.0), ("Z:ACLTST", 16.0)), timeout=10)
        assert [s.status_code for s in reply.status] == [st.DPM_BAD_RANGE, 0, st.DPM_PRIVILEGE]
        assert reply.status[2].message.startswith("not sent: setting 0 of Z:ACLTST.SETTING in this request")
        assert gateway.setting() == 10.0  # not 16: a step of 6
        assert gateway.setting("M:OUTTMP") == 70.0  # the other device's setting went through
        gateway.close()
    events = [e for e in read_audit(tmp_path / "audit.jsonl") if e.get("dir") == "event"]
    assert [(e["event"], e["drfs"]) for e in events] == [("settings_not_sent", ["Z:ACLTST"])]


@pytest.fixture(scope="module")
def accepting():
    """A backend that accepts whatever it is sent, behind a range and behind a slew limit."""
    fake = FakeBackend()
    ranged = Served(fake, ValueRangePolicy({"Z:ACLTST": (-10.0, 10.0)}))
    slewed = Served(fake, slew(3.0))
    yield fake, {"range": ranged, "slew": slewed}
    ranged.close()
    slewed.close()


@pytest.mark.parametrize("limit", ["range", "slew"])
@pytest.mark.parametrize(
    ("drf", "value"),
    [
        ("Z:ACLTST", [5.0]),
        ("Z:ACLTST", [50.0]),
        ("Z:ACLTST", "50"),
        ("Z:ACLTST", b"\x40\x49\x00\x00\x00\x00\x00\x00"),
        ("Z:ACLTST.SETTING{0:8}", b"\x40\x49\x00\x00\x00\x00\x00\x00"),
        ("Z:ACLTST.SETTING.RAW", 5.0),
        ("Z:ACLTST[1:2]", [5.0, 5.0]),
    ],
)
def test_arrays_text_and_raw_are_refused_for_a_limited_device(accepting, limit, drf, value):
    fake, gateways = accepting
    fake.reset()
    fake.set_reading("Z:ACLTST.SETTING", 0.0)
    details = gateways[limit].denied(("G:AMANDA", 1.0), (drf, value))
    assert details.startswith(f"Setting 1 ({drf}) cannot be judged by the {limit} limit of Z:ACLTST: ")
    assert fake.writes == []


class BrokenReads(SimBackend):
    """The simulator, whose reads fail as a worker pool's do with no worker ready."""

    async def get_many(self, drfs, timeout=None):
        raise BackendUnavailable("no worker ready")


def test_a_current_value_that_cannot_be_read_denies(served):
    fake = FakeBackend()
    fake.set_error("Z:ACLTST.SETTING", st.DPM_NO_SUCH_DEVICE, "no such device")
    gateway = served(fake, slew(3.0))
    assert gateway.denied(("Z_ACLTST", 1.0)) == (
        "The current value of Z:ACLTST.SETTING cannot be read (status 17/-26 no such device): setting 0 (Z_ACLTST) refused"
    )
    broken = served(BrokenReads(), slew(3.0))
    assert broken.denied(("Z:ACLTST", 1.0)) == (
        "The current value of Z:ACLTST.SETTING cannot be read (BackendUnavailable: no worker ready): "
        "setting 0 (Z:ACLTST) refused"
    )
    assert fake.writes == []


class SlowWrites(SimBackend):
    """The simulator, taking a while over each write (so that two Sets overlap)."""

    async def write_many(self, settings, timeout=None):
        await asyncio.sleep(0.3)
        return await super().write_many(settings, timeout)


def test_concurrent_sets_of_one_device_are_judged_one_after_the_other(served):
    sim = SlowWrites()
    move(sim, 10.0)
    gateway = served(sim, slew(3.0))
    outcomes: dict[float, object] = {}

    def write(value: float) -> None:
        try:
            outcomes[value] = gateway.set(("Z:ACLTST", value))
        except grpc.RpcError as exc:
            outcomes[value] = exc.details()

    threads = [threading.Thread(target=write, args=(v,)) for v in (13.0, 7.0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    # Each is within 3 of 10, not of each other: the second is judged from the first's value.
    written = [v for v, o in outcomes.items() if o == [0]]
    assert len(written) == 1, outcomes
    assert gateway.setting() == written[0]
    (refused,) = [o for o in outcomes.values() if o != [0]]
    assert f"from its current value {written[0]:g} exceeds max_step 3" in refused


def test_a_custom_policy_learns_the_outcome_of_each_setting(served):
    class Outcomes(Policy):
        """Allows everything and keeps what the gateway reports."""

        def __init__(self):
            self.seen: list[list[bool | None]] = []

        def check(self, ctx):
            return PolicyDecision(allowed=True)

        def on_written(self, ctx, outcomes):
            self.seen.append(list(outcomes))

    policy = Outcomes()
    fake = FakeBackend()
    fake.set_write_result("G:AMANDA", success=False, error_code=-17)
    gateway = served(fake, policy)
    assert gateway.set(("M:OUTTMP", 1.0), ("G:AMANDA", 2.0)) == [0, -17]
    assert policy.seen == [[True, False]]


def test_a_set_refused_at_the_door_reads_no_device(served):
    fake = FakeBackend()
    fake.set_reading("Z:ACLTST.SETTING", 0.0)
    gateway = served(fake, slew(3.0), token="s3cret")
    with pytest.raises(grpc.RpcError) as refused:
        gateway.stub.Set(setting_list(("Z:ACLTST", 1.0)), timeout=10)
    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert fake.reads == [] and fake.writes == []
    reply = gateway.stub.Set(setting_list(("Z:ACLTST", 1.0)), timeout=10, metadata=[("authorization", "Bearer s3cret")])
    assert [s.status_code for s in reply.status] == [0]
    assert fake.reads == ["Z:ACLTST.SETTING@I"]
