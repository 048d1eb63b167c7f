"""The request gate without a server: each refusal, the token, the policies, the peer limits and the audit."""

import logging
import os
from dataclasses import replace

import pytest

from pacsys._proto.controls.common.v1 import device_pb2
from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2
from pacsys.drf import parse_cached
from pacsys.settings import Settings
from pacsys.supervised import AuditLog, Policy, PolicyDecision, ReadOnlyPolicy, ServicerLimits, read_audit
from pacsys.supervised import write_gate as public_write_gate
from pacsys.supervised._policies import DeviceAccessPolicy, write_gate
from pacsys.supervised.gate import EVENT_RATE_HZ, Gate, GateRequest
from pacsys.supervised.policy_config import write_gate as config_write_gate

PEER = "ipv4:10.0.0.7:5000"
WHO = "ipv4:10.0.0.7"
TOKEN = "s3cret-token"


def read(*drfs, metadata=(), peer=PEER, who=WHO, **kw):
    return GateRequest("Read", peer, who, metadata, list(drfs), raw=DAQ_pb2.ReadingList(drf=list(drfs)), **kw)


def value(x):
    v = device_pb2.Value()
    v.scalar = x
    return v


def write(*settings, metadata=(), tls=False, **kw):
    devices = [d for d, _ in settings]
    values = [v if isinstance(v, device_pb2.Value) else value(v) for _, v in settings]
    return GateRequest("Set", PEER, WHO, metadata, devices, values, tls=tls, **kw)


def bearer(token=TOKEN):
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture
def audit_path(tmp_path):
    return tmp_path / "audit.jsonl"


@pytest.fixture
def audit(audit_path):
    log = AuditLog(audit_path)
    yield log
    log.close()


def entries(audit, path):
    audit.flush()
    return list(read_audit(path))


def refused(gate, request, code, decision, *, contains=""):
    result = gate.admit(request)
    assert not result.allowed, result
    assert result.refusal is not None
    assert (result.refusal.code, result.refusal.decision) == (code, decision), result.refusal
    assert contains in result.refusal.details
    assert gate.stats.requests[(request.rpc, decision)] >= 1
    return result.refusal


class Deny(Policy):
    def check(self, ctx):
        return PolicyDecision(False, f"no {ctx.drfs[0]}")


class Reverse(Policy):
    def check(self, ctx):
        return PolicyDecision(True, ctx=replace(ctx, drfs=list(reversed(ctx.drfs))))


class DropLast(Policy):
    def check(self, ctx):
        return PolicyDecision(True, ctx=replace(ctx, drfs=ctx.drfs[:-1]))


class Exploding(Policy):
    def check(self, ctx):
        raise KeyError("oops")


class Seen(Policy):
    """Records the contexts it saw (allows everything)."""

    def __init__(self):
        self.seen = []

    def check(self, ctx):
        self.seen.append(ctx)
        return PolicyDecision(True)


# -- validation ---------------------------------------------------------------------


def test_admitted_read_carries_the_parsed_drfs_and_holds_a_call():
    gate = Gate()
    decision = gate.admit(read("M:OUTTMP@I", "G:AMANDA.SETTING@N"))
    assert decision.allowed and decision.oneshot and decision.rate == 0.0
    assert decision.parsed == [parse_cached("M:OUTTMP@I"), parse_cached("G:AMANDA.SETTING@N")]
    assert decision.original == [0, 1]
    assert decision.final is not None and decision.final.drfs == ["M:OUTTMP@I", "G:AMANDA.SETTING@N"]
    assert decision.seq == 0  # no audit log
    assert gate.peers._table[WHO].calls == 1
    gate.release(decision)
    assert WHO not in gate.peers._table or gate.peers._table[WHO].calls == 0


def test_undecodable_body_is_invalid_argument():
    gate = Gate()
    request = GateRequest("Read", PEER, WHO, malformed="request is not a ReadingList (3 bytes, DecodeError)")
    refusal = refused(gate, request, "INVALID_ARGUMENT", "invalid", contains="not a ReadingList")
    assert refusal.details == request.malformed


def test_draining_refuses_with_unavailable():
    gate = Gate()
    gate.draining = True
    refused(gate, read("M:OUTTMP"), "UNAVAILABLE", "draining", contains="shutting down")
    refused(gate, write(("M:OUTTMP", 1.0)), "UNAVAILABLE", "draining")


@pytest.mark.parametrize("rpc", ["Read", "Set"])
def test_empty_request(rpc):
    what = "drfs" if rpc == "Read" else "settings"
    refused(Gate(), GateRequest(rpc, PEER, WHO), "INVALID_ARGUMENT", "invalid", contains=f"empty request: no {what}")


def test_too_many_drfs_and_settings_are_counted():
    gate = Gate(limits=ServicerLimits(max_drfs_per_request=2, max_settings_per_request=1))
    refused(gate, read("A:X", "B:X", "C:X"), "RESOURCE_EXHAUSTED", "limit", contains="too many drfs: 3")
    refused(gate, write(("A:X", 1.0), ("B:X", 2.0)), "RESOURCE_EXHAUSTED", "limit", contains="too many settings: 2")
    assert gate.stats.limits_hit["max_drfs_per_request"] == 1
    assert gate.stats.limits_hit["max_settings_per_request"] == 1
    assert gate.admit(read("A:X", "B:X")).allowed


def test_a_long_drf_is_refused_before_it_is_parsed():
    gate = Gate(limits=ServicerLimits(max_drf_length=20))
    refusal = refused(gate, read("M:OUTTMP", "Z:" + "A" * 40), "INVALID_ARGUMENT", "limit")
    assert refusal.details.startswith("DRF 1 is 42 characters long (the limit is 20)")
    assert gate.stats.limits_hit["max_drf_length"] == 1


def test_a_bad_drf_names_its_index():
    gate = Gate()
    refused(gate, read("M:OUTTMP", "not a drf"), "INVALID_ARGUMENT", "invalid", contains="DRF 1:")
    refused(gate, write(("M:OUTTMP", 1.0), ("@@", 1.0)), "INVALID_ARGUMENT", "invalid", contains="setting 1:")


def test_a_period_shorter_than_allowed():
    gate = Gate(limits=ServicerLimits(max_rate_hz=100))
    refusal = refused(gate, read("M:OUTTMP@p,1"), "INVALID_ARGUMENT", "limit", contains="shorter than the shortest")
    assert "10000 µs (100 Hz)" in refusal.details
    assert gate.stats.limits_hit["max_rate_hz"] == 1
    assert gate.admit(read("M:OUTTMP@p,10")).allowed  # 10 ms: exactly 100 Hz


def test_a_set_value_that_is_not_set_names_the_setting():
    gate = Gate()
    refused(
        gate, write(("M:OUTTMP", device_pb2.Value())), "INVALID_ARGUMENT", "invalid", contains="setting 0 ('M:OUTTMP')"
    )


# -- streams and the client's limits --------------------------------------------------


def test_a_stream_counts_its_rate_and_holds_a_stream_slot():
    gate = Gate()
    decision = gate.admit(read("M:OUTTMP@p,1000", "G:AMANDA@e,02"))
    assert decision.allowed and not decision.oneshot
    assert decision.rate == pytest.approx(1.0 + EVENT_RATE_HZ)
    assert gate.peers.streams == 1
    gate.release(decision)
    assert gate.peers.streams == 0


def test_a_stream_over_its_rate_is_refused():
    gate = Gate(limits=ServicerLimits(max_stream_rate=100))
    refused(gate, read("M:OUTTMP@p,5", "G:AMANDA@p,5"), "RESOURCE_EXHAUSTED", "limit", contains="400 readings/s")
    assert gate.stats.limits_hit["max_stream_rate"] == 1


def test_calls_in_flight_per_client_until_released():
    gate = Gate(limits=ServicerLimits(max_calls_per_peer=1))
    first = gate.admit(read("M:OUTTMP@I"))
    assert first.allowed and first.oneshot
    refused(gate, write(("M:OUTTMP", 1.0)), "RESOURCE_EXHAUSTED", "limit", contains="too many calls in flight")
    assert gate.stats.limits_hit["max_calls_per_peer"] == 1
    other = gate.admit(read("M:OUTTMP@I", peer="ipv4:10.0.0.8:1", who="ipv4:10.0.0.8"))
    assert other.allowed  # another client is not held back
    refused(gate, read("M:OUTTMP@I"), "RESOURCE_EXHAUSTED", "limit")
    assert gate.admit(read("M:OUTTMP")).allowed  # a stream is not a call
    gate.release(first)
    assert gate.admit(read("M:OUTTMP@I")).allowed


def test_streams_per_client_and_the_client_rate():
    gate = Gate(limits=ServicerLimits(max_streams_per_peer=1, max_peer_rate=50))
    held = gate.admit(read("M:OUTTMP@p,100"))
    assert held.allowed
    refused(gate, read("G:AMANDA@p,100"), "RESOURCE_EXHAUSTED", "limit", contains="too many open streams")
    gate.release(held)
    refused(gate, read("M:OUTTMP@p,10"), "RESOURCE_EXHAUSTED", "limit")  # 100/s over the client's 50
    assert gate.stats.limits_hit["max_streams_per_peer"] == 1
    assert gate.stats.limits_hit["max_peer_rate"] == 1


# -- the token ------------------------------------------------------------------------


def test_no_token_set_needs_no_header():
    assert Gate().admit(write(("M:OUTTMP", 1.0))).allowed


@pytest.mark.parametrize(
    "metadata",
    [(), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),), (("authorization", b"Bearer x"),)],
    ids=["missing", "wrong", "no-scheme", "binary"],
)
def test_a_set_without_the_token_is_unauthenticated(metadata):
    gate = Gate(token=TOKEN)
    refused(gate, write(("M:OUTTMP", 1.0), metadata=metadata), "UNAUTHENTICATED", "unauthenticated", contains="bearer")


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "Bearer"])
def test_the_scheme_is_case_insensitive(scheme):
    assert Gate(token=TOKEN).admit(write(("M:OUTTMP", 1.0), metadata=(("authorization", f"{scheme} {TOKEN}"),))).allowed


@pytest.mark.parametrize("header", [TOKEN, f"Token {TOKEN}", f"Basic {TOKEN}"])
def test_a_header_that_is_not_a_bearer_token_is_told_so(header):
    gate = Gate(token=TOKEN)
    refusal = refused(
        gate, write(("M:OUTTMP", 1.0), metadata=(("authorization", header),)), "UNAUTHENTICATED", "unauthenticated"
    )
    assert refusal.details == "the authorization header is not a bearer token: send 'Bearer <token>'"


def test_the_token_admits_and_a_read_needs_none():
    gate = Gate(token=TOKEN)
    decision = gate.admit(write(("M:OUTTMP", 1.0), metadata=bearer()))
    assert decision.allowed and decision.metadata["authorization"] == f"Bearer {TOKEN}"
    assert gate.admit(read("M:OUTTMP")).allowed


def test_the_token_is_checked_before_the_request_is_looked_at():
    gate = Gate(token=TOKEN, limits=ServicerLimits(max_settings_per_request=1))
    refused(gate, GateRequest("Set", PEER, WHO), "UNAUTHENTICATED", "unauthenticated")
    refused(gate, write(("bad drf", 1.0), ("x", 2.0)), "UNAUTHENTICATED", "unauthenticated")
    assert not gate.stats.limits_hit


def test_two_authorization_headers_are_refused_on_any_rpc():
    gate = Gate(token=TOKEN)
    twice = bearer() + bearer()
    refused(
        gate, write(("M:OUTTMP", 1.0), metadata=twice), "UNAUTHENTICATED", "unauthenticated", contains="more than one"
    )
    refused(gate, read("M:OUTTMP", metadata=twice), "UNAUTHENTICATED", "unauthenticated", contains="more than one")


def test_a_token_over_plaintext_is_refused_when_not_allowed():
    gate = Gate(token=TOKEN, token_over_plaintext=False)
    refusal = refused(gate, write(("M:OUTTMP", 1.0), metadata=bearer()), "UNAUTHENTICATED", "unauthenticated")
    assert "over plaintext" in refusal.details
    # The same refusal for a wrong token: plaintext tells nothing about a guess.
    assert gate.admit(write(("M:OUTTMP", 1.0), metadata=bearer("guess"))).refusal == refusal
    assert gate.admit(write(("M:OUTTMP", 1.0), metadata=bearer(), tls=True)).allowed


def test_token_refusal_for_other_services():
    gate = Gate()
    assert gate.token_refusal(bearer("admin"), False, "admin") is None
    assert gate.token_refusal((), False, None) is None
    refusal = gate.token_refusal(bearer("nope"), True, "admin")
    assert refusal is not None and (refusal.code, refusal.details) == (
        "UNAUTHENTICATED",
        "missing or invalid bearer token",
    )
    assert gate.token_refusal(bearer() + bearer(), True, TOKEN).details == "more than one authorization header"


# -- policies -------------------------------------------------------------------------


def test_policies_see_the_request_as_sent():
    seen = Seen()
    gate = Gate([seen])
    request = write(("M:OUTTMP", 72.5), metadata=bearer())
    gate.admit(request)
    (ctx,) = seen.seen
    assert (ctx.rpc_method, ctx.peer, ctx.identity, ctx.drfs) == ("Set", PEER, WHO, ["M:OUTTMP"])
    assert ctx.values == [("M:OUTTMP", 72.5)] and ctx.allowed == frozenset()
    assert ctx.metadata == {"authorization": f"Bearer {TOKEN}"}
    gate.admit(read("A:X", "B:X"))
    assert seen.seen[1].allowed == frozenset({0, 1}) and seen.seen[1].values == []


def test_a_policy_denial(audit, audit_path):
    gate = Gate([Deny()], audit_log=audit)
    refused(gate, read("M:OUTTMP"), "PERMISSION_DENIED", "denied", contains="no M:OUTTMP")
    assert gate.stats.denials_by_policy["Deny"] == 1
    (entry,) = entries(audit, audit_path)  # audited once, with the policy's reason
    assert (entry["allowed"], entry["reason"], entry["drfs"]) == (False, "no M:OUTTMP", ["M:OUTTMP"])


def test_a_policy_that_raises_is_internal(caplog):
    gate = Gate([Exploding()])
    with caplog.at_level(logging.ERROR, logger="pacsys.supervised"):
        refused(gate, read("M:OUTTMP"), "INTERNAL", "error", contains="Policy error")
    assert "event=policy_failed rpc=Read" in caplog.text


def test_the_write_gate_denies_unless_granted():
    gate = Gate(write_gate(Settings(), []))
    assert gate.admit(read("M:OUTTMP")).allowed
    refused(gate, write(("M:OUTTMP", 1.0)), "PERMISSION_DENIED", "denied")
    assert gate.stats.denials_by_policy["ReadOnlyPolicy"] == 1
    granted = Gate(write_gate(Settings(allow_writes=("M:*",)), []))
    assert granted.admit(write(("M:OUTTMP", 1.0))).allowed
    refused(granted, write(("G:AMANDA", 1.0)), "PERMISSION_DENIED", "denied", contains="G:AMANDA")


def test_write_gate_lives_with_the_policies():
    assert public_write_gate is write_gate is config_write_gate
    chain = write_gate(Settings(allow_writes=("Z:*",)), [])
    assert isinstance(chain[0], DeviceAccessPolicy) and chain[0].allows_writes
    assert isinstance(write_gate(Settings(), [])[0], ReadOnlyPolicy)


def test_a_reordering_policy_maps_replies_back_and_parses_the_final_drfs(audit, audit_path):
    gate = Gate([Reverse()], audit_log=audit)
    decision = gate.admit(read("M:OUTTMP", "G:AMANDA@p,1000", "Z:ACLTST"))
    assert decision.allowed
    assert decision.final is not None and decision.final.drfs == ["Z:ACLTST", "G:AMANDA@p,1000", "M:OUTTMP"]
    assert decision.original == [2, 1, 0]
    assert [p.device for p in decision.parsed] == ["Z:ACLTST", "G:AMANDA", "M:OUTTMP"]
    (entry,) = entries(audit, audit_path)
    assert entry["allowed"] is True and entry["final_drfs"] == decision.final.drfs
    assert entry["seq"] == decision.seq == 1


def test_a_policy_may_not_drop_drfs(audit, audit_path):
    gate = Gate([DropLast()], audit_log=audit)
    refused(gate, read("M:OUTTMP", "G:AMANDA"), "INVALID_ARGUMENT", "invalid", contains="from 2 to 1")
    (entry,) = entries(audit, audit_path)
    assert entry["allowed"] is False and entry["reason"].startswith("INVALID_ARGUMENT: a policy changed")


def test_a_new_chain_applies_to_the_next_request():
    gate = Gate()
    assert gate.admit(read("M:OUTTMP")).allowed
    gate.policies = [Deny()]
    refused(gate, read("M:OUTTMP"), "PERMISSION_DENIED", "denied")


# -- the audit ------------------------------------------------------------------------


def test_admitted_requests_are_audited_with_their_seq(audit, audit_path):
    gate = Gate(audit_log=audit)
    first = gate.admit(read("M:OUTTMP"))
    second = gate.admit(write(("M:OUTTMP", 3.0)))
    assert (first.seq, second.seq) == (1, 2)
    one, two = entries(audit, audit_path)
    assert (one["method"], one["drfs"], one["allowed"], one["peer"]) == ("Read", ["M:OUTTMP"], True, PEER)
    assert one["identity"] == WHO and "final_drfs" not in one
    assert (two["method"], two["values"], two["allowed"]) == ("Set", [["M:OUTTMP", 3.0]], True)


def test_refusals_are_audited_as_bounded_excerpts(audit, audit_path):
    gate = Gate(token=TOKEN, audit_log=audit, limits=ServicerLimits(max_drf_length=100))
    refused(gate, write(("M:OUTTMP", 1.0)), "UNAUTHENTICATED", "unauthenticated")
    long = "Z:" + "A" * 150
    refused(gate, read(*(["M:OUTTMP"] * 30 + [long])), "INVALID_ARGUMENT", "limit")
    token_entry, long_entry = entries(audit, audit_path)
    assert token_entry["allowed"] is False
    assert token_entry["reason"] == "UNAUTHENTICATED: missing or invalid bearer token"
    assert "values" not in token_entry  # the refused request's values are not kept
    assert len(long_entry["drfs"]) < 31  # an excerpt of the list
    assert long_entry["reason"].startswith("INVALID_ARGUMENT: DRF 30 is 152 characters long")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_write_the_audit_cannot_record_is_refused_and_releases_its_call():
    audit = AuditLog("/dev/full")
    try:
        gate = Gate(audit_log=audit, limits=ServicerLimits(max_calls_per_peer=1))
        refused(gate, write(("M:OUTTMP", 1.0)), "UNAVAILABLE", "audit_unavailable", contains="cannot record writes")
        assert gate.stats.writes_refused_unaudited == 1
        assert not gate.peers._table.get(WHO) or gate.peers._table[WHO].calls == 0
        assert gate.admit(read("M:OUTTMP")).allowed  # a read is not held back by the audit
        lenient = Gate(audit_log=audit, allow_unaudited_writes=True)
        assert lenient.admit(write(("M:OUTTMP", 1.0))).allowed
    finally:
        audit.close()


# -- counting and logging -------------------------------------------------------------


def test_outcomes_are_counted_timed_and_logged(caplog):
    observed = []
    gate = Gate(token=TOKEN)
    gate.stats.latency_observer = lambda rpc, seconds: observed.append((rpc, seconds))
    with caplog.at_level(logging.DEBUG, logger="pacsys.supervised"):
        refused(gate, write(("M:OUTTMP", 1.0)), "UNAUTHENTICATED", "unauthenticated")
        gate.log_outcome("Read", PEER, ["M:OUTTMP"], "allow", 0.0)
    refusal, allowed = [r for r in caplog.records if r.name == "pacsys.supervised"]
    assert refusal.levelno == logging.INFO
    assert refusal.getMessage().startswith(
        f"event=request rpc=Set peer={PEER} devices=M:OUTTMP decision=unauthenticated reason="
    )
    assert allowed.levelno == logging.DEBUG  # INFO only with log_requests
    assert [rpc for rpc, _ in observed] == ["Set", "Read"] and all(s >= 0 for _, s in observed)
    assert gate.stats.requests == {("Set", "unauthenticated"): 1, ("Read", "allow"): 1}


def test_repeated_refusals_are_logged_at_a_bounded_rate(caplog):
    gate = Gate(limits=ServicerLimits(refusal_log_interval=3600))
    with caplog.at_level(logging.INFO, logger="pacsys.supervised"):
        for _ in range(5):
            refused(gate, read("not a drf"), "INVALID_ARGUMENT", "invalid")
    assert len([r for r in caplog.records if "decision=invalid" in r.getMessage()]) == 1
    assert gate.stats.refusals_not_logged == 4
    assert gate.stats.requests[("Read", "invalid")] == 5


def test_policies_receive_the_parse_results():
    seen = Seen()
    gate = Gate([seen])
    gate.admit(read("m_outtmp@p,1000", "G:AMANDA.SETTING@I"))
    (ctx,) = seen.seen
    assert ctx.parsed == {
        "m_outtmp@p,1000": parse_cached("m_outtmp@p,1000"),
        "G:AMANDA.SETTING@I": parse_cached("G:AMANDA.SETTING@I"),
    }
    assert [ctx.device_name(d) for d in ctx.drfs] == ["M:OUTTMP", "G:AMANDA"]
    # A DRF a policy rewrote is not among them: its name comes from its text.
    rewritten = replace(ctx, drfs=["Z_ACLTST"])
    assert rewritten.device_name("Z_ACLTST") == "Z:ACLTST" and "Z_ACLTST" not in rewritten.parsed


def test_a_rewritten_drf_is_checked_again_after_the_policies():
    class Faster(Policy):
        def check(self, ctx):
            return PolicyDecision(True, ctx=replace(ctx, drfs=[d.replace("@p,1000", "@p,1") for d in ctx.drfs]))

    gate = Gate([Faster()], limits=ServicerLimits(max_rate_hz=100))
    refused(gate, read("M:OUTTMP@p,1000"), "INVALID_ARGUMENT", "limit", contains="DRF after policies 0")


def test_each_drf_is_looked_up_in_the_parse_cache_once_unless_a_policy_rewrote_it(monkeypatch):
    import pacsys.supervised.gate as gate_module

    looked_up: list[str] = []
    monkeypatch.setattr(gate_module, "parse_cached", lambda text: looked_up.append(text) or parse_cached(text))

    class Rewrite(Policy):
        def check(self, ctx):
            return PolicyDecision(allowed=True, ctx=replace(ctx, drfs=["G:AMANDA@I", *ctx.drfs[1:]]))

    decision = Gate().admit(read("M:OUTTMP@I", "Z:ACLTST@I"))
    assert decision.refusal is None and looked_up == ["M:OUTTMP@I", "Z:ACLTST@I"]
    assert [p.device for p in decision.parsed] == ["M:OUTTMP", "Z:ACLTST"]
    looked_up.clear()
    decision = Gate([Rewrite()]).admit(read("M:OUTTMP@I", "Z:ACLTST@I"))
    assert looked_up == ["M:OUTTMP@I", "Z:ACLTST@I", "G:AMANDA@I"]  # only the rewritten one again
    assert [p.device for p in decision.parsed] == ["G:AMANDA", "Z:ACLTST"]
