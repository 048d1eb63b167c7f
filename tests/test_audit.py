"""Tests for pacsys.supervised._audit."""

import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from datetime import datetime

import pytest

from pacsys._proto.controls.common.v1 import device_pb2, status_pb2
from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2
from pacsys.supervised._audit import (
    TAG_READ_REPLY,
    TAG_READ_REQUEST,
    TAG_SETTING_REPLY,
    TAG_SETTING_REQUEST,
    AuditLog,
    AuditUnavailable,
    read_audit,
    read_audit_proto,
)
from pacsys.supervised._policies import PolicyDecision, RequestContext
from pacsys.supervised.audit_command import main

PEER = "ipv4:10.0.0.1:5000"
ALLOW = PolicyDecision(True)


def read_request(*drfs: str, peer: str = "ipv4:10.0.0.1:5000") -> RequestContext:
    raw = DAQ_pb2.ReadingList(drf=list(drfs))
    return RequestContext(list(drfs), "Read", peer, {}, [], raw, frozenset(range(len(drfs))))


def set_request(*settings: tuple[str, float], peer: str = "ipv4:10.0.0.2:6000") -> RequestContext:
    raw = DAQ_pb2.SettingList(
        setting=[DAQ_pb2.Setting(device=drf, value=device_pb2.Value(scalar=v)) for drf, v in settings]
    )
    return RequestContext([d for d, _ in settings], "Set", peer, {}, list(settings), raw)


def reading_reply(index: int) -> DAQ_pb2.ReadingReply:
    reading = DAQ_pb2.Reading(data=device_pb2.Value(scalar=72.5))
    return DAQ_pb2.ReadingReply(index=index, readings=DAQ_pb2.Readings(reading=[reading]))


def error_reply(index: int) -> DAQ_pb2.ReadingReply:
    return DAQ_pb2.ReadingReply(index=index, status=status_pb2.Status(facility_code=17, status_code=-26))


def setting_reply(*codes: int) -> DAQ_pb2.SettingReply:
    return DAQ_pb2.SettingReply(status=[status_pb2.Status(facility_code=17, status_code=c) for c in codes])


@pytest.fixture
def paths(tmp_path):
    return tmp_path / "audit.jsonl", tmp_path / "audit.binpb"


def write_session(json_path, proto_path, log_responses=True):
    """A Read with two replies, an allowed Set, a denied Set and an event."""
    with AuditLog(json_path, proto_path=proto_path, log_responses=log_responses) as audit:
        seq_read = audit.log_request(read_request("M:OUTTMP@I", "Z:NOPE@I"), ALLOW)
        audit.log_response(seq_read, PEER, "Read", reading_reply(0))
        audit.log_response(seq_read, PEER, "Read", error_reply(1))
        seq_set = audit.log_request(set_request(("M:OUTTMP.SETTING@N", 80.0)), ALLOW)
        audit.log_response(seq_set, "ipv4:10.0.0.2:6000", "Set", setting_reply(0))
        audit.log_request(
            set_request(("G:AMANDA@N", 1e6)), PolicyDecision(False, "Value 1000000.0 for G:AMANDA outside [0, 10]")
        )
        audit.log_event(seq_set, "write_outcome_unknown", drfs=["M:OUTTMP.SETTING@N"])
    return seq_read, seq_set


class TestJsonLog:
    def test_round_trip(self, paths):
        json_path, proto_path = paths
        write_session(json_path, proto_path)
        entries = list(read_audit(json_path))
        assert [(e["seq"], e["dir"]) for e in entries] == [
            (1, "in"),
            (1, "out"),
            (1, "out"),
            (2, "in"),
            (2, "out"),
            (3, "in"),
            (2, "event"),
        ]
        read_in, ok_reply, err_reply, set_in, set_out, denied, event = entries
        assert read_in["peer"] == "ipv4:10.0.0.1:5000"
        assert read_in["method"] == "Read" and read_in["drfs"] == ["M:OUTTMP@I", "Z:NOPE@I"]
        assert read_in["allowed"] is True and read_in["reason"] is None
        assert "values" not in read_in and "final_drfs" not in read_in
        assert datetime.fromisoformat(read_in["ts"]).tzinfo is not None
        assert (ok_reply["method"], ok_reply["index"], ok_reply["readings"]) == ("Read", 0, 1)
        assert err_reply["index"] == 1 and err_reply["status"] == [17, -26]
        assert set_in["values"] == [["M:OUTTMP.SETTING@N", 80.0]]
        assert "final_drfs" not in set_in  # unchanged by the policies
        assert set_out["statuses"] == [[17, 0]]
        assert denied["allowed"] is False and denied["reason"].startswith("Value 1000000.0")
        assert event["event"] == "write_outcome_unknown" and event["drfs"] == ["M:OUTTMP.SETTING@N"]

    def test_final_drfs_only_when_changed(self, paths):
        with AuditLog(paths[0]) as audit:
            ctx = read_request("T:OUTTMP")
            audit.log_request(ctx, PolicyDecision(True, ctx=replace(ctx, drfs=["M:OUTTMP"])))
        assert next(read_audit(paths[0]))["final_drfs"] == ["M:OUTTMP"]

    def test_no_out_lines_without_log_responses(self, paths):
        write_session(*paths, log_responses=False)
        assert [e["dir"] for e in read_audit(paths[0])] == ["in", "in", "in", "event"]
        tags = [tag for tag, _ in read_audit_proto(paths[1])]
        assert tags == [TAG_READ_REQUEST, TAG_SETTING_REQUEST, TAG_SETTING_REQUEST]

    def test_odd_values_are_serialized(self, paths):
        values = [
            ("M:A", b"\x01\xff"),
            ("M:B", float("nan")),
            ("M:C", [1, (2.5, float("inf"))]),
            ("M:D", {1: object}),
            ("M:E", object()),
        ]
        ctx = RequestContext([d for d, _ in values], "Set", "p", {}, values, None)
        with AuditLog(paths[0]) as audit:
            audit.log_request(ctx, ALLOW)
            audit.log_event(1, "odd", blob=b"\x00", loop=float("-inf"))
        entry, event = read_audit(paths[0])
        assert [v for _, v in entry["values"]][:3] == ["01ff", "nan", [1, [2.5, "inf"]]]
        assert entry["values"][3][1] == {"1": repr(object)}
        assert entry["values"][4][1].startswith("<object object")
        assert event["blob"] == "00" and event["loop"] == "-inf"

    def test_event_fields_cannot_replace_standard_keys(self, paths):
        with AuditLog(paths[0]) as audit:
            audit.log_event(5, "x", seq=99, dir="in", note="kept")
        event = next(read_audit(paths[0]))
        assert (event["seq"], event["dir"], event["note"]) == (5, "event", "kept")

    def test_seq_is_monotonic_and_close_then_reopen_appends(self, paths):
        audit = AuditLog(paths[0])
        assert [audit.log_request(read_request("M:A"), ALLOW) for _ in range(3)] == [1, 2, 3]
        audit.close()
        assert audit.log_request(read_request("M:A"), ALLOW) == 4  # reopened in append mode
        audit.close()
        assert [e["seq"] for e in read_audit(paths[0])] == [1, 2, 3, 4]

    def test_flush_interval(self, paths):
        audit = AuditLog(paths[0], flush_interval=3)
        audit.log_request(read_request("M:A"), ALLOW)
        audit.log_request(read_request("M:A"), ALLOW)
        assert paths[0].read_text() == ""
        audit.log_request(read_request("M:A"), ALLOW)
        assert len(paths[0].read_text().splitlines()) == 3
        audit.log_request(read_request("M:A"), ALLOW)
        audit.flush()
        assert len(paths[0].read_text().splitlines()) == 4
        audit.close()

    def test_bad_flush_interval(self, paths):
        with pytest.raises(ValueError):
            AuditLog(paths[0], flush_interval=0)

    def test_malformed_line_is_an_error(self, paths):
        paths[0].write_text('{"seq": 1}\n\n{"seq": 2, "dir"\n')
        entries = read_audit(paths[0])
        assert next(entries) == {"seq": 1}
        with pytest.raises(ValueError, match=":3:"):
            next(entries)


class TestProtoCapture:
    def test_round_trip(self, paths):
        write_session(*paths)
        frames = list(read_audit_proto(paths[1]))
        assert [tag for tag, _ in frames] == [
            TAG_READ_REQUEST,
            TAG_READ_REPLY,
            TAG_READ_REPLY,
            TAG_SETTING_REQUEST,
            TAG_SETTING_REPLY,
            TAG_SETTING_REQUEST,
        ]
        assert frames[0][1] == read_request("M:OUTTMP@I", "Z:NOPE@I").raw_request.SerializeToString()

        decoded = [message for _, message in read_audit_proto(paths[1], decode=True)]
        assert list(decoded[0].drf) == ["M:OUTTMP@I", "Z:NOPE@I"]
        assert decoded[1] == reading_reply(0) and decoded[2] == error_reply(1)
        assert decoded[3].setting[0].device == "M:OUTTMP.SETTING@N"
        assert decoded[3].setting[0].value.scalar == 80.0
        assert decoded[4] == setting_reply(0)

    def test_large_payload_uses_multibyte_length(self, paths):
        drfs = [f"M:DEV{i:04d}@I" for i in range(200)]
        with AuditLog(paths[0], proto_path=paths[1]) as audit:
            audit.log_request(read_request(*drfs), ALLOW)
        ((tag, message),) = read_audit_proto(paths[1], decode=True)
        assert tag == TAG_READ_REQUEST and list(message.drf) == drfs

    def test_truncated_frame_is_an_error(self, paths):
        write_session(*paths)
        data = paths[1].read_bytes()
        paths[1].write_bytes(data[:-3])
        frames = read_audit_proto(paths[1])
        for _ in range(5):
            next(frames)
        with pytest.raises(ValueError, match="truncated frame"):
            next(frames)

    def test_truncated_length_and_unknown_tag(self, tmp_path):
        cut = tmp_path / "cut.binpb"
        cut.write_bytes(bytes([TAG_READ_REQUEST, 0x80]))
        with pytest.raises(ValueError, match="length cut short"):
            list(read_audit_proto(cut))
        bad = tmp_path / "bad.binpb"
        bad.write_bytes(bytes([9, 0]))
        with pytest.raises(ValueError, match="unknown frame tag 9"):
            list(read_audit_proto(bad))

    def test_request_without_protobuf_gets_no_frame(self, paths):
        ctx = RequestContext(["M:A"], "Read", "p", {}, [], raw_request=None)
        with AuditLog(paths[0], proto_path=paths[1]) as audit:
            audit.log_request(ctx, ALLOW)
        assert list(read_audit_proto(paths[1])) == []
        assert len(list(read_audit(paths[0]))) == 1


class TestFailures:
    def test_directory_removed(self, tmp_path, caplog):
        folder = tmp_path / "logs"
        folder.mkdir()
        audit = AuditLog(folder / "audit.jsonl", proto_path=folder / "audit.binpb", log_responses=True)
        audit.log_request(read_request("M:A"), ALLOW)
        shutil.rmtree(folder)
        with caplog.at_level(logging.ERROR, logger="pacsys.supervised.audit"):
            audit.close()  # notices the files are gone; the next entry must reopen, and cannot
            seq = audit.log_request(read_request("M:A"), ALLOW)
            audit.log_response(seq, PEER, "Read", reading_reply(0))
            audit.log_event(seq, "x")
            audit.flush()
            audit.close()
        assert seq == 2
        assert not audit.healthy
        assert "deleted while open" in caplog.text
        # One traceback per file, not one per entry.
        assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 2

    def test_file_deleted_while_open(self, paths):
        """Entries flushed into a deleted file reach no reader: a write that must be recorded is
        refused, the log says it is not recording, and the next entry starts a new file by the name."""
        audit = AuditLog(paths[0])
        audit.log_request(read_request("M:A"), ALLOW)
        paths[0].unlink()
        with pytest.raises(AuditUnavailable):
            audit.log_request(set_request(("Z:ACLTST", 1.0)), ALLOW, must_record=True)
        assert not audit.healthy
        audit.log_request(set_request(("Z:ACLTST", 2.0)), ALLOW, must_record=True)
        assert audit.healthy
        assert [e.get("values") for e in read_audit(paths[0])] == [[["Z:ACLTST", 2.0]]]
        audit.close()

    @pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
    def test_disk_full(self, caplog):
        audit = AuditLog("/dev/full")
        with caplog.at_level(logging.ERROR, logger="pacsys.supervised.audit"):
            assert audit.log_request(read_request("M:A"), ALLOW) == 1
            audit.close()
        assert not audit.healthy
        assert "event=audit_file_failed path=/dev/full action=flush" in caplog.text

    def test_failed_write_is_rolled_back(self, paths):
        audit = AuditLog(paths[0], flush_interval=2)
        audit.log_request(read_request("M:A"), ALLOW)
        audit.log_request(read_request("M:B"), ALLOW)  # flushed: a record boundary
        audit.log_request(read_request("M:C"), ALLOW)  # buffered, lost below

        real = audit._json._file
        assert real is not None

        class HalfWrites:
            """Lets half a record through, then fails like a full disk."""

            def write(self, data):
                real.write(data[: len(data) // 2])
                real.flush()
                raise OSError(28, "No space left on device")

            def close(self):
                real.close()

        audit._json._file = HalfWrites()  # type: ignore[assignment]
        audit.log_request(read_request("M:D"), ALLOW)
        assert not audit.healthy
        audit.log_request(read_request("M:E"), ALLOW)  # reopens and carries on
        audit.flush()
        assert audit.healthy
        audit.close()
        assert [e["drfs"] for e in read_audit(paths[0])] == [["M:A"], ["M:B"], ["M:E"]]

    def test_unknown_method_frame_is_skipped(self, paths, caplog):
        ctx = RequestContext(["M:A"], "Alarms", "p", {}, [], DAQ_pb2.ReadingList(drf=["M:A"]))
        with AuditLog(paths[0], proto_path=paths[1]) as audit, caplog.at_level(logging.ERROR):
            audit.log_request(ctx, ALLOW)
        assert "no frame tag" in caplog.text
        assert next(read_audit(paths[0]))["method"] == "Alarms"

    def test_unsummarizable_reply_still_logged(self, paths, caplog):
        with AuditLog(paths[0], log_responses=True) as audit, caplog.at_level(logging.ERROR):
            audit.log_response(1, PEER, "Read", object())
        assert next(read_audit(paths[0]))["dir"] == "out"
        assert "event=audit_reply_summary_failed rpc=Read seq=1" in caplog.text


class TestCli:
    def test_table(self, paths, capsys):
        write_session(*paths)
        assert main([str(paths[0])]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0].split() == ["TIME", "SEQ", "IDENTITY", "PEER", "METHOD", "RESULT", "DETAIL"]
        assert len(out) == 8
        set_row = out[4]
        assert "ipv4:10.0.0.2:6000" in set_row and "allowed" in set_row
        assert "M:OUTTMP.SETTING@N=80.0" in set_row
        denied = out[6]
        assert "DENIED" in denied and "G:AMANDA@N=1000000.0" in denied and "outside [0, 10]" in denied
        assert "write_outcome_unknown" in out[7]

    def test_filters(self, paths, capsys):
        write_session(*paths)
        assert main([str(paths[0]), "--method", "Set", "--device", "m:out*", "--json"]) == 0
        entries = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [(e["seq"], e["dir"]) for e in entries] == [(2, "in"), (2, "out"), (2, "event")]

        assert main([str(paths[0]), "--since", "2999-01-01T00:00:00+00:00", "--json"]) == 0
        assert capsys.readouterr().out == ""
        assert main([str(paths[0]), "--since", "2000-01-01", "--json"]) == 0
        assert len(capsys.readouterr().out.splitlines()) == 7

    def test_proto(self, paths, capsys):
        write_session(*paths)
        assert main([str(paths[1]), "--proto"]) == 0
        out = capsys.readouterr().out.splitlines()
        assert len(out) == 7
        assert "ReadingList" in out[1] and "M:OUTTMP@I, Z:NOPE@I" in out[1]
        assert "index=1 status=[17, -26]" in out[3]
        assert "SettingList" in out[4] and "M:OUTTMP.SETTING@N=80.0" in out[4]

        assert main([str(paths[1]), "--proto", "--device", "G:*", "--json"]) == 0
        (frame,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert frame["type"] == "SettingList" and frame["message"]["setting"][0]["device"] == "G:AMANDA@N"

    def test_errors(self, paths, capsys):
        write_session(*paths)
        paths[1].write_bytes(paths[1].read_bytes()[:-1])
        assert main([str(paths[1]), "--proto"]) == 1
        assert "truncated frame" in capsys.readouterr().err
        missing = paths[0].parent / "missing.jsonl"
        for args in ([str(missing)], [str(missing), "--proto"]):
            assert main(args) == 1
            out, err = capsys.readouterr()
            assert out == ""  # no header before the error
            assert err == f"pacsys-audit: {missing}: cannot read it: No such file or directory\n"
        with pytest.raises(SystemExit):
            main([str(paths[1]), "--proto", "--since", "2020-01-01"])
        with pytest.raises(SystemExit) as exited:
            main([str(paths[0]), "--since", "yesterday"])
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert "--since: takes an ISO 8601 date or time, such as 2026-11-27" in err and "'yesterday'" in err

    def test_the_table_shows_who_and_escapes_what_clients_sent(self, paths, capsys):
        """Two mutual-TLS clients behind one address are told apart; a DRF, a value or a reason
        holding line breaks, terminal escapes or bidi controls cannot forge or hide a row."""
        forged = "Z:ACLTST\x1b[2K\r2026-11-27T06:16:31+00:00     9 CN=ops-1  allowed  Z:ACLTST=0\n\u202eX"
        with AuditLog(paths[0]) as audit:
            for subject, value in (("CN=ops-1,O=Lab", 1.0), ("CN=guest,O=Lab", 2.0)):
                audit.log_request(replace(set_request(("Z:ACLTST", value)), identity=subject), ALLOW)
            ctx = replace(set_request((forged, 3.0)), identity="CN=x\u2028y")
            audit.log_request(ctx, PolicyDecision(False, "no\rentry\x9b"))
        assert main([str(paths[0])]) == 0
        rows = capsys.readouterr().out.split("\n")[1:-1]
        assert len(rows) == 3
        assert [row.split()[2:4] for row in rows[:2]] == [
            ["CN=ops-1,O=Lab", "ipv4:10.0.0.2:6000"],
            ["CN=guest,O=Lab", "ipv4:10.0.0.2:6000"],
        ]
        denied = rows[2]
        assert all(ch.isprintable() for ch in denied), repr(denied)
        assert "DENIED" in denied and "CN=x\\u2028y" in denied
        assert "Z:ACLTST\\x1b[2K\\r2026-11-27T06:16:31+00:00" in denied and "\\n\\u202eX=3.0" in denied
        assert "(no\\rentry\\x9b)" in denied


# -- files on disk: modes, rotation, a closed pipe ---------------------------------------------------------


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_files_are_created_0640_whatever_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        log = AuditLog(tmp_path / "audit.jsonl", tmp_path / "audit.bin")
    finally:
        os.umask(old)
    log.log_request(read_request("M:OUTTMP"), ALLOW)
    log.close()
    for name in ("audit.jsonl", "audit.bin"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name


def test_an_existing_file_keeps_its_mode(tmp_path):
    path = tmp_path / "audit.jsonl"
    path.write_text("")
    path.chmod(0o600)
    AuditLog(path).close()
    assert path.stat().st_mode & 0o777 == 0o600


def test_reopen_follows_a_rotation(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    log.log_request(read_request("M:OUTTMP"), ALLOW)
    path.rename(tmp_path / "audit.jsonl.1")  # what logrotate does
    log.log_request(read_request("G:AMANDA"), ALLOW)  # still the old file: it is open
    log.reopen()
    assert path.exists() and path.stat().st_mode & 0o777 == 0o640  # there at once, for logrotate's next look
    log.log_request(read_request("Z:ACLTST"), ALLOW)
    log.close()
    assert [e["drfs"] for e in read_audit(tmp_path / "audit.jsonl.1")] == [["M:OUTTMP"], ["G:AMANDA"]]
    assert [(e["seq"], e["drfs"]) for e in read_audit(path)] == [(3, ["Z:ACLTST"])]


def test_pacsys_audit_into_head_ends_quietly(tmp_path):
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, flush_interval=1000) as log:
        for i in range(5000):  # far more than a pipe holds
            log.log_request(read_request(f"Z:DEV{i:04d}"), ALLOW)
    command = "import sys; from pacsys.supervised.audit_command import main; sys.exit(main(sys.argv[1:]))"
    reader = subprocess.Popen(
        [sys.executable, "-c", command, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert reader.stdout is not None and reader.stderr is not None
    head = [reader.stdout.readline() for _ in range(3)]  # like `| head -3`
    reader.stdout.close()
    assert reader.wait(30) == 0
    assert reader.stderr.read() == b""
    assert head[0].startswith(b"TIME") and b"Z:DEV0001" in head[2]
    reader.stderr.close()
