"""gRPC core's own log lines (one per failed TLS handshake) as the service's records.

A real `pacsys-supervisor` serving TLS; clients that speak plaintext to it, each failing its
handshake, as fast as they can for a few seconds (loopback only). gRPC core writes a line for
each to file descriptor 2; the service relays them (pacsys/supervised/stderr_relay.py).
"""

import io
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from processes import FAKE, SERVING, process_env

from pacsys.supervised.stderr_relay import MAX_LINE_BYTES, LineRelay, counts
from workers.logformat import configure_logging

FLOOD_SECONDS = 3.0
needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


@pytest.fixture(scope="module")
def server_cert(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1: its own CA."""
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", "server.key", "-out", "server.crt", "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        cwd=d, check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return d / "server.crt", d / "server.key"


def _fail_handshakes(port: int, seconds: float, threads: int = 2) -> int:
    """Plaintext HTTP to the TLS port from `threads` clients for `seconds`: handshakes that failed."""
    done = [0] * threads
    stop_at = time.monotonic() + seconds

    def client(i: int) -> None:
        while time.monotonic() < stop_at:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                try:
                    sock.recv(100)  # the server's alert, or its close
                except OSError:
                    pass
            done[i] += 1

    workers = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(done)


def _tls_health(port: int, cert) -> int:
    creds = grpc.ssl_channel_credentials(cert.read_bytes())
    with grpc.secure_channel(f"127.0.0.1:{port}", creds) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


@needs_openssl
def test_failed_handshakes_give_a_bounded_number_of_json_records(supervisor, server_cert):
    cert, key = server_cert
    sup = supervisor(
        *FAKE,
        *("--host", "127.0.0.1", "--tls-cert", str(cert), "--tls-key", str(key)),
        *("--log-format", "json", "--grpc-log-interval", "1"),
        serving=False,
    )
    port = int(sup.wait_line("stderr", r'"text": "pacsys-supervisor: serving DAQ on 127\.0\.0\.1:(\d+) ').group(1))
    started = time.monotonic()
    failed = _fail_handshakes(port, FLOOD_SECONDS)
    elapsed = time.monotonic() - started
    assert _tls_health(port, cert) == health_pb2.HealthCheckResponse.SERVING  # served throughout
    sup.wait_line("stderr", r'"event": "grpc_core"')
    sup.kill()
    lines = [line for line in sup.lines["stderr"] if line]
    entries = [json.loads(line) for line in lines]  # every line, or this raises
    core = [e for e in entries if e.get("event") == "grpc_core"]
    print(f"{failed} failed handshakes in {elapsed:.1f} s: {len(lines)} stderr lines, {len(core)} from gRPC core")
    assert failed >= 500, failed  # a high rate (on a quiet machine, thousands a second)
    # One record a second from the handshaker's source line, each counting what it left out.
    assert 1 <= len(core) <= elapsed + 2 and len(lines) < 30, lines
    assert all(e["logger"] == "grpc" and e["source"].startswith("ssl_transport_security.cc:") for e in core)
    assert "Handshake failed" in core[0]["detail"] and core[0]["level"] == "INFO"
    assert sum(int(e.get("not_logged", 0)) for e in core) >= failed // 2  # left out, and counted


@needs_openssl
def test_a_stuck_stderr_never_stops_grpc(server_cert):
    """Nobody reads the service's stderr: the relay blocks, its pipe fills, and gRPC's lines are
    dropped rather than blocking gRPC's threads. TLS clients are still served."""
    cert, key = server_cert
    proc = subprocess.Popen(
        [sys.executable, "-m", "pacsys.supervised.cli", *FAKE, "--host", "127.0.0.1"]
        + ["--tls-cert", str(cert), "--tls-key", str(key), "--grpc-log-interval", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,  # never read
        text=True,
        env=process_env(),
    )
    try:
        assert proc.stdout is not None
        banner = SERVING.match(proc.stdout.readline().strip())
        assert banner is not None
        port = int(banner.group(2))
        # Every failed handshake is a record (interval 0): the 64 KiB stderr pipe fills within
        # a few hundred, the relay's own 1 MiB pipe within some thousands more.
        failed = _fail_handshakes(port, FLOOD_SECONDS)
        assert failed >= 500, failed
        # A gRPC thread that writes a handshake's line and waited for the pipe would never
        # close that connection: each failure is still answered at once.
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                try:
                    while sock.recv(100):
                        pass  # until the server closes it
                except TimeoutError:
                    pytest.fail("a failed handshake was not closed: a gRPC thread waits for stderr")
        assert _tls_health(port, cert) == health_pb2.HealthCheckResponse.SERVING
    finally:
        proc.kill()
        proc.wait(10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


# -- the relay's rule for each line, without a process -------------------------------------------------------


@pytest.fixture
def json_records():
    """The root logger writing JSON to a buffer; the relay passes lines on to another."""
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    records, passed_on = io.StringIO(), io.StringIO()
    configure_logging("INFO", "json", stream=records)
    yield records, passed_on
    for handler in root.handlers:
        if handler not in saved[1]:
            handler.close()
    root.setLevel(saved[0])
    root.handlers[:] = saved[1]


ABSL = b"I1205 22:40:05.587676   21279 ssl_transport_security.cc:2563] Handshake failed with error SSL_ERROR_SSL\n"


def test_absl_lines_become_records_one_per_source_line_per_interval(json_records):
    records, passed_on = json_records
    relay = LineRelay(passed_on, interval=3600)
    before = counts.not_logged
    relay.feed(ABSL * 3)
    relay.feed(b"E0000 00:00:1747875382.715124 1265019 chttp2_server.cc:1051] No address added out of")
    relay.feed(b" total 1 resolved\n")  # a line in two pieces; the date absl writes before it is set up
    relay.feed(b"Fatal Python error: \x1b[31mforged\x00\n")
    entries = [json.loads(line) for line in records.getvalue().splitlines()]
    assert [(e["event"], e.get("source"), e["level"], e["logger"]) for e in entries] == [
        ("grpc_core", "ssl_transport_security.cc:2563", "INFO", "grpc"),
        ("grpc_core", "chttp2_server.cc:1051", "ERROR", "grpc"),
        ("stderr", None, "WARNING", "pacsys.supervised"),
    ]
    assert entries[0]["detail"] == "Handshake failed with error SSL_ERROR_SSL"
    assert entries[1]["detail"] == "No address added out of total 1 resolved"
    assert entries[2]["detail"] == "Fatal Python error: \x1b[31mforged\x00"  # one value, escaped
    assert counts.not_logged == before + 2
    relay.interval = 0
    relay.feed(ABSL)
    assert json.loads(records.getvalue().splitlines()[-1])["not_logged"] == "2"
    assert passed_on.getvalue() == ""


def test_the_services_own_lines_pass_through_unchanged(json_records):
    records, passed_on = json_records
    relay = LineRelay(passed_on, interval=0)
    worker = b'{"ts": "2026-12-05T22:44:13.005Z", "level": "WARNING", "logger": "x", "msg": "m", "worker": 0}'
    relay.feed(worker + b"\nts=2026-12-05T22:44:13.005Z level=INFO logger=x msg=m\n")
    relay.feed(b"<4>" + worker)
    relay.close()  # the last line had no newline
    assert passed_on.getvalue().splitlines() == [
        worker.decode(),
        "ts=2026-12-05T22:44:13.005Z level=INFO logger=x msg=m",
        "<4>" + worker.decode(),
    ]
    assert records.getvalue() == ""


def test_an_endless_line_is_cut(json_records):
    records, passed_on = json_records
    relay = LineRelay(passed_on, interval=0)
    for _ in range(10):
        relay.feed(b"x" * MAX_LINE_BYTES)
    relay.feed(b"tail of it\n" + ABSL)
    entries = [json.loads(line) for line in records.getvalue().splitlines()]
    assert [e["event"] for e in entries] == ["stderr", "grpc_core"]
    assert len(entries[0]["detail"]) < 1000  # and the value cut by the formatter, saying so


def test_a_workers_line_to_the_journal_gets_its_priority(monkeypatch):
    """A worker's stderr is the relay's pipe, not the journal: the front adds the priority."""
    read_end, write_end = os.pipe()
    with os.fdopen(write_end, "w") as stream, os.fdopen(read_end) as reader:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        relay = LineRelay(stream, interval=0)
        relay.feed(b'{"ts": "2026-12-05T22:44:13.005Z", "level": "WARNING", "logger": "x", "msg": "m"}\n')
        relay.feed(b"ts=2026-12-05T22:44:13.005Z level=ERROR logger=x msg=m\n")
        stream.close()
        assert [line[:3] for line in reader.read().splitlines()] == ["<4>", "<3>"]
