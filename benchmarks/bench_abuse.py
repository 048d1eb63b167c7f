"""Red team: each attack of issue 19 against a fresh pacsys-supervisor, beside a victim client.

    python -m benchmarks.bench_abuse                 # every attack, ~5 s each (about 3 minutes)
    python -m benchmarks.bench_abuse --list
    python -m benchmarks.bench_abuse --only rapid-reset,ping-flood --seconds 10
    python -m benchmarks.bench_abuse --haproxy       # the same through haproxy (ops/haproxy.cfg)

For each attack a `pacsys-supervisor` process is started afresh on 127.0.0.1 (sim backend,
`--workers 2`, a metrics port, an audit file and a token file in a temporary directory, writes
granted on Z:ACLTST with a slew_rate policy `max_step = 3` there), and a victim client in this
process reads `M:OUTTMP@I` once every 50 ms (a new call on a fixed schedule, 2 s deadline)
and holds one stream of `M:OUTTMP@p,100`. After a quiet warm-up the attack runs in a child
process (`--attacker NAME`, so that its CPU is not this interpreter's), from loopback source
addresses other than the victim's (127.0.0.2 and up: other clients as far as the service's
per-client limits go), for `--seconds` (stalled-streams for 20 s at least), and stops by itself; then a quiet tail, and the front
is stopped (SIGTERM, then SIGKILL) with every worker it left.

Printed per attack: the victim's one-shot latency p50/p99 and errors by status code during
the attack (and in the quiet warm-up, for the ratio), the longest gap of its stream, a new
client's first read and first stream reading during the attack, the front's RSS and open
descriptors before / at most during / after, the front's and the attacker's CPU, /readyz
probed every 100 ms and /metrics scraped every second (success ratio), audit bytes per
second, the bytes and lines the front wrote to stderr (and how many mention accept), and
what the attacker counted. It measures; it never passes or fails. Figures taken on a shared
machine are provisional: the load average is printed with them.

With `--haproxy`, haproxy (`ops/haproxy.cfg`, or `--haproxy-cfg`, its addresses moved to
loopback ports) stands in front of the front: the victim, the new client and the attacks
connect through it, as clients of the shipped pair deployment do (the metrics port is still
probed directly), and haproxy speaks TLS to the front, which then serves a certificate of a
CA made for the run. The front sees every client as haproxy's one address.

Loopback only; every attack is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import re
import resource
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
BANNER = re.compile(r"serving DAQ on \S+:(\d+) .*metrics on port (\d+)")
HOST = "127.0.0.1"
TOKEN = "bench-abuse-token"
READ_PATH = "/services.daq.DAQ/Read"
WATCH_PATH = "/grpc.health.v1.Health/Watch"
VICTIM_DRF, VICTIM_STREAM = "M:OUTTMP@I", "M:OUTTMP@p,100"
VICTIM_INTERVAL, VICTIM_DEADLINE = 0.05, 2.0
WARMUP, TAIL = 1.5, 1.5
HOLD_MIN = 4.0  # seconds an attack that took long to set up is held once in place
NEWCOMER_DELAY = 0.5  # seconds after the attack is in place that a new client connects
FRONT_NOFILE = 20_000  # the front's descriptor limit (the machine's default), unless an attack says otherwise
ATTACKER_NOFILE = 65_536
SUPERVISOR_TOML = """\
allow_writes = ["Z:ACLTST"]

[[policies]]
type = "slew_rate"
limits = { "Z:ACLTST" = { max_step = 3.0 } }
"""


def source(k: int) -> str:
    """The k-th attacker source address: 127.0.0.2, 127.0.0.3, ... (the victim is 127.0.0.1)."""
    return f"127.0.0.{2 + k}"


# == the attacks (run in the child process) ===========================================


@dataclass
class Target:
    port: int
    metrics_port: int
    seconds: float

    @property
    def authority(self) -> str:
        return f"{HOST}:{self.port}"


def _read_request(drfs: list[str]) -> bytes:
    from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2

    return DAQ_pb2.ReadingList(drf=drfs).SerializeToString()


async def _until(deadline: float) -> None:
    await asyncio.sleep(max(0.0, deadline - time.monotonic()))


IN_PLACE = "in place"
_said_in_place = False


def in_place() -> None:
    """Tell the measuring process that the attack is established (it then tries a new client)."""
    global _said_in_place
    if not _said_in_place:
        _said_in_place = True
        print(IN_PLACE, flush=True)


async def hold_until(end: float) -> None:
    """The attack is in place: hold it until `end`, and at least HOLD_MIN seconds."""
    in_place()
    await _until(max(end, time.monotonic() + HOLD_MIN))


async def attack_baseline(t: Target) -> dict:
    """No attack: the victim alone (the reference for the others)."""
    in_place()
    await asyncio.sleep(t.seconds)
    return {}


async def attack_metrics_hold(t: Target) -> dict:
    """100 sockets held against the metrics port without a request, each reopened as soon as
    the server closes it."""
    loop = asyncio.get_running_loop()
    end = time.monotonic() + t.seconds
    opened = closed_by_server = failed = 0

    async def hold() -> None:
        nonlocal opened, closed_by_server, failed
        while time.monotonic() < end:
            sock = socket.socket()
            sock.setblocking(False)
            try:
                sock.bind((source(0), 0))
                await asyncio.wait_for(loop.sock_connect(sock, (HOST, t.metrics_port)), 2.0)
                opened += 1
                if await asyncio.wait_for(loop.sock_recv(sock, 1), max(0.01, end - time.monotonic())) == b"":
                    closed_by_server += 1
            except TimeoutError:
                pass
            except ConnectionResetError:
                closed_by_server += 1  # closed with a reset: at once, before it read anything
            except OSError:
                failed += 1
                await asyncio.sleep(0.01)
            finally:
                sock.close()

    in_place()
    await asyncio.gather(*(hold() for _ in range(100)))
    return {"connections_opened": opened, "closed_by_server": closed_by_server, "connect_failures": failed}


def _audit_drfs(count: int = 1000, length: int = 512) -> list[str]:
    """Valid DRFs of exactly `length` characters, one-shot, of devices that do not exist: the
    longest device name and a LOGGER extra, whose parameters the gateway passes on unjudged."""
    drfs = []
    for i in range(count):
        head = f"Z:X{i:04d}" + "Q" * 57 + "@I<-LOGGER:"
        drfs.append(head + "1" * (length - len(head)))
    return drfs


async def attack_audit_fill(t: Target) -> dict:
    """One-shot Reads of 1,000 valid 512-character DRFs, as fast as one unauthenticated client
    can (4 calls in flight on one connection)."""
    from benchmarks.h2_raw import connect

    request = _read_request(_audit_drfs())
    end = time.monotonic() + t.seconds
    conn = await connect(HOST, t.port, source(0))
    done = answered = 0

    async def caller() -> None:
        nonlocal done, answered
        while time.monotonic() < end and conn.is_open:
            stream_id = await conn.call(READ_PATH, request, t.authority)
            while not conn.ended(stream_id) and conn.is_open and time.monotonic() < end + 2:
                await asyncio.sleep(0.005)
            done += 1
            answered += conn.answered(stream_id)
            del conn.streams[stream_id]

    in_place()
    await asyncio.gather(*(caller() for _ in range(4)))
    conn.close()
    return {"requests": done, "answered": answered, "request_bytes": len(request), "goaway": conn.goaway}


async def _rapid_reset(t: Target, src: str) -> dict:
    """Rapid reset on one connection from `src` (a new one when the server closes it)."""
    from benchmarks.h2_raw import connect, request_headers

    block = request_headers(READ_PATH, t.authority)
    end = time.monotonic() + t.seconds
    streams = connections = 0
    resets: collections.Counter[int] = collections.Counter()
    goaways = []
    while time.monotonic() < end:
        conn = await connect(HOST, t.port, src)
        connections += 1
        await asyncio.wait_for(conn.settings_acked.wait(), 10)  # the server's stream limit is then in force
        while time.monotonic() < end and conn.is_open and conn.next_stream_id < 2**31 - 400:
            if not await conn.write(conn.opened_and_reset(block)):
                break
            streams += 100
            in_place()
        resets.update(conn.resets)
        if conn.goaway:
            goaways.append(conn.goaway)
        conn.close()
    return {"streams": streams, "connections": connections, "server_resets": resets, "goaways": goaways}


def _merged(results: list[dict]) -> dict:
    resets: collections.Counter[int] = collections.Counter()
    for r in results:
        resets.update(r["server_resets"])
    return {
        "streams": sum(r["streams"] for r in results),
        "connections": sum(r["connections"] for r in results),
        "server_resets": dict(resets),  # by code: 7 REFUSED_STREAM, 11 ENHANCE_YOUR_CALM
        "goaways": [g for r in results for g in r["goaways"]][:5],
    }


async def attack_rapid_reset(t: Target) -> dict:
    """On one connection: HEADERS of a Read, then RST_STREAM(CANCEL) at once, 100 streams per
    write, as fast as the server reads; a new connection when it closes one."""
    return _merged([await _rapid_reset(t, source(0))])


async def attack_rapid_reset_10(t: Target) -> dict:
    """Rapid reset from 10 connections at once, one from each of 127.0.0.2..11 (what a
    per-connection stream limit alone does not stop)."""
    return _merged(await asyncio.gather(*(_rapid_reset(t, source(k)) for k in range(10))))


async def attack_continuation(t: Target) -> dict:
    """4 connections, each a HEADERS frame without END_HEADERS followed by CONTINUATION frames
    of small literal header fields, forever (a new connection when the server closes one)."""
    from benchmarks.h2_raw import CONTINUATION, HEADERS, MAX_FRAME, connect, frame, request_headers
    from benchmarks.h2_reader import hpack_literals

    field = hpack_literals([("x-padding", "a" * 40)])
    payload = field * (MAX_FRAME // len(field))
    burst = b"".join(frame(CONTINUATION, 0, 1, payload) for _ in range(4))
    end = time.monotonic() + t.seconds
    sent = connections = 0
    goaways = []

    async def one(k: int) -> None:
        nonlocal sent, connections
        while time.monotonic() < end:
            conn = await connect(HOST, t.port, source(k))
            connections += 1
            await conn.settings_acked.wait()
            await conn.write(frame(HEADERS, 0, 1, request_headers(READ_PATH, t.authority)))
            while time.monotonic() < end and await conn.write(burst):
                sent += len(burst)
                in_place()
            if conn.goaway:
                goaways.append(conn.goaway)
            conn.close()

    await asyncio.gather(*(one(k) for k in range(4)))
    return {
        "header_bytes_sent": sent,
        "mb_per_s": round(sent / t.seconds / 1e6, 1),
        "connections": connections,
        "goaways": goaways[:5],
    }


async def attack_ping_flood(t: Target) -> dict:
    """PING frames as fast as the server reads them, 4,000 per write, on one connection (the
    acknowledgements read and counted as bytes, not parsed)."""
    from benchmarks.h2_raw import PING, connect, frame

    burst = frame(PING, 0, 0, b"\0" * 8) * 4000
    end = time.monotonic() + t.seconds
    pings = connections = bytes_in = 0
    goaways = []
    while time.monotonic() < end:
        conn = await connect(HOST, t.port, source(0))
        connections += 1
        await conn.settings_acked.wait()
        conn.parse = False
        while time.monotonic() < end and await conn.write(burst):
            pings += 4000
            in_place()
        bytes_in += conn.bytes_in
        if conn.goaway:
            goaways.append(conn.goaway)
        conn.close()
    return {
        "pings": pings,
        "pings_per_s": round(pings / t.seconds),
        "acks_received": bytes_in // 17,
        "connections": connections,
    }


async def attack_ping_slow(t: Target) -> dict:
    """2 connections that send PINGs (1,000 per write) as fast as the server takes them but
    read the acks slowly: a 4 KiB receive buffer asked for, read once a second."""
    from benchmarks.h2_raw import PING, connect, frame

    burst = frame(PING, 0, 0, b"\0" * 8) * 1000
    end = time.monotonic() + t.seconds
    pings = 0
    blocked_s = 0.0  # time the server took no more pings (it stopped reading)
    conns = []

    async def one(k: int) -> None:
        nonlocal pings, blocked_s
        conn = await connect(HOST, t.port, source(k), receive_buffer=4096)
        conns.append(conn)
        await conn.settings_acked.wait()
        conn.parse = False
        conn.read_interval = 1.0
        while time.monotonic() < end:
            started = time.monotonic()
            try:
                if not await asyncio.wait_for(conn.write(burst), max(0.01, end - started)):
                    return
            except TimeoutError:
                blocked_s += time.monotonic() - started
                return
            blocked_s += max(0.0, time.monotonic() - started - 0.05)
            pings += 1000
            in_place()

    await asyncio.gather(*(one(k) for k in range(2)))
    figures = {
        "pings": pings,
        "acks_read": sum(c.bytes_in for c in conns) // 17,
        "writes_blocked_s": round(blocked_s, 1),
        "still_open": sum(c.is_open for c in conns),
    }
    for c in conns:
        c.close()
    return figures


async def _open_streams(
    t: Target,
    src: str,
    count: int,
    path: str,
    request: bytes | Callable[[int], bytes],
    *,
    window: bool = True,
    batch: int = 0,
) -> list[tuple[object, int]]:
    """`count` calls from `src` (the k-th sends `request`, or `request(k)`), on as many
    connections as the server's SETTINGS_MAX_CONCURRENT_STREAMS asks for; returns
    (connection, stream id) pairs. `batch`:
    open that many, wait (up to 5 s) until they are answered or ended, then the next ones: a
    patient client, which gRPC's own backlog protection (calls that arrive faster than the
    application takes them are cancelled once 1,000 wait) does not stop."""
    from benchmarks.h2_raw import connect

    calls: list[tuple[object, int]] = []
    while len(calls) < count:
        conn = await connect(HOST, t.port, src, window=window)
        await asyncio.wait_for(conn.settings_acked.wait(), 10)
        on_this = min(count - len(calls), conn.server_max_streams)
        while on_this > 0:
            opened = [
                (conn, await conn.call(path, request(len(calls) + k) if callable(request) else request, t.authority))
                for k in range(min(on_this, batch or on_this))
            ]
            on_this -= len(opened)
            calls += opened
            if batch:
                await _settle(opened, time.monotonic() + 5)
    return calls


async def _settle(calls: list, deadline: float) -> tuple[int, int]:
    """Wait until every call was answered or ended (or the deadline); (answered, ended)."""
    while time.monotonic() < deadline:
        if all(c.answered(s) or c.ended(s) for c, s in calls):
            break
        await asyncio.sleep(0.05)
    return sum(c.answered(s) for c, s in calls), sum(c.ended(s) and not c.answered(s) for c, s in calls)


async def _new_daq_stream(t: Target, src: str) -> str:
    """Whether a new DAQ stream from `src` delivers its first reading within 3 s."""
    calls = await _open_streams(t, src, 1, READ_PATH, _read_request(["M:OUTTMP@p,100"]))
    ((conn, stream_id),) = calls
    await _settle(calls, time.monotonic() + 3)
    outcome = "admitted" if conn.answered(stream_id) else "refused" if conn.ended(stream_id) else "no answer in 3 s"
    conn.close()
    return outcome


async def attack_watch_flood(t: Target) -> dict:
    """1,000 grpc.health.v1.Health/Watch streams from each of 10 addresses (127.0.0.2..11),
    400 at a time, held; then a new DAQ stream from 127.0.0.12."""
    end = time.monotonic() + t.seconds
    calls: list = []
    for k in range(10):
        calls += await _open_streams(t, source(k), 1000, WATCH_PATH, b"", batch=400)
    answered, refused = await _settle(calls, min(end, time.monotonic() + 10))
    new_stream = await _new_daq_stream(t, source(10))
    await hold_until(end)
    for conn in {c for c, _ in calls}:
        conn.close()
    return {
        "watch_streams": len(calls),
        "answered": answered,
        "refused": refused,
        "new_daq_stream_127.0.0.12": new_stream,
    }


STALL_HOLD = 20.0  # seconds the stalled streams are held at least: the queue budget bites after ~7 s


async def attack_stalled_streams(t: Target) -> dict:
    """1,000 Read streams, Z:SIM000@p,100 to Z:SIM999@p,100 (10 Hz each: the client's whole
    default budget, every reading its own), from one client that never reads: no
    WINDOW_UPDATE, so the server can send 64 KiB and no more. Held for at least 20 s (the
    default queue budget ends such streams once they have gone unread for 5 s and hold 32 MiB,
    about 7 s in); then the client reads, and a stream the server ended shows its end."""
    from benchmarks.h2_reader import WINDOW_UPDATE, frame

    end = time.monotonic() + max(t.seconds, STALL_HOLD)
    requests = [_read_request([f"Z:SIM{k:03d}@p,100"]) for k in range(1000)]
    calls = await _open_streams(t, source(0), 1000, READ_PATH, requests.__getitem__, window=False)
    answered, refused = await _settle(calls, min(end, time.monotonic() + 3))
    await hold_until(end)
    ended = sum(c.ended(s) for c, s in calls)
    for conn in {c for c, _ in calls}:  # read at last: every window opened wide
        grant = struct.pack(">I", 2**30)
        await conn.write(
            frame(WINDOW_UPDATE, 0, 0, grant) + b"".join(frame(WINDOW_UPDATE, 0, s, grant) for s in conn.streams)
        )
    await _until(time.monotonic() + 2)
    ended_once_read = sum(c.ended(s) for c, s in calls)
    for conn in {c for c, _ in calls}:
        conn.close()
    return {
        "streams": len(calls),
        "answered_before_stall": answered,
        "refused": refused,
        "ended_by_server": ended,
        "ended_once_read": ended_once_read,
    }


async def _hold_connections(t: Target, sources: list[str], count: int, open_deadline: float) -> dict:
    """Open up to `count` idle HTTP/2 connections (preface, SETTINGS, the server's SETTINGS
    acknowledged, then nothing) round-robin from `sources`, 128 connects at a time, until
    `open_deadline` or 200 connects in a row fail; hold them until the end."""
    from benchmarks.h2_raw import connect

    conns: list = []
    failures = consecutive = 0
    gate = asyncio.Semaphore(128)

    async def one(k: int) -> None:
        nonlocal failures, consecutive
        if consecutive >= 200 or time.monotonic() >= open_deadline:
            return
        async with gate:
            try:
                conns.append(await connect(HOST, t.port, sources[k % len(sources)], timeout=2.0))
                consecutive = 0
            except (OSError, TimeoutError):
                failures += 1
                consecutive += 1

    started = time.monotonic()
    await asyncio.gather(*(one(k) for k in range(count)))
    opened_in = time.monotonic() - started
    return {"conns": conns, "opened": len(conns), "connect_failures": failures, "open_seconds": round(opened_in, 1)}


async def _idle_connections(t: Target, sources: list[str], count: int, open_seconds: float) -> dict:
    end = time.monotonic() + t.seconds
    held = await _hold_connections(t, sources, count, time.monotonic() + open_seconds)
    await hold_until(end)
    conns = held.pop("conns")
    held["still_open_at_end"] = sum(c.is_open for c in conns)
    for c in conns:
        c.close()
    return held


async def attack_idle_connections(t: Target) -> dict:
    """10,000 idle HTTP/2 connections from 127.0.0.2..6, held."""
    return await _idle_connections(t, [source(k) for k in range(5)], 10_000, open_seconds=30)


async def attack_conn_exhaust(t: Target) -> dict:
    """Idle HTTP/2 connections from 127.0.0.2 and 127.0.0.3 until the front runs out of
    descriptors (it runs with `ulimit -n` 4096 here), held."""
    return await _idle_connections(t, [source(0), source(1)], 4_600, open_seconds=20)


async def attack_slew_walk(t: Target) -> dict:
    """Z:ACLTST brought to 10 in steps of 3 (one Set each), then one Set walking it to -10 in
    steps of 3 through array settings the backend rejects: [Z:ACLTST[7]=7, 4, 1, -2, -5, -8,
    Z:ACLTST=-10] under slew_rate max_step = 3."""
    import grpc

    from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2, DAQ_pb2_grpc

    metadata = [("authorization", f"Bearer {TOKEN}")]
    async with grpc.aio.insecure_channel(f"{HOST}:{t.port}") as channel:
        stub = DAQ_pb2_grpc.DAQStub(channel)

        async def value() -> float:
            replies = [r async for r in stub.Read(DAQ_pb2.ReadingList(drf=["Z:ACLTST@I"]), timeout=5)]
            return replies[0].readings.reading[0].data.scalar

        async def set_(pairs: list[tuple[str, float]]) -> str:
            request = DAQ_pb2.SettingList()
            for device, v in pairs:
                request.setting.add(device=device).value.scalar = v
            try:
                reply = await stub.Set(request, timeout=5, metadata=metadata)
            except grpc.RpcError as exc:
                return f"{exc.code().name}: {exc.details()}"
            return " ".join(str(s.status_code) for s in reply.status)

        in_place()
        climb = [await set_([("Z:ACLTST", v)]) for v in (3.0, 6.0, 9.0, 10.0)]  # each step within the limit
        before = await value()
        walk = [("Z:ACLTST[7]", v) for v in (7.0, 4.0, 1.0, -2.0, -5.0, -8.0)] + [("Z:ACLTST", -10.0)]
        answer = await set_(walk)
        after = await value()
        direct = await set_([("Z:ACLTST", 10.0)])
    return {
        "climb_to_10": " ".join(climb),
        "before": before,
        "walk_statuses": answer,
        "after": after,
        "moved": after != before,
        "direct_jump_back": direct,
    }


@dataclass
class Attack:
    run: Callable[[Target], Awaitable[dict]]
    front_nofile: int = FRONT_NOFILE

    @property
    def description(self) -> str:
        return " ".join((self.run.__doc__ or "").split())


ATTACKS: dict[str, Attack] = {
    "baseline": Attack(attack_baseline),
    "metrics-hold": Attack(attack_metrics_hold),
    "audit-fill": Attack(attack_audit_fill),
    "rapid-reset": Attack(attack_rapid_reset),
    "rapid-reset-10": Attack(attack_rapid_reset_10),
    "continuation": Attack(attack_continuation),
    "ping-flood": Attack(attack_ping_flood),
    "ping-slow": Attack(attack_ping_slow),
    "watch-flood": Attack(attack_watch_flood),
    "stalled-streams": Attack(attack_stalled_streams),
    "idle-connections": Attack(attack_idle_connections),
    "conn-exhaust": Attack(attack_conn_exhaust, front_nofile=4096),
    "slew-walk": Attack(attack_slew_walk),
}


def attacker_main(name: str, target: Target) -> None:
    """The child process: raise the descriptor limit, run one attack, print its figures as JSON."""
    _raise_nofile(ATTACKER_NOFILE)
    cpu = time.process_time()
    started = time.monotonic()
    figures = asyncio.run(ATTACKS[name].run(target))
    figures["attacker_cpu_s"] = round(time.process_time() - cpu, 2)
    figures["attacker_wall_s"] = round(time.monotonic() - started, 2)
    print(json.dumps(figures, default=str), flush=True)


def _raise_nofile(limit: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, max(hard, limit)))  # root may raise the hard limit
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# == the front (the server under attack) ==============================================


class FrontDidNotStart(RuntimeError):
    pass


class Front:
    """A pacsys-supervisor process with its own temporary directory; always stopped."""

    def __init__(self, workdir: Path, workers: int, nofile: int, tls: bool = False):
        """`tls`: serve TLS with a certificate of a CA of its own (`self.certificates`), as
        the instances behind the shipped haproxy do."""
        self.workdir = workdir
        self.audit = workdir / "audit.jsonl"
        self.stderr_path = workdir / "front.stderr"
        (workdir / "supervisor.toml").write_text(SUPERVISOR_TOML)
        (workdir / "token").write_text(TOKEN + "\n")
        cmd = [sys.executable, "-m", "pacsys.supervised.cli", "--config", str(workdir / "supervisor.toml")]
        cmd += ["--host", HOST, "--port", "0", "--metrics-port", "0", "--workers", str(workers), "--backend", "sim"]
        cmd += ["--audit-path", str(self.audit), "--token-file", str(workdir / "token")]
        self.certificates = None
        if tls:
            from benchmarks.pair import Certificates

            self.certificates = Certificates(workdir)
            cmd += ["--tls-cert", str(self.certificates.cert), "--tls-key", str(self.certificates.key)]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)

        def limit_descriptors() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=self.stderr_path.open("wb"),
            env=env,
            cwd=workdir,
            preexec_fn=limit_descriptors,
        )
        self.port, self.metrics_port = self._wait_banner(60.0)
        self.ps = psutil.Process(self.proc.pid)
        self.family = [self.ps, *self.ps.children(recursive=True)]

    def _wait_banner(self, timeout: float) -> tuple[int, int]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.5)
            if ready:
                line = self.proc.stdout.readline().decode(errors="replace")
                match = BANNER.search(line)
                if match:
                    return int(match.group(1)), int(match.group(2))
                if not line:
                    break
        self.stop()
        raise FrontDidNotStart(f"the front did not start; see {self.stderr_path}")

    def sample(self) -> dict:
        try:
            with self.ps.oneshot():
                cpu = self.ps.cpu_times()
                return {
                    "t": time.monotonic(),
                    "rss": self.ps.memory_info().rss / 2**20,
                    "fds": self.ps.num_fds(),
                    "cpu": cpu.user + cpu.system,
                }
        except psutil.Error:
            return {"t": time.monotonic(), "rss": float("nan"), "fds": -1, "cpu": float("nan")}

    def stderr_size(self) -> int:
        return self.stderr_path.stat().st_size

    def audit_size(self) -> int:
        return self.audit.stat().st_size if self.audit.exists() else 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for p in getattr(self, "family", []):  # workers die with the front; make sure
            try:
                p.kill()
            except psutil.Error:
                pass


class Balancer:
    """haproxy with ops/haproxy.cfg (its addresses moved to loopback ports) in front of one
    front: both of its servers are that front. Clients and attacks then go through it, as
    they do in the shipped pair deployment; the metrics port is still reached directly."""

    def __init__(self, workdir: Path, front: Front, template: Path):
        from benchmarks.pair import free_port, render_haproxy_cfg

        self.port = free_port()
        servers = {name: (front.port, front.metrics_port) for name in ("a", "b")}
        cfg = workdir / "haproxy.cfg"
        ca = front.certificates.ca if front.certificates is not None else None
        cfg.write_text(render_haproxy_cfg(template.read_text(), self.port, free_port(), servers, ca))
        self.log = workdir / "haproxy.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [shutil.which("haproxy") or "haproxy", "-db", "-f", str(cfg)], stdout=log, stderr=log
            )
        self.ps = psutil.Process(self.proc.pid)

    async def wait_serving(self, timeout: float = 20.0) -> None:
        """Until a read through haproxy is answered (its health checks saw the front up)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            outcome = await _new_client(f"{HOST}:{self.port}")
            if outcome["read"].startswith("OK"):
                return
            await asyncio.sleep(0.5)
        raise SystemExit(f"haproxy did not serve within {timeout:g} s; see {self.log}")

    def sample(self) -> dict:
        try:
            cpu = self.ps.cpu_times()
            return {"t": time.monotonic(), "rss": self.ps.memory_info().rss / 2**20, "cpu": cpu.user + cpu.system}
        except psutil.Error:
            return {"t": time.monotonic(), "rss": float("nan"), "cpu": float("nan")}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


# == the victim and the probes (this process) =========================================


@dataclass
class Victim:
    address: str
    calls: list[tuple[float, float, str]] = field(default_factory=list)  # (scheduled, latency, code)
    readings: list[float] = field(default_factory=list)
    stream_errors: collections.Counter = field(default_factory=collections.Counter)

    async def run(self, stop: asyncio.Event) -> None:
        import grpc

        from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2, DAQ_pb2_grpc

        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = DAQ_pb2_grpc.DAQStub(channel)
            request = DAQ_pb2.ReadingList(drf=[VICTIM_DRF])

            async def one(scheduled: float) -> None:
                try:
                    async for _ in stub.Read(request, timeout=VICTIM_DEADLINE):
                        pass
                    code = "OK"
                except grpc.RpcError as exc:
                    code = exc.code().name
                self.calls.append((scheduled, time.monotonic() - scheduled, code))

            async def stream() -> None:
                stream_request = DAQ_pb2.ReadingList(drf=[VICTIM_STREAM])
                while not stop.is_set():
                    try:
                        async for _ in stub.Read(stream_request):
                            self.readings.append(time.monotonic())
                    except grpc.RpcError as exc:
                        self.stream_errors[exc.code().name] += 1
                    await asyncio.sleep(0.1)

            streaming = asyncio.create_task(stream())
            await on_schedule(VICTIM_INTERVAL, one, stop)
            streaming.cancel()
            await asyncio.gather(streaming, return_exceptions=True)

    def window(self, t0: float, t1: float) -> dict:
        inside = [(lat, code) for s, lat, code in self.calls if t0 <= s < t1]
        ok = sorted(lat for lat, code in inside if code == "OK")
        errors = collections.Counter(code for _, code in inside if code != "OK")
        marks = [t0, *(r for r in self.readings if t0 < r < t1), t1]
        return {
            "calls": len(inside),
            "p50_ms": _percentile(ok, 0.50) * 1e3 if ok else float("nan"),
            "p99_ms": _percentile(ok, 0.99) * 1e3 if ok else float("nan"),
            "errors": dict(errors),
            "gap_max_ms": max(b - a for a, b in zip(marks, marks[1:], strict=False)) * 1e3,
        }


def _percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _http_get(port: int, path: str, timeout: float) -> bool:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), timeout)
    except (OSError, TimeoutError):
        return False
    try:
        writer.write(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readline(), timeout)
        return head.split(b" ")[1:2] == [b"200"]
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return False
    finally:
        writer.transport.abort()


async def _probe(port: int, path: str, interval: float, timeout: float, results: list, stop: asyncio.Event) -> None:
    """GET `path` on a fixed schedule, every `interval` s, as a load balancer's health check
    does (a probe that hangs does not delay the next; each waits at most `timeout`): (time,
    ok) pairs."""

    async def one(started: float) -> None:
        results.append((started, await _http_get(port, path, timeout)))

    await on_schedule(interval, one, stop)


async def on_schedule(interval: float, call: Callable[[float], Awaitable[None]], stop: asyncio.Event) -> None:
    """`call(scheduled time)` started every `interval` s until `stop`, whether or not the
    earlier ones finished (a slow answer must not thin out the samples); then waits for them."""
    pending: set[asyncio.Task] = set()
    tick = time.monotonic()
    while not stop.is_set():
        task = asyncio.create_task(call(tick))
        pending.add(task)
        task.add_done_callback(pending.discard)
        tick += interval
        await asyncio.sleep(max(0.0, tick - time.monotonic()))
    await asyncio.gather(*pending, return_exceptions=True)


async def _new_client(address: str) -> dict:
    """A client connecting now: its first one-shot read and its first stream reading (3 s each)."""
    import grpc

    from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2, DAQ_pb2_grpc

    # A local subchannel pool: a connection of its own, not the victim's.
    async with grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        stub = DAQ_pb2_grpc.DAQStub(channel)

        async def first(drf: str) -> str:
            started = time.monotonic()
            call = stub.Read(DAQ_pb2.ReadingList(drf=[drf]), timeout=3.0)
            try:
                await call.read()
                return f"OK {1e3 * (time.monotonic() - started):.0f} ms"
            except grpc.RpcError as exc:
                return exc.code().name
            finally:
                call.cancel()

        read, stream = await asyncio.gather(first(VICTIM_DRF), first(VICTIM_STREAM))
    return {"read": read, "stream": stream}


# == one attack, measured =============================================================


async def measure(name: str, args: argparse.Namespace) -> dict:
    attack = ATTACKS[name]
    for _attempt in range(3):  # a front that fails to start is reported and started again
        workdir = Path(tempfile.mkdtemp(prefix=f"bench-abuse-{name}-"))
        try:
            front = Front(workdir, args.workers, attack.front_nofile, tls=args.haproxy)
            break
        except FrontDidNotStart as exc:
            print(f"   ({exc}; trying again)", flush=True)  # its directory is kept for a look
    else:
        raise SystemExit(f"the front did not start three times for {name}")
    stop = asyncio.Event()
    readyz: list[tuple[float, bool]] = []
    scrapes: list[tuple[float, bool]] = []
    samples: list[dict] = []
    balancer: Balancer | None = None
    try:
        entry = front.port  # where the victim, the new client and the attack connect
        if args.haproxy:
            balancer = Balancer(workdir, front, args.haproxy_cfg)
            entry = balancer.port
            await balancer.wait_serving()
        victim = Victim(f"{HOST}:{entry}")
        background = [
            asyncio.create_task(victim.run(stop)),
            asyncio.create_task(_probe(front.metrics_port, "/readyz", 0.1, 1.0, readyz, stop)),
            asyncio.create_task(_probe(front.metrics_port, "/metrics", 1.0, 2.0, scrapes, stop)),
        ]
        await asyncio.sleep(WARMUP)
        before = front.sample()
        balancer_before = balancer.sample() if balancer else None
        audit0, stderr0 = front.audit_size(), front.stderr_size()
        t0 = time.monotonic()
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "benchmarks.bench_abuse",
            "--attacker",
            name,
            "--port",
            str(entry),
            "--metrics-port",
            str(front.metrics_port),
            "--seconds",
            str(args.seconds),
            stdout=asyncio.subprocess.PIPE,
            cwd=REPO,
        )
        newcomer: asyncio.Task | None = None
        placed: dict = {}  # the front's sample when the attack said it was in place
        lines: list[str] = []

        async def listen() -> None:
            nonlocal newcomer
            assert child.stdout is not None
            async for raw in child.stdout:
                line = raw.decode().strip()
                if line == IN_PLACE and newcomer is None:
                    placed.update(front.sample())
                    newcomer = asyncio.create_task(
                        _later(time.monotonic() + NEWCOMER_DELAY, _new_client(victim.address))
                    )
                elif line:
                    lines.append(line)
            await child.wait()

        listening = asyncio.create_task(listen())
        while not listening.done():
            samples.append(front.sample())
            await asyncio.wait({listening}, timeout=0.25)
            if time.monotonic() > t0 + args.seconds + 90:
                child.kill()
        await listening
        t1 = time.monotonic()
        during_end = front.sample()
        balancer_end = balancer.sample() if balancer else None
        audit1, stderr1 = front.audit_size(), front.stderr_size()
        new_client = await newcomer if newcomer is not None else {"read": "not tried", "stream": "not tried"}
        await asyncio.sleep(TAIL)
        after = front.sample()
        stop.set()
        await asyncio.wait(background, timeout=VICTIM_DEADLINE + 5)
        for task in background:
            task.cancel()
    finally:
        if balancer is not None:
            balancer.stop()
        front.stop()
        stderr_lines = front.stderr_path.read_bytes().splitlines()
        if args.keep:
            print(f"   (the front's files: {workdir})", flush=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)  # an attack's audit or haproxy log can take 100 MB
    try:
        figures = json.loads(lines[-1])
    except (ValueError, IndexError):
        figures = {"attacker": f"no figures (exit {child.returncode})"}
    span = t1 - t0
    in_attack = [s for s in samples if s["t"] >= t0]

    def ratio(results: list[tuple[float, bool]]) -> str:
        inside = [ok for t, ok in results if t0 <= t < t1]
        return f"{100 * sum(inside) / len(inside):.1f}% of {len(inside)}" if inside else "none"

    return {
        "name": name,
        "seconds": span,
        "quiet": victim.window(t0 - WARMUP + 0.5, t0),
        "attack": victim.window(t0, t1),
        "stream_errors": dict(victim.stream_errors),
        "new_client": new_client,
        "rss": (before["rss"], max(s["rss"] for s in [*in_attack, during_end]), during_end["rss"], after["rss"]),
        "fds": (before["fds"], max(s["fds"] for s in [*in_attack, during_end]), after["fds"]),
        "front_cpu": (during_end["cpu"] - before["cpu"]) / span,
        "rss_growth": (during_end["rss"] - placed["rss"]) / (t1 - placed["t"]) if placed else float("nan"),
        "attacker_cpu": figures.get("attacker_cpu_s", float("nan")) / span,
        "readyz": ratio(readyz),
        "scrapes": ratio(scrapes),
        "audit_bps": (audit1 - audit0) / span,
        "stderr_bytes": stderr1 - stderr0,
        "stderr_lines": len(stderr_lines),
        "accept_lines": sum(1 for line in stderr_lines if b"accept" in line.lower()),
        "figures": figures,
        "haproxy": None
        if balancer_before is None
        else {
            "cpu": (balancer_end["cpu"] - balancer_before["cpu"]) / span,
            "rss": (balancer_before["rss"], balancer_end["rss"]),
        },
    }


async def _later(when: float, coro: Awaitable) -> dict:
    await asyncio.sleep(max(0.0, when - time.monotonic()))
    return await coro


def report(r: dict) -> None:
    q, a = r["quiet"], r["attack"]
    rss, fds = r["rss"], r["fds"]
    print(f"== {r['name']}: {ATTACKS[r['name']].description}")
    print(
        f"   victim: one-shot p50 {a['p50_ms']:.1f} ms p99 {a['p99_ms']:.1f} ms over {a['calls']} calls, "
        f"errors {a['errors'] or 0} (quiet: p50 {q['p50_ms']:.1f} p99 {q['p99_ms']:.1f}); "
        f"stream gap max {a['gap_max_ms']:.0f} ms, stream ended {r['stream_errors'] or 0}; "
        f"new client: {r['new_client']}"
    )
    print(
        f"   front: RSS {rss[0]:.0f} -> max {rss[1]:.0f} / end {rss[2]:.0f} -> after {rss[3]:.0f} MiB; "
        f"{r['rss_growth']:+.1f} MiB/s once in place; fds {fds[0]} -> max {fds[1]} -> {fds[2]}; CPU {100 * r['front_cpu']:.0f}% "
        f"(attacker {100 * r['attacker_cpu']:.0f}%) over {r['seconds']:.1f} s"
    )
    print(
        f"   probes: /readyz {r['readyz']}, /metrics {r['scrapes']}; audit {r['audit_bps'] / 1e3:.1f} KB/s; "
        f"stderr +{r['stderr_bytes']} B ({r['stderr_lines']} lines in all, {r['accept_lines']} about accept)"
    )
    if r["haproxy"]:
        h = r["haproxy"]
        print(f"   haproxy: CPU {100 * h['cpu']:.0f}%, RSS {h['rss'][0]:.0f} -> {h['rss'][1]:.0f} MiB")
    print(f"   attacker: {json.dumps(r['figures'], default=str)}", flush=True)


def summary(results: list[dict]) -> None:
    print(
        "\n| attack | victim p50 / p99 ms | victim errors | stream gap max ms | front RSS MiB before / max / after | fds before / max | /readyz ok | new client |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        a = r["attack"]
        errors = ", ".join(f"{k} {v}" for k, v in a["errors"].items()) or "0"
        print(
            f"| {r['name']} | {a['p50_ms']:.1f} / {a['p99_ms']:.1f} | {errors} | {a['gap_max_ms']:.0f} | "
            f"{r['rss'][0]:.0f} / {r['rss'][1]:.0f} / {r['rss'][3]:.0f} | {r['fds'][0]} / {r['fds'][1]} | "
            f"{r['readyz'].split(' of')[0]} | {r['new_client'].get('read')}; {r['new_client'].get('stream')} |"
        )


async def run(args: argparse.Namespace) -> None:
    names = list(ATTACKS) if args.only is None else args.only
    _raise_nofile(ATTACKER_NOFILE)
    print(
        f"cores={psutil.cpu_count()} loadavg={os.getloadavg()} seconds={args.seconds:g} workers={args.workers}",
        flush=True,
    )
    results = []
    for name in names:
        result = await measure(name, args)
        report(result)
        results.append(result)
    summary(results)
    print(f"\nloadavg at the end: {os.getloadavg()} (a shared machine: figures are provisional)")


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in ATTACKS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown attack(s) {', '.join(unknown)}; --list shows them")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds each attack runs (default 5)")
    parser.add_argument("--only", type=_names, default=None, help="comma-separated attacks to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the attacks and exit")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--haproxy",
        action="store_true",
        help="put haproxy (ops/haproxy.cfg) in front: the victim and the attacks connect through it",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep each attack's directory (front log, audit, haproxy log)"
    )
    parser.add_argument(
        "--haproxy-cfg",
        type=Path,
        default=REPO / "ops" / "haproxy.cfg",
        help="the haproxy configuration --haproxy uses (laid out as ops/haproxy.cfg, whose addresses are replaced)",
    )
    parser.add_argument("--attacker", choices=list(ATTACKS), help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--metrics-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.list:
        for name, attack in ATTACKS.items():
            print(f"{name:18} {attack.description}")
        return
    if args.attacker:
        attacker_main(args.attacker, Target(args.port, args.metrics_port, args.seconds))
        return
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
