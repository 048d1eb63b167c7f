"""Hostile clients on the service port, against a real pacsys-supervisor process.

Each test runs a front with its limits set low, attacks it over loopback with real sockets
(`benchmarks.h2_raw`: HTTP/2 frames as an attacker writes them; source addresses 127.0.0.2
and up stand for other clients) and checks that a well-behaved gRPC client is still served:
streams reset as soon as they are opened (rapid reset), connections over the per-address
limit, Health/Watch streams over their caps, idle and silent connections, and a descriptor
limit that runs out under the metrics port. Bounded in count and time; no timing asserted
beyond generous deadlines.
"""

import asyncio
import json
import re
import socket
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import until
from processes import FAKE, SERVING

from benchmarks.h2_raw import connect, request_headers
from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2, DAQ_pb2_grpc

READ_PATH = "/services.daq.DAQ/Read"
WATCH_PATH = "/grpc.health.v1.Health/Watch"
ONE_SHOT = DAQ_pb2.ReadingList(drf=["M:OUTTMP@I"])
SIM = ("--workers", "0", "--port", "0", "--backend", "sim")  # in process; its devices stream


async def _one_shot_reads(address: str, seconds: float) -> list[str]:
    """A read every 50 ms for `seconds` (2 s deadline each, not waiting for the one before):
    each call's status code name."""
    codes: list[str] = []
    async with grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        stub = DAQ_pb2_grpc.DAQStub(channel)

        async def one() -> None:
            try:
                async for _ in stub.Read(ONE_SHOT, timeout=2.0):
                    pass
                codes.append("OK")
            except grpc.RpcError as exc:
                codes.append(exc.code().name)

        calls = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            calls.append(asyncio.ensure_future(one()))
            await asyncio.sleep(0.05)
        await asyncio.gather(*calls)
    return codes


def test_rapid_reset_on_one_connection_leaves_another_clients_calls_served(supervisor):
    # gRPC's defence against streams reset as soon as they are opened works only with a
    # per-connection stream limit. Without one, gRPC's queue of calls not yet taken by Python
    # fills with the attacker's, and it cancels everyone's: ~97% of the victim's calls failed.
    sup = supervisor(*FAKE, "--host", "127.0.0.1")
    authority = f"127.0.0.1:{sup.port}"

    async def attack(end: float) -> int:
        conn = await connect("127.0.0.1", sup.port, "127.0.0.2")
        await asyncio.wait_for(conn.settings_acked.wait(), 10)
        block = request_headers(READ_PATH, authority)
        streams = 0
        while time.monotonic() < end and conn.is_open:
            if not await conn.write(conn.opened_and_reset(block)):
                break
            streams += 100
            await asyncio.sleep(0)  # the victim shares this loop: its turn too
        conn.close()
        return streams

    async def main() -> tuple[int, list[str]]:
        attacking = asyncio.ensure_future(attack(time.monotonic() + 4.0))
        await asyncio.sleep(0.5)  # the attack under way
        codes = await _one_shot_reads(authority, 3.0)
        return await attacking, codes

    streams, codes = asyncio.run(main())
    assert streams > 10_000, streams  # an attack, not a trickle
    failed = [c for c in codes if c != "OK"]
    assert len(codes) >= 20 and len(failed) <= len(codes) // 10, (len(codes), failed[:10])


def test_connections_over_the_per_address_limit_are_cut_and_other_addresses_served(supervisor):
    sup = supervisor(*FAKE, "--max-connections-per-address", "5", "--refusal-log-interval", "0")
    authority = f"127.0.0.1:{sup.port}"

    async def main() -> None:
        conns = [await connect("127.0.0.1", sup.port, "127.0.0.2") for _ in range(20)]
        await asyncio.gather(*(asyncio.wait_for(c.settings_acked.wait(), 10) for c in conns))
        await until(lambda: sum(c.is_open for c in conns) <= 5, what="the excess connections cut")
        kept = [c for c in conns if c.is_open]
        assert len(kept) == 5
        # What is left of that address is served; so is another address.
        stream_id = await kept[0].call(READ_PATH, ONE_SHOT.SerializeToString(), authority)
        await until(lambda: kept[0].ended(stream_id), what="a reply on a kept connection")
        assert kept[0].answered(stream_id)
        assert await _one_shot_reads(authority, 0.5) == ["OK"] * 10
        for c in conns:
            c.close()

    asyncio.run(main())
    cut = [
        int(m)
        for m in re.findall(r"event=connections_cut peer=127\.0\.0\.2 count=(\d+)", "\n".join(sup.lines["stderr"]))
    ]
    assert sum(cut) == 15, sup.output()


def test_health_watches_have_caps_of_their_own_and_leave_streams_admissible(supervisor, tmp_path):
    audit = tmp_path / "audit.jsonl"
    sup = supervisor(
        *SIM,
        "--max-streams",
        "1",
        "--max-health-watches",
        "4",
        "--max-health-watches-per-peer",
        "2",
        "--audit-path",
        str(audit),
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{sup.port}")
    try:
        health = health_pb2_grpc.HealthStub(channel)
        mine = [health.Watch(health_pb2.HealthCheckRequest()) for _ in range(2)]
        assert [next(w).status for w in mine] == [health_pb2.HealthCheckResponse.SERVING] * 2
        third = health.Watch(health_pb2.HealthCheckRequest())
        try:
            next(third)
            raise AssertionError("a third Watch from one client was admitted")
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert exc.details() == "too many Health/Watch streams from ipv4:127.0.0.1 (the limit is 2)"

        async def others() -> tuple[int, bool]:
            two = await connect("127.0.0.1", sup.port, "127.0.0.2")
            calls = [await two.call(WATCH_PATH, b"", f"127.0.0.1:{sup.port}") for _ in range(2)]
            await until(lambda: all(two.answered(c) for c in calls), what="two more watches answered")
            three = await connect("127.0.0.1", sup.port, "127.0.0.3")
            over = await three.call(WATCH_PATH, b"", f"127.0.0.1:{sup.port}")  # the fifth: over the cap of 4
            await until(lambda: three.ended(over), what="the fifth watch refused")
            refused = not three.answered(over)
            two.close()
            three.close()
            return len(calls), refused

        assert asyncio.run(others()) == (2, True)
        # Watches do not take the streams' place: max_streams is 1, and the stream is admitted.
        stub = DAQ_pb2_grpc.DAQStub(channel)
        stream = stub.Read(DAQ_pb2.ReadingList(drf=["M:OUTTMP@p,100"]), timeout=10)
        assert next(stream).WhichOneof("value") is not None
        stream.cancel()
        # A watch that ends gives its slot back.
        mine[0].cancel()
        again = health.Watch(health_pb2.HealthCheckRequest())
        assert next(again).status == health_pb2.HealthCheckResponse.SERVING
        again.cancel()
    finally:
        channel.close()
    sup.wait_line("stderr", r"rpc=Watch peer=ipv4:127\.0\.0\.1:\d+ .*decision=limit .*the limit is 2")
    sup.wait_line("stderr", r"rpc=Watch peer=ipv4:127\.0\.0\.3:\d+ .*decision=limit .*the limit is 4")
    refusals = [json.loads(line) for line in audit.read_text().splitlines() if '"method":"Watch"' in line]
    assert [(r["identity"], r["allowed"]) for r in refusals] == [("ipv4:127.0.0.1", False), ("ipv4:127.0.0.3", False)]


def test_idle_connections_are_closed_a_busy_one_kept_and_their_memory_released(supervisor):
    # Long enough an idle timeout that all of them are open before the first is closed.
    # 1,500 connections take ~21 MiB of gRPC's heap: a threshold below that.
    sup = supervisor(*SIM, "--connection-idle-timeout", "3", "--memory-release-bytes", str(8 * 2**20))
    address = f"127.0.0.1:{sup.port}"

    async def main() -> None:
        # Enough of them (from three addresses) that their going frees the heap they took.
        idle = [await connect("127.0.0.1", sup.port, f"127.0.0.{2 + k % 3}") for k in range(1500)]
        readings: list[float] = []
        async with grpc.aio.insecure_channel(address) as channel:
            stream = DAQ_pb2_grpc.DAQStub(channel).Read(DAQ_pb2.ReadingList(drf=["M:OUTTMP@p,100"]))

            async def read() -> None:
                async for _ in stream:
                    readings.append(time.monotonic())

            reading = asyncio.ensure_future(read())
            await until(lambda: not any(c.is_open for c in idle), what="the idle connections closed")
            assert all(c.goaway is not None for c in idle)  # told, then closed: clients reconnect
            # The connection with a stream is not idle: its readings go on well past the timeout.
            since = time.monotonic()
            await until(lambda: readings and readings[-1] > since + 1.5, what="readings 1.5 s later")
            stream.cancel()
            await asyncio.gather(reading, return_exceptions=True)

    asyncio.run(main())
    released = sup.wait_line("stderr", r"event=memory_released reason=\d+_mib_idle rss_mb=(\d+)->(\d+)")
    assert int(released.group(2)) < int(released.group(1)), released.group(0)


def test_a_connection_that_never_sends_the_preface_is_closed(supervisor):
    sup = supervisor(*FAKE, "--connection-idle-timeout", "0", "--handshake-timeout", "0.5")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        silent = socket.socket()  # connected, and never a byte of HTTP/2
        silent.setblocking(False)
        await loop.sock_connect(silent, ("127.0.0.1", sup.port))
        # The server's SETTINGS come at once; then, the preface never sent, the end (gRPC's own
        # timeout is 120 s).
        async with asyncio.timeout(20):
            while await loop.sock_recv(silent, 4096):
                pass
        silent.close()

    asyncio.run(main())


def test_accept_failures_on_the_metrics_port_are_logged_once_per_interval(supervisor):
    # With a descriptor limit this low the metrics port runs out of descriptors under a
    # connection flood: asyncio used to log each failed accept with its traceback, hundreds
    # of lines a second.
    sup = supervisor(*FAKE, "--metrics-port", "0", "--metrics-timeout", "30", nofile=48)
    metrics_port = int(re.search(r"metrics on port (\d+)", SERVING.match(sup.lines["stdout"][0]).group(3)).group(1))  # type: ignore[union-attr]
    mark = sup.mark()

    async def flood() -> None:
        loop = asyncio.get_running_loop()
        held = []
        for k in range(100):  # from 10 addresses: no per-address cap on the metrics port keeps them out
            sock = socket.socket()
            sock.setblocking(False)
            sock.bind((f"127.0.0.{2 + k % 10}", 0))
            await loop.sock_connect(sock, ("127.0.0.1", metrics_port))
            await loop.sock_sendall(sock, b"GET /metrics HTTP/1.0\r\n")  # and never the end of it
            held.append(sock)
        await asyncio.sleep(3.0)  # the front keeps failing to accept the rest meanwhile
        for sock in held:
            sock.close()

    asyncio.run(flood())
    sup.wait_line("stderr", r"event=metrics_accept_failed error=.*Too many open files.* count=\d+", start=mark)
    lines = sup.lines["stderr"][mark:]
    assert len([line for line in lines if "accept" in line]) == 1, "\n".join(lines[:20])
    assert not any("Traceback" in line for line in lines), "\n".join(lines[:20])
    # Once the flood is gone the port answers again.
    deadline = time.monotonic() + 20
    while True:
        try:
            with socket.create_connection(("127.0.0.1", metrics_port), timeout=2) as probe:
                probe.sendall(b"GET /readyz HTTP/1.0\r\n\r\n")
                if probe.recv(64).startswith(b"HTTP/1.0 200"):
                    break
        except OSError:
            pass
        assert time.monotonic() < deadline, "/readyz did not answer after the flood"
        time.sleep(0.2)
