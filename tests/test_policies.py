"""Tests for pacsys.supervised._policies (the machine-protection policies: test_machine_protection.py)."""

from dataclasses import replace

import pytest

from pacsys.supervised import ValueRangePolicy
from pacsys.supervised._policies import (
    DeviceAccessPolicy,
    Policy,
    PolicyDecision,
    RateLimitPolicy,
    ReadOnlyPolicy,
    RequestContext,
    evaluate_policies,
)


def read_ctx(*drfs: str, peer: str = "ipv4:10.0.0.1:5000") -> RequestContext:
    return RequestContext(
        drfs=list(drfs),
        rpc_method="Read",
        peer=peer,
        metadata={},
        values=[],
        raw_request=None,
        allowed=frozenset(range(len(drfs))),
    )


def set_ctx(*settings: tuple[str, object], peer: str = "ipv4:10.0.0.1:5000") -> RequestContext:
    return RequestContext(
        drfs=[drf for drf, _ in settings],
        rpc_method="Set",
        peer=peer,
        metadata={},
        values=list(settings),
        raw_request=None,
    )


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class TestDecision:
    def test_denial_needs_reason(self):
        with pytest.raises(ValueError):
            PolicyDecision(allowed=False)
        with pytest.raises(ValueError):
            PolicyDecision(allowed=False, reason="")
        assert PolicyDecision(allowed=False, reason="no").reason == "no"

    def test_frozen(self):
        with pytest.raises(AttributeError):
            PolicyDecision(allowed=True).allowed = False  # type: ignore[misc]


class TestPolicyBase:
    def test_name_defaults_to_class_and_can_be_set(self):
        policy = ReadOnlyPolicy()
        assert policy.name == "ReadOnlyPolicy"
        policy.name = "no-writes"
        assert policy.name == "no-writes"
        assert ReadOnlyPolicy().name == "ReadOnlyPolicy"

    def test_allows_writes_defaults_false(self):
        assert not ReadOnlyPolicy().allows_writes
        assert not RateLimitPolicy(1).allows_writes
        assert not DeviceAccessPolicy(["M:*"], mode="deny").allows_writes
        assert DeviceAccessPolicy(["M:*"]).allows_writes
        assert DeviceAccessPolicy(["M:*"], action="set").allows_writes


class TestReadOnly:
    def test_denies_set_allows_read(self):
        policy = ReadOnlyPolicy()
        assert policy.check(read_ctx("M:OUTTMP")).allowed
        decision = policy.check(set_ctx(("M:OUTTMP", 1.0)))
        assert not decision.allowed
        assert decision.reason == "Write operations disabled"


class TestDeviceAccess:
    def test_allow_mode_approves_matching_slots_only(self):
        policy = DeviceAccessPolicy(["M:*"], action="set")
        decision = policy.check(set_ctx(("m_outtmp.setting@n", 1.0), ("G:AMANDA", 2.0), ("M:OTHER", 3.0)))
        assert decision.allowed
        assert decision.ctx is not None
        assert decision.ctx.allowed == {0, 2}

    def test_allow_mode_leaves_context_alone_when_nothing_new(self):
        decision = DeviceAccessPolicy(["Z:*"]).check(set_ctx(("M:OUTTMP", 1.0)))
        assert decision.allowed and decision.ctx is None
        assert DeviceAccessPolicy(["M:*"]).check(read_ctx("M:OUTTMP")).ctx is None

    def test_deny_mode_names_device(self):
        policy = DeviceAccessPolicy(["Z:SECRET*"], mode="deny")
        decision = policy.check(read_ctx("M:OUTTMP", "z:secret1@p,1000"))
        assert not decision.allowed
        assert decision.reason == "Device Z:SECRET1 is denied"
        assert policy.check(read_ctx("M:OUTTMP")).allowed

    def test_action_read_only_checks_reads(self):
        policy = DeviceAccessPolicy(["Z:*"], mode="deny", action="read")
        assert not policy.check(read_ctx("Z:ACLTST")).allowed
        assert policy.check(set_ctx(("Z:ACLTST", 1.0))).allowed

    def test_action_set_only_checks_sets(self):
        policy = DeviceAccessPolicy(["Z:*"], mode="deny", action="set")
        assert policy.check(read_ctx("Z:ACLTST")).allowed
        assert not policy.check(set_ctx(("Z:ACLTST", 1.0))).allowed

    def test_glob_is_case_insensitive(self):
        policy = DeviceAccessPolicy(["g:am*"], mode="deny")
        assert not policy.check(read_ctx("G:AMANDA")).allowed

    def test_regex_is_full_match_case_insensitive(self):
        policy = DeviceAccessPolicy([r"m:out.*", r"G:AMAND"], mode="deny", syntax="regex")
        assert not policy.check(read_ctx("M:OUTTMP")).allowed
        assert policy.check(read_ctx("G:AMANDA")).allowed  # a prefix is not a full match
        # The same text as a glob: "." is literal.
        glob = DeviceAccessPolicy([r"m:out.*"], mode="deny")
        assert glob.check(read_ctx("M:OUTTMP")).allowed

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"patterns": []},
            {"patterns": "M:*"},
            {"patterns": ["M:*"], "mode": "block"},
            {"patterns": ["M:*"], "action": "write"},
            {"patterns": ["M:*"], "syntax": "re"},
            {"patterns": ["M:("], "syntax": "regex"},
            {"patterns": ["M:*"], "mode": "allow", "action": "read"},
        ],
    )
    def test_bad_arguments(self, kwargs):
        with pytest.raises(ValueError):
            DeviceAccessPolicy(**kwargs)


class TestRateLimit:
    def test_limit_per_client_and_window_expiry(self):
        clock = FakeClock()
        policy = RateLimitPolicy(2, window_seconds=10, clock=clock)
        a, b = read_ctx("M:OUTTMP", peer="ipv4:10.0.0.1:5000"), read_ctx("M:OUTTMP", peer="ipv4:10.0.0.2:5000")
        assert policy.check(a).allowed
        clock.now += 1
        assert policy.check(a).allowed
        denied = policy.check(a)
        assert not denied.allowed and "Rate limit exceeded" in (denied.reason or "")
        assert policy.check(b).allowed  # another client has its own budget
        clock.now += 9.5  # the first hit is now older than the window
        assert policy.check(a).allowed
        assert not policy.check(a).allowed

    def test_new_port_is_the_same_client(self):
        policy = RateLimitPolicy(1, clock=FakeClock())
        assert policy.check(read_ctx("M:OUTTMP", peer="ipv6:[::1]:5000")).allowed
        assert not policy.check(read_ctx("M:OUTTMP", peer="ipv6:[::1]:5001")).allowed

    def test_idle_clients_are_forgotten(self):
        clock = FakeClock()
        policy = RateLimitPolicy(5, window_seconds=10, clock=clock)
        for i in range(100):
            policy.check(read_ctx("M:OUTTMP", peer=f"ipv4:10.0.1.{i}:5000"))
        clock.now += 11
        policy.check(read_ctx("M:OUTTMP", peer="ipv4:10.0.0.1:5000"))
        assert list(policy._hits) == ["ipv4:10.0.0.1"]

    @pytest.mark.parametrize("args", [(0,), (1, 0), (1, -1.0)])
    def test_bad_arguments(self, args):
        with pytest.raises(ValueError):
            RateLimitPolicy(*args)


class Recorder(Policy):
    """Records the context it saw; optionally replaces the values."""

    def __init__(self, values=None, deny=False):
        self.seen: list[RequestContext] = []
        self._values = values
        self._deny = deny

    def check(self, ctx):
        self.seen.append(ctx)
        if self._deny:
            return PolicyDecision(allowed=False, reason="recorder says no")
        if self._values is not None:
            return PolicyDecision(allowed=True, ctx=replace(ctx, values=self._values))
        return PolicyDecision(allowed=True)


class TestEvaluate:
    def test_empty_chain_allows_reads_and_writes(self):
        for ctx in (read_ctx("M:OUTTMP"), set_ctx(("M:OUTTMP", 1.0))):
            decision = evaluate_policies([], ctx)
            assert decision.allowed and decision.ctx is ctx

    def test_first_denial_short_circuits(self):
        after = Recorder()
        decision = evaluate_policies([Recorder(deny=True), after], read_ctx("M:OUTTMP"))
        assert decision.reason == "recorder says no"
        assert after.seen == []

    def test_modified_context_carries_forward(self):
        clamp, after = Recorder(values=[("M:OUTTMP", 50.0)]), Recorder()
        decision = evaluate_policies([clamp, after], set_ctx(("M:OUTTMP", 500.0)))
        assert after.seen[0].values == [("M:OUTTMP", 50.0)]
        assert decision.allowed and decision.ctx is after.seen[0]

    def test_order_matters(self):
        clamp = Recorder(values=[("M:OUTTMP", 50.0)])
        limit = ValueRangePolicy({"M:*": (0.0, 100.0)})
        ctx = set_ctx(("M:OUTTMP", 500.0))
        assert evaluate_policies([clamp, limit], ctx).allowed
        assert not evaluate_policies([limit, clamp], ctx).allowed

    def test_unapproved_write_slot_denied_when_a_policy_gates_writes(self):
        policies = [DeviceAccessPolicy(["M:*"], action="set")]
        assert evaluate_policies(policies, set_ctx(("M:OUTTMP", 1.0))).allowed
        decision = evaluate_policies(policies, set_ctx(("M:OUTTMP", 1.0), ("g_amanda@n", 2.0)))
        assert not decision.allowed
        assert decision.reason == "Device G:AMANDA not approved for Set"

    def test_approvals_compose(self):
        policies = [DeviceAccessPolicy(["M:*"], action="set"), DeviceAccessPolicy(["G:*"], action="set")]
        decision = evaluate_policies(policies, set_ctx(("M:OUTTMP", 1.0), ("G:AMANDA", 2.0)))
        assert decision.allowed and decision.ctx is not None and decision.ctx.allowed == {0, 1}

    def test_reads_start_approved(self):
        policies = [DeviceAccessPolicy(["M:*"])]
        assert evaluate_policies(policies, read_ctx("G:AMANDA")).allowed

    def test_no_slot_rule_without_write_gating_policy(self):
        policies = [RateLimitPolicy(10), ValueRangePolicy({"M:*": (0.0, 100.0)})]
        assert evaluate_policies(policies, set_ctx(("G:AMANDA", 1.0))).allowed

    def test_read_only_denies_even_approved_writes(self):
        policies = [DeviceAccessPolicy(["M:*"]), ReadOnlyPolicy()]
        assert not evaluate_policies(policies, set_ctx(("M:OUTTMP", 1.0))).allowed
