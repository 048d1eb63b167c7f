"""Log lines as a log shipper reads them: one record per line, every value where it belongs.

A client chooses the DRFs, and DRFs end up in log lines. These tests send hostile DRFs through
a real server and read its stderr back with a key=value parser written here (independent of
the formatter) and with json.loads: each line must parse completely, with the DRF as one value
and no field, level or line of its own.
"""

import io
import json
import logging
import os
import re
import signal
import warnings

import grpc
import pytest
from processes import REPO, run_cli

from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2
from workers.logformat import configure_logging, counts, escape_value, parse_pairs

FORGED_FIELDS = 'x" level=ERROR logger=pacsys.workers msg="event=slot_given_up'
CONTROL_CHARACTERS = "Y:\x1b[31mRED\x1b[0m\u2028event=worker_lost\r\nts=0 level=CRITICAL\x00\u2029\u200b"
HOSTILE = (FORGED_FIELDS, CONTROL_CHARACTERS)

# key=bare or key="quoted with \" escapes", separated by single spaces, nothing else.
_LOGFMT_PAIR = re.compile(r'([A-Za-z_][A-Za-z0-9_.]*)=("(?:[^"\\]|\\.)*"|[^\s"=]+)(?: |$)')


def logfmt(line: str) -> dict[str, str]:
    """A strict key=value parser: the whole line must be pairs. Values are unquoted, unescaped."""
    pairs: dict[str, str] = {}
    pos = 0
    while pos < len(line):
        match = _LOGFMT_PAIR.match(line, pos)
        assert match, f"not key=value at {pos}: {line[pos : pos + 40]!r} in {line!r}"
        key, value = match.groups()
        assert key not in pairs, f"{key} twice in {line!r}"
        if value.startswith('"'):
            value = json.loads(value.replace("\\x", "\\u00").replace("\\U000", "\\u"))  # JSON-style escapes
        pairs[key] = value
        pos = match.end()
    return pairs


def _read_invalid(port: int, drf: str) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        read = channel.unary_stream("/services.daq.DAQ/Read", DAQ_pb2.ReadingList.SerializeToString)
        with pytest.raises(grpc.RpcError) as info:
            list(read(DAQ_pb2.ReadingList(drf=[drf]), timeout=10))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_kv_lines_keep_hostile_drfs_in_their_value(supervisor):
    # refusal_log_interval 0: every refusal is logged (by default one per client and kind per 10 s)
    sup = supervisor(
        *("--workers", "0", "--port", "0", "--host", "127.0.0.1", "--backend", "fake", "--refusal-log-interval", "0")
    )
    for drf in HOSTILE:
        mark = sup.mark()
        _read_invalid(sup.port, drf)
        sup.wait_line("stderr", r"decision=invalid", start=mark)
    records = [logfmt(line) for line in sup.lines["stderr"] if line]
    for record in records:
        assert set(record) == {"ts", "level", "logger", "msg"}, record
        assert record["level"] == "INFO" and record["logger"] == "pacsys.supervised", record
    requests = [logfmt(r["msg"]) for r in records if "decision=" in r["msg"]]
    assert [r["devices"] for r in requests] == list(HOSTILE)
    for request in requests:
        assert set(request) == {"event", "rpc", "peer", "devices", "decision", "reason", "ms"}, request
        assert request["event"] == "request" and request["decision"] == "invalid"


def test_json_mode_writes_every_line_as_json_on_stderr(supervisor, tmp_path):
    sup = supervisor(
        *("--workers", "1", "--port", "0", "--host", "127.0.0.1", "--backend", "fault_backends:noisy"),
        *("--log-format", "json", "--refusal-log-interval", "0"),
        serving=False,
        tests_on_path=True,
    )
    banner = sup.wait_line("stderr", r'"text": "pacsys-supervisor: serving DAQ on 127\.0\.0\.1:(\d+) ')
    port = int(banner.group(1))
    for drf in HOSTILE:
        mark = sup.mark()
        _read_invalid(port, drf)
        sup.wait_line("stderr", r'"decision": "invalid"', start=mark)
    mark = sup.mark()
    sup.proc.send_signal(signal.SIGTERM)
    assert sup.wait_exit(30) == 0
    sup.wait_line("stderr", r'"event": "server_stopped"', start=mark)
    assert [line for line in sup.lines["stdout"] if line] == [], "stdout must stay empty in json mode"
    entries = [json.loads(line) for line in sup.lines["stderr"] if line]
    for entry in entries:
        assert {"ts", "level", "logger", "msg"} <= set(entry), entry
        assert entry["level"] in ("INFO", "WARNING"), entry
    requests = [e for e in entries if e.get("decision") == "invalid"]
    assert [e["devices"] for e in requests] == list(HOSTILE)
    assert all(e["rpc"] == "Read" and e["logger"] == "pacsys.supervised" for e in requests)
    (worker_line,) = [e for e in entries if e["logger"] == "fault_backends"]
    assert worker_line["worker"] == 0 and worker_line["pid"] > 0 and worker_line["level"] == "WARNING"
    assert "forged" not in worker_line
    ready = [e for e in entries if e.get("event") == "worker_ready"]
    assert ready and ready[0]["slot"] == "0", entries  # the msg's pairs are fields of their own
    # Every line of the service (all but the test backend's own) is an event, from the banner to the stop.
    service = [e for e in entries if e["logger"] != "fault_backends"]
    assert all(re.fullmatch(r"[a-z][a-z0-9_]*", e.get("event", "")) for e in service), service
    events = [e["event"] for e in service]
    for event in ("worker_spawned", "pool_ready", "serving", "banner", "request", "shutting_down", "server_stopped"):
        assert event in events, (event, events)
    (banner,) = [e for e in service if e["event"] == "banner"]
    assert (
        banner["text"]
        == f"pacsys-supervisor: serving DAQ on 127.0.0.1:{port} (backend fault_backends:noisy, 1 worker ready)"
    )
    (stop,) = [e for e in service if e["event"] == "shutting_down"]
    assert (stop["signal"], stop["shutdown_grace"]) == ("SIGTERM", "5"), stop


def test_json_mode_reports_a_failed_start_as_json():
    result = run_cli(
        "--workers", "0", "--port", "0", "--backend", "sim:/nonexistent/devices.toml", "--log-format", "json"
    )
    assert result.returncode == 3, result
    entries = [json.loads(line) for line in result.stderr.splitlines()]
    assert entries[-1]["level"] == "ERROR" and "/nonexistent/devices.toml" in entries[-1]["error"]
    assert (entries[-1]["event"], entries[-1]["exit_status"]) == ("command_failed", "3")


@pytest.mark.parametrize("text", [*HOSTILE, "", "plain", "a b", "ä→漢", "tab\there", "\\", "x" * 1000])
def test_escaped_values_read_back_as_one_value(text):
    escaped = escape_value(text, max_chars=2000)
    assert "\n" not in escaped and "\r" not in escaped and "\u2028" not in escaped and "\x1b" not in escaped
    assert logfmt(f"k={escaped}") == {"k": text}
    assert parse_pairs(f"a=1 k={escaped} b=2") == {"a": "1", "k": text, "b": "2"}


def test_long_values_are_cut_and_say_so():
    before = counts.values_cut
    escaped = escape_value("y" * 5000, max_chars=100)
    assert counts.values_cut == before + 1  # pacsys_log_values_cut_total
    assert len(escaped) < 150 and escaped.endswith('... (+4900 chars)"')


def test_lines_to_the_journal_carry_their_priority(monkeypatch, root_logging):
    read_end, write_end = os.pipe()
    with os.fdopen(write_end, "w") as stream, os.fdopen(read_end) as reader:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        configure_logging("DEBUG", "json", stream=stream)
        log = logging.getLogger("pacsys.test")
        log.error("e")
        log.warning("w")
        log.info("i")
        log.debug("d")
        stream.flush()
        configure_logging("INFO", "kv", stream=io.StringIO())  # releases the pipe
        stream.close()
        lines = reader.read().splitlines()
    assert [line[:3] for line in lines] == ["<3>", "<4>", "<6>", "<7>"]
    assert json.loads(lines[0][3:])["msg"] == "e"


def test_lines_elsewhere_have_no_priority(monkeypatch, root_logging):
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")  # another stream: a child's stderr redirected elsewhere
    stream = io.StringIO()
    configure_logging("INFO", "kv", stream=stream)
    logging.getLogger("pacsys.test").warning("w")
    assert stream.getvalue().startswith("ts=")


@pytest.mark.parametrize(
    ("pattern", "message", "values"),
    [
        (
            "event=(worker_lost|slot_cooling|liveness|unready_exit)",
            "event=worker_lost slot=%d pid=%d reason=%s detail=%s restart_in=%.2fs",
            (0, 123, "signal", "SIGKILL", 0.1),
        ),
        (
            "decision=denied",
            "event=request rpc=%s peer=%s devices=%s decision=denied ms=%.2f",
            ("Set", "ipv4:1.2.3.4:5", "Z:A", 0.2),
        ),
    ],
)
def test_the_guides_journalctl_patterns_match_both_formats(pattern, message, values, root_logging):
    assert f"-g '{pattern}'" in (REPO / "ops/README.md").read_text()
    for fmt in ("kv", "json"):
        stream = io.StringIO()
        configure_logging("INFO", fmt, stream=stream)
        logging.getLogger("pacsys.supervised").warning(message, *values)
        assert re.search(pattern, stream.getvalue()), (fmt, stream.getvalue())


@pytest.fixture
def root_logging():
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    yield
    for handler in root.handlers:
        if handler not in saved[1]:
            handler.close()
    root.setLevel(saved[0])
    root.handlers[:] = saved[1]


def test_an_object_logged_as_the_message_is_a_value(root_logging):
    stream = io.StringIO()
    configure_logging("INFO", "json", stream=stream)
    logging.getLogger("pacsys.test").warning(ValueError('bad DRF x" level=ERROR forged=1'))
    entry = json.loads(stream.getvalue())
    assert (
        entry["msg"] == '"bad DRF x\\" level=ERROR forged=1"' and "forged" not in entry and entry["level"] == "WARNING"
    )


def test_an_event_in_json_is_its_fields_and_in_kv_its_pairs(root_logging):
    """An event with a client's text in its prose field: one field each in JSON, one pair each in kv,
    and the whole message in msg in both (journalctl -g finds event=... either way)."""
    error = "policies[0] (rate_limit): 'max_requests' x\" level=CRITICAL event=forged\nts=0"
    lines = {}
    for fmt in ("json", "kv"):
        stream = io.StringIO()
        configure_logging("INFO", fmt, stream=stream)
        logging.getLogger("pacsys.supervised").error("event=config_reload_failed kept=running_config error=%s", error)
        lines[fmt] = stream.getvalue()
    entry = json.loads(lines["json"])
    assert {k: v for k, v in entry.items() if k != "ts"} == {
        "level": "ERROR",
        "logger": "pacsys.supervised",
        "msg": f"event=config_reload_failed kept=running_config error={escape_value(error)}",
        "event": "config_reload_failed",
        "kept": "running_config",
        "error": error,
    }
    record = logfmt(lines["kv"].rstrip("\n"))
    assert set(record) == {"ts", "level", "logger", "msg"} and record["msg"] == entry["msg"]
    assert logfmt(record["msg"]) == {"event": "config_reload_failed", "kept": "running_config", "error": error}


def test_a_python_warning_is_an_event(root_logging, monkeypatch):
    """The service shows Python's warnings (a deprecation in a custom policy, say) as events."""
    from pacsys.supervised.reporting import _log_warning

    stream = io.StringIO()
    configure_logging("INFO", "json", stream=stream)
    monkeypatch.setattr(warnings, "showwarning", _log_warning)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("old API, use new_api()", DeprecationWarning, stacklevel=1)
    entry = json.loads(stream.getvalue())
    assert (entry["event"], entry["category"], entry["detail"]) == (
        "python_warning",
        "DeprecationWarning",
        "old API, use new_api()",
    )
    assert entry["file"] == __file__ and int(entry["line"]) > 0 and entry["level"] == "WARNING"


def _guide_example(event: str) -> re.Pattern[str]:
    """The ops guide's example line of `event` (its log-lines table) as a pattern: `...` stands for any value."""
    (example,) = re.findall(rf"^\| `(event={event} [^`]*)` \|", (REPO / "ops/README.md").read_text(), re.M)
    return re.compile(".+?".join(re.escape(part) for part in example.split("...")))


def test_the_guides_worker_lines_are_the_lines_logged(supervisor):
    """worker_ready at start and worker_stopped after SIGTTOU, as the ops guide shows them."""
    sup = supervisor("--workers", "2", "--port", "0", "--host", "127.0.0.1")
    mark = sup.mark()
    sup.proc.send_signal(signal.SIGTTOU)
    sup.wait_line("stderr", r"event=worker_stopped", start=mark)
    messages = [parse_pairs(line)["msg"] for line in sup.lines["stderr"] if line]
    for event in ("worker_ready", "worker_stopped"):
        shown = _guide_example(event)
        logged = [m for m in messages if m.startswith(f"event={event} ")]
        assert logged and any(shown.fullmatch(m) for m in logged), (shown.pattern, logged)
