"""What bounds the audit log's growth: DRF lists cut with a digest of the rest, per-client byte
budgets and their summaries, the writer's own rotation, and the free-space watermarks.

The budget tests drive `AuditLog` with a clock of their own (the refill is time), so they
assert counts, not rates; the process test bounds a real `pacsys-supervisor`'s audit growth by
the number of requests it answered.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import replace

import grpc
import pytest
from helpers import wait_for

from pacsys._proto.controls.common.v1 import device_pb2
from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2, DAQ_pb2_grpc
from pacsys.settings import ConfigError, Settings
from pacsys.supervised import AuditLimits, AuditLog, PolicyDecision, RequestContext, audit_files, read_audit
from pacsys.supervised._audit import read_audit_proto
from pacsys.supervised.gate import Gate, GateRequest

ALLOW = PolicyDecision(True)
# No budget, no watermark, no rotation: each test turns on what it looks at.
OFF = AuditLimits(client_bytes_per_second=0, min_free_bytes=0, reserve_bytes=0, max_bytes=0)


def long_drf(i: int, chars: int = 512) -> str:
    """A valid DRF of `chars` characters naming a device that does not exist."""
    head, tail = f"Z:U{i:05d}[0:", "]@I"
    return head + "0" * (chars - len(head) - len(tail) - 1) + "1" + tail


def read_ctx(*drfs: str, peer: str = "ipv4:10.0.0.1:5000", identity: str = "") -> RequestContext:
    raw = DAQ_pb2.ReadingList(drf=list(drfs))
    return RequestContext(list(drfs), "Read", peer, {}, [], raw, frozenset(range(len(drfs))), identity=identity)


def set_ctx(*settings: tuple[str, float], peer: str = "ipv4:10.0.0.1:5000") -> RequestContext:
    raw = DAQ_pb2.SettingList(
        setting=[DAQ_pb2.Setting(device=d, value=device_pb2.Value(scalar=v)) for d, v in settings]
    )
    return RequestContext([d for d, _ in settings], "Set", peer, {}, list(settings), raw)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def seqs_accounted(entries: list[dict]) -> list[int]:
    """Every seq an `in` line holds or a summary counts (a summary's by its range and count)."""
    listed = sorted(e["seq"] for e in entries if e["dir"] == "in")
    summarised = sum(e["requests"] for e in entries if e["dir"] == "summary")
    return listed + [0] * summarised


# -- a Read's DRF list -----------------------------------------------------------------------------


def test_a_long_read_lists_its_first_drfs_and_the_count_and_digest_of_the_rest(tmp_path):
    path = tmp_path / "audit.jsonl"
    drfs = [long_drf(i) for i in range(5)]
    with AuditLog(path, limits=replace(OFF, drf_chars=1100)) as audit:
        audit.log_request(read_ctx(*drfs), ALLOW)
        audit.log_request(read_ctx("M:OUTTMP@I"), ALLOW)
        # A Set's entry is whole, however long (it is bounded by the Set limits, and needs a token).
        audit.log_request(set_ctx(*[(long_drf(i), 1.0) for i in range(5)]), ALLOW, must_record=True)
        assert audit.stats.drf_lists_cut == 1
    cut, short, whole = read_audit(path)
    assert cut["drfs"] == drfs[:2]
    rest = drfs[2:]
    expected = hashlib.sha256(json.dumps(rest, separators=(",", ":")).encode()).hexdigest()
    assert cut["drfs_left_out"] == {"count": 3, "chars": 3 * 512, "sha256": expected}
    assert "drfs_left_out" not in short and short["drfs"] == ["M:OUTTMP@I"]
    assert whole["drfs"] == [long_drf(i) for i in range(5)] and "drfs_left_out" not in whole
    table = subprocess.run(
        [sys.executable, "-m", "pacsys.supervised.audit_command", str(path)], capture_output=True, text=True, timeout=60
    )
    assert f"... and 3 more DRFs (sha256 {expected[:16]})" in table.stdout


# -- per-client budgets ----------------------------------------------------------------------------


def test_a_client_over_its_budget_is_summarised_and_every_seq_is_accounted_for(tmp_path):
    path = tmp_path / "audit.jsonl"
    clock = Clock()
    limits = replace(OFF, client_bytes_per_second=1000, client_burst_bytes=4096, summary_interval=1.0)
    flooder, other = "ipv4:10.0.0.1:5000", "ipv4:10.0.0.2:5000"
    with AuditLog(path, limits=limits, clock=clock) as audit:
        for _ in range(50):
            audit.log_request(read_ctx("M:OUTTMP@I", peer=flooder), ALLOW)
        written_first = sum(1 for e in read_audit(path) if e["dir"] == "in")
        assert 5 < written_first < 50  # the burst, then nothing more in full
        # Another client has a budget of its own; a Set of the flooder is written in full.
        audit.log_request(read_ctx("G:AMANDA@I", peer=other), ALLOW)
        set_seq = audit.log_request(set_ctx(("Z:ACLTST", 1.0), peer=flooder), ALLOW, must_record=True)
        assert not [e for e in read_audit(path) if e["dir"] == "summary"]  # not due yet
        clock.now += 1.5  # the summary is due; the refill lets a few more entries in
        for _ in range(20):
            audit.log_request(read_ctx("M:OUTTMP@I", peer=flooder), ALLOW)
        summarised = audit.stats.summarised["audit_client_bytes_per_second"]
    entries = list(read_audit(path))
    summaries = [e for e in entries if e["dir"] == "summary"]
    assert len(summaries) == 2  # the one that came due, the rest at close
    assert sum(e["requests"] for e in summaries) == summarised > 50 - written_first
    first = summaries[0]
    assert first["identity"] == "ipv4:10.0.0.1" and first["peer"] == flooder
    assert first["requests"] == 50 - written_first and first["methods"] == {"Read": first["requests"]}
    assert first["reasons"] == {"audit_client_bytes_per_second": first["requests"]}
    assert (first["first_seq"], first["last_seq"]) == (written_first + 1, 50)
    assert first["bytes"] > 0 and len(first["sha256"]) == 64 and first["allowed"] == first["requests"]
    assert len(seqs_accounted(entries)) == 72  # every request, in a line or in a summary
    assert [e["seq"] for e in entries if e.get("method") == "Set"] == [set_seq]
    assert any(e["dir"] == "in" and e["peer"] == other for e in entries)


def test_summary_lines_keep_one_flooding_client_within_its_budget(tmp_path):
    """Written bytes stay within burst + rate x time however many requests come."""
    path = tmp_path / "audit.jsonl"
    clock = Clock()
    limits = replace(OFF, client_bytes_per_second=2000, client_burst_bytes=8192, summary_interval=1.0)
    with AuditLog(path, limits=limits, clock=clock) as audit:
        for _ in range(20):  # 20 s of 200 requests a second
            for _ in range(200):
                audit.log_request(read_ctx("M:OUTTMP@I"), ALLOW)
            clock.now += 1.0
    size = path.stat().st_size
    assert size <= 8192 + 2000 * 20 + 1000  # (+ the summary written at close, past the budget)
    assert len(seqs_accounted(list(read_audit(path)))) == 4000


def test_refusals_and_unauthenticated_set_denials_count_against_the_budget_but_sets_with_a_token_do_not(tmp_path):
    path = tmp_path / "audit.jsonl"
    limits = replace(OFF, client_bytes_per_second=1, client_burst_bytes=2048)

    def gate_with(token):
        return Gate(token=token, audit_log=AuditLog(path, limits=limits))

    def refused_set(gate, n):
        for _ in range(n):
            request = GateRequest("Set", "ipv4:10.0.0.1:5", "ipv4:10.0.0.1", (), ["Z:ACLTST"], [_value(1.0)])
            assert gate.admit(request).refusal is not None

    # A token set: Sets without it are refused (summarised past the budget), Sets with it that a
    # policy denies are recorded in full whatever the budget.
    gate = gate_with("t0ken")
    gate.policies = [_DenyAll()]
    refused_set(gate, 30)
    metadata = (("authorization", "Bearer t0ken"),)
    for _ in range(30):
        request = GateRequest("Set", "ipv4:10.0.0.1:5", "ipv4:10.0.0.1", metadata, ["Z:ACLTST"], [_value(2.0)])
        assert gate.admit(request).refusal.decision == "denied"
    gate.audit.close()
    entries = list(read_audit(path))
    refusals = [e for e in entries if e["dir"] == "in" and e["reason"].startswith("UNAUTHENTICATED")]
    denials = [e for e in entries if e["dir"] == "in" and e["reason"] == "no"]
    assert 0 < len(refusals) < 30 and len(denials) == 30
    assert sum(e["requests"] for e in entries if e["dir"] == "summary") == 30 - len(refusals)
    # No token at all: anyone may send a Set, and its denials count against its budget.
    path.unlink()
    gate = gate_with(None)
    gate.policies = [_DenyAll()]
    refused_set(gate, 30)
    gate.audit.close()
    entries = list(read_audit(path))
    assert 0 < len([e for e in entries if e["dir"] == "in"]) < 30
    assert len(seqs_accounted(entries)) == 30


class _DenyAll:
    name = "deny_all"

    def check(self, ctx):
        return PolicyDecision(False, "no", policy=self.name)

    def needs_current(self, ctx):
        return []

    def on_written(self, ctx, outcomes):
        pass


def _value(x: float) -> device_pb2.Value:
    return device_pb2.Value(scalar=x)


# -- free space ------------------------------------------------------------------------------------


def test_below_the_reserve_reads_are_summarised_sets_are_written_and_the_warning_is_rate_limited(tmp_path, caplog):
    path = tmp_path / "audit.jsonl"
    huge = 1 << 62  # more than any disk has free
    limits = replace(OFF, min_free_bytes=huge, reserve_bytes=huge)
    with caplog.at_level(logging.WARNING, logger="pacsys.supervised.audit"):
        with AuditLog(path, limits=limits) as audit:
            assert audit.low_space == 2 and audit.disk_free_bytes is not None
            for _ in range(100):
                audit.log_request(read_ctx("M:OUTTMP@I"), ALLOW)
            audit.log_request(set_ctx(("Z:ACLTST", 1.0)), ALLOW, must_record=True)
            assert audit.stats.summarised["audit_reserve_bytes"] == 100
    entries = list(read_audit(path))
    assert [e["method"] for e in entries if e["dir"] == "in"] == ["Set"]
    (summary,) = [e for e in entries if e["dir"] == "summary"]
    assert summary["requests"] == 100 and summary["reasons"] == {"audit_reserve_bytes": 100}
    warnings = [r.getMessage() for r in caplog.records if "event=audit_disk_low" in r.getMessage()]
    assert len(warnings) == 1 and "reads=summarised" in warnings[0]


def test_below_min_free_only_warns(tmp_path, caplog):
    path = tmp_path / "audit.jsonl"
    with caplog.at_level(logging.WARNING, logger="pacsys.supervised.audit"):
        with AuditLog(path, limits=replace(OFF, min_free_bytes=1 << 62)) as audit:
            assert audit.low_space == 1
            audit.log_request(read_ctx("M:OUTTMP@I"), ALLOW)
    assert [e["dir"] for e in read_audit(path)] == ["in"]
    assert any("event=audit_disk_low" in r.getMessage() and "reads=recorded" in r.getMessage() for r in caplog.records)


def test_the_reserve_cannot_exceed_the_warning_level():
    with pytest.raises(ConfigError, match="'audit_reserve_bytes' .* must not exceed 'audit_min_free_bytes'"):
        Settings(audit_min_free_bytes=100, audit_reserve_bytes=200)
    with pytest.raises(ConfigError, match="'audit_max_bytes' must be 0 \\(off\\) or at least 4096"):
        Settings(audit_max_bytes=100)


# -- rotation --------------------------------------------------------------------------------------


def test_the_writer_rotates_at_max_bytes_keeps_keep_files_and_rotates_the_capture_with_the_log(tmp_path):
    path, proto = tmp_path / "audit.jsonl", tmp_path / "audit.bin"
    with AuditLog(path, proto, limits=replace(OFF, max_bytes=4096, keep=2)) as audit:
        for i in range(200):
            audit.log_request(read_ctx(f"M:OUTTMP[{i}]@I"), ALLOW)
        assert audit.stats.rotations > 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "audit.bin", "audit.bin.1", "audit.bin.2", "audit.jsonl", "audit.jsonl.1", "audit.jsonl.2",
    ]  # fmt: skip
    for suffix in ("", ".1", ".2"):
        log = tmp_path / f"audit.jsonl{suffix}"
        assert log.stat().st_size <= 4096
        # The capture's file holds the frames of the same requests, in the same order.
        drfs = [e["drfs"] for e in read_audit(log)]
        frames = [list(m.drf) for _, m in read_audit_proto(tmp_path / f"audit.bin{suffix}", decode=True)]
        assert drfs == frames and drfs
    seqs = [e["seq"] for f in audit_files(path) for e in read_audit(f)]
    assert seqs == list(range(seqs[0], 201))  # the newest, whole and in order; the oldest dropped


def test_audit_files_reads_the_writers_and_logrotates_files_in_order(tmp_path):
    path = tmp_path / "audit.jsonl"
    clock_files = [
        ("audit.jsonl-20261127-1764201600.gz", 1),  # logrotate's, compressed
        ("audit.jsonl.2", 3),  # the writer's, older
        ("audit.jsonl-20261128-1764288000", 2),  # logrotate's newest
        ("audit.jsonl.1", 4),
        ("audit.jsonl", 5),
    ]
    for name, seq in clock_files:
        line = json.dumps({"ts": f"2026-11-2{seq}T00:00:00+00:00", "seq": seq, "dir": "in"}) + "\n"
        if name.endswith(".gz"):
            with gzip.open(tmp_path / name, "wt") as f:
                f.write(line)
        else:
            (tmp_path / name).write_text(line)
    (tmp_path / "audit.jsonl.bak").write_text("not ours\n")
    files = audit_files(path)
    assert [os.path.basename(f) for f in files] == [
        "audit.jsonl-20261127-1764201600.gz", "audit.jsonl-20261128-1764288000", "audit.jsonl.2", "audit.jsonl.1",
        "audit.jsonl",
    ]  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-m", "pacsys.supervised.audit_command", "--all", "--json", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert [json.loads(line)["seq"] for line in out.stdout.splitlines()] == [1, 2, 3, 4, 5], out.stderr


# -- a real pacsys-supervisor ------------------------------------------------------------------------


def test_a_client_reading_long_drfs_grows_a_real_services_audit_by_a_bounded_amount_per_request(supervisor, tmp_path):
    """One-shot Reads of 1,000 valid 512-character DRFs: 515 KB of audit each before the budget.

    The client's rate is 1 byte/s here, so that its bytes do not depend on how long the run
    takes on a loaded machine: what gets in is the burst (32 KiB), and one summary line.
    """
    audit = tmp_path / "audit.jsonl"
    sup = supervisor(
        "--workers", "0", "--backend", "fake", "--host", "127.0.0.1", "--port", "0", "--audit-path", str(audit),
        "--audit-client-bytes-per-second", "1", "--audit-client-burst-bytes", "32768",
    )  # fmt: skip
    request = DAQ_pb2.ReadingList(drf=[long_drf(i) for i in range(1000)])
    n = 40
    with grpc.insecure_channel(f"127.0.0.1:{sup.port}") as channel:
        stub = DAQ_pb2_grpc.DAQStub(channel)
        for _ in range(n):
            assert len(list(stub.Read(request, timeout=30))) == 1000
    # The last summary comes without another request: the server flushes the log a few times a second.
    wait_for(lambda: len(seqs_accounted(list(read_audit(audit)))) == n, what="every request accounted", timeout=30)
    sup.proc.send_signal(signal.SIGTERM)
    assert sup.wait_exit(30) == 0
    grown = audit.stat().st_size
    assert grown < n * 2048, grown  # 21 MB before; 176 KB with the DRF lists cut but no budget
    entries = list(read_audit(audit))
    assert len(seqs_accounted(entries)) == n
    assert sum(e["requests"] for e in entries if e["dir"] == "summary") > n / 2


@pytest.mark.skipif(shutil.which("pacsys-audit") is None, reason="pacsys-audit is not installed")
def test_pacsys_audit_shows_a_summary_row_under_a_device_filter(tmp_path):
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, limits=replace(OFF, min_free_bytes=1 << 62, reserve_bytes=1 << 62)) as audit:
        audit.log_request(read_ctx("Z:ACLTST@I"), ALLOW)
    out = subprocess.run(
        ["pacsys-audit", str(path), "--device", "Z:ACLTST", "--method", "Read"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    (row,) = out.stdout.splitlines()[1:]
    assert " summary " in row and "requests=1" in row and "audit_reserve_bytes" in row
