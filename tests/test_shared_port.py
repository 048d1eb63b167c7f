"""Several instances on one host and one port (`reuse_port`): real processes, real clients.

Instances started with `--reuse-port` on the same port all listen there (SO_REUSEPORT), and
the kernel gives each new connection to one of them. Each has its own metrics port. Clients
are given the one address: gRPC's own clients (each with a connection of its own, as
separate programs have) and the pacsys 0.3.0 release's client streaming `M:OUTTMP@p,100`
(its own venv, tests/release_venv.py).

- Both serve: the kernel spreads the clients' connections over them.
- A SIGKILL fails at most the calls in flight on the killed instance, and the release
  client's stream, which the killed instance held, carries on from the survivor within 3 s
  (the client subscribes again after 1 s; its new connection can only reach the survivor).
- A hot upgrade (a new instance joins, the old one drains on SIGTERM) fails no call under
  load: the old instance leaves the port at once, keeps serving its connections while each
  is asked to reconnect (`connection_max_age`, 2 s here), then stops.
- The per-address connection limit counts each instance's own connections, not every
  connection the kernel lists on the shared port.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from processes import process_env
from release_venv import release_python

from benchmarks.h2_raw import connect
from benchmarks.pair import REPO, Instance, Load, free_port, wait_until
from benchmarks.release_subscriber import ReleaseSubscriber
from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2, DAQ_pb2_grpc

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT as Linux has it")

DRF = "M:OUTTMP@p,100"
CLIENTS = 4
LONGEST_GAP = 3.0  # seconds without a reading that the release's client may see when its instance goes
MAX_AGE = 2.0  # connection_max_age: a drain lasts 2 x 1.1 + 1 = 3.2 s


class SharedPort:
    """Instances with --reuse-port on one port; `live` are those started and not yet ended."""

    def __init__(self, logdir):
        self.logdir = logdir
        self.port = free_port()
        self.live: list[Instance] = []
        self._names = iter("abcdefghij")

    def start(self, count: int = 1) -> list[Instance]:
        new = [
            Instance(
                next(self._names),
                self.logdir,
                "--host",
                "127.0.0.1",
                "--workers",
                "1",
                "--reuse-port",
                "--connection-max-age",
                str(MAX_AGE),
                "--shutdown-grace",
                "3",
                port=self.port,
            )  # fmt: skip
            for _ in range(count)
        ]
        threads = [threading.Thread(target=i.start) for i in new]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i in new:
            if not i.ready():
                raise RuntimeError(f"instance {i.name} did not start: see {self.logdir}")
        self.live += new
        return new

    def ended(self, instance: Instance) -> None:
        self.live.remove(instance)

    def holder(self) -> tuple[Instance, Instance]:
        """(the instance serving the one stream, another one)."""
        streams = [i.metric("pacsys_active_streams") for i in self.live]
        assert sorted(streams)[-2:] == [0.0, 1.0], streams
        held = self.live[streams.index(1.0)]
        return held, next(i for i in self.live if i is not held)

    def close(self) -> None:
        for i in self.live:
            i.stop()


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    group = SharedPort(tmp_path_factory.mktemp("shared-port"))
    try:
        group.start(2)
        yield group
    finally:
        group.close()


def two_up(group: SharedPort) -> None:
    if len(group.live) < 2:
        group.start(2 - len(group.live))


def test_two_instances_listen_on_one_port_and_both_serve(shared):
    two_up(shared)
    first, second = shared.live
    assert first.port == second.port
    before = [i.reads_served() for i in shared.live]
    with Load(f"127.0.0.1:{shared.port}", clients=8) as load:
        wait_until(
            lambda: all(i.reads_served() > n + 20 for i, n in zip(shared.live, before, strict=True)),
            30,
            "calls served by both instances",
        )
    assert load.failures() == []


def test_a_kill_fails_only_calls_in_flight_and_the_release_stream_resumes_on_the_survivor(shared):
    two_up(shared)
    with ReleaseSubscriber(release_python(), "127.0.0.1", shared.port, DRF) as sub:
        with Load(f"127.0.0.1:{shared.port}", clients=CLIENTS) as load:
            wait_until(lambda: sub.readings() >= 5 and load.succeeded() >= 50, 30, "the stream and calls")
            victim, survivor = shared.holder()
            killed = time.monotonic()
            victim.signal(signal.SIGKILL)
            victim.wait(10)
            shared.ended(victim)
            wait_until(lambda: sub.readings(since=killed) >= 10, 30, "readings after the kill")
            wait_until(lambda: load.succeeded(since=killed + 1.0) >= 50, 30, "calls after the kill")
        gap = sub.longest_gap(killed, time.monotonic())
        assert gap < LONGEST_GAP, f"{gap:.2f} s without readings:\n{sub.output()}"
        assert survivor.metric("pacsys_active_streams") == 1
        # Only what was in flight to the killed instance fails: each client's call on it, and a
        # client whose reconnect raced the kill. The dying listener resets a connection it had
        # queued but not accepted (net.ipv4.tcp_migrate_req = 1 would move it to the survivor,
        # ops/README.md), and gRPC then fails that client's calls at once until its reconnect
        # backoff (1 s, jittered) is over. Nothing fails after that.
        failed = load.failures(since=killed)
        assert len([call for call in failed if call[0] < killed]) <= CLIENTS, failed
        assert all(end < killed + 2.0 for _, end, _ in failed), failed
        assert load.failures(since=0.0) == failed


def test_a_hot_upgrade_under_load_fails_no_call(shared):
    two_up(shared)
    old = shared.live[0]
    with ReleaseSubscriber(release_python(), "127.0.0.1", shared.port, DRF) as sub:
        with Load(f"127.0.0.1:{shared.port}", clients=CLIENTS) as load:
            wait_until(lambda: sub.readings() >= 5 and load.succeeded() >= 50, 30, "the stream and calls")
            (new,) = shared.start(1)  # joins the port
            drained = time.monotonic()
            old.signal(signal.SIGTERM)
            wait_until(lambda: "event=port_left" in old.log_text(), 10, "the old instance to leave the port")
            # From now on every new connection goes to the others, while the old one still serves.
            before = old.metric("pacsys_active_streams")
            with fresh_streams(shared.port, 6):
                assert old.metric("pacsys_active_streams") == before
            assert old.wait(30) == 0
            gone = time.monotonic()
            # gRPC's acceptor reports the listener the drain shut down: expected, not an error.
            assert "level=ERROR" not in old.log_text(), old.log_text()
            assert re.search(r"level=INFO logger=grpc .*Closing acceptor", old.log_text()), old.log_text()
            shared.ended(old)
            wait_until(lambda: load.succeeded(since=gone) >= 100, 30, "calls after the old instance ended")
            wait_until(lambda: sub.readings(since=gone) >= 10, 30, "readings after the old instance ended")
        assert load.failures() == []
        assert new.reads_served() > 0
        # The old instance left the port at once, served on while its clients moved, then stopped.
        assert MAX_AGE * 1.1 + 1.0 - 0.5 < gone - drained < 20, gone - drained
        assert all("UNAVAILABLE" in e for e in sub.errors(since=drained)), sub.errors(since=drained)
        gap = sub.longest_gap(drained, time.monotonic())
        assert gap < LONGEST_GAP, f"{gap:.2f} s without readings:\n{sub.output()}"


@contextlib.contextmanager
def fresh_streams(port: int, count: int) -> Iterator[None]:
    """`count` streams, each on a new connection of its own, open (a reading received) inside the block."""
    channels = [grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])]
    channels += [grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
                 for _ in range(count - 1)]  # fmt: skip
    streams = []
    try:
        for k, channel in enumerate(channels):
            stub = DAQ_pb2_grpc.DAQStub(channel)
            streams.append(stub.Read(DAQ_pb2.ReadingList(drf=[f"Z:SIM{k:03d}@p,100"]), timeout=30))
        for stream in streams:
            next(stream)
        yield
    finally:
        for stream in streams:
            stream.cancel()
        for channel in channels:
            channel.close()


def test_the_per_address_connection_limit_counts_only_the_instances_own_connections(tmp_path):
    """Another process's connections on the shared port are not this instance's: 8 connections
    from 127.0.0.2 held by a listener of this test, then 3 to the instance, with a limit of 7:
    none is cut (counting the port's 11 would cut the instance's own)."""
    port = free_port()
    other = socket.socket()
    other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    other.bind(("127.0.0.1", port))
    other.listen(16)
    held: list[socket.socket] = []
    try:
        for _ in range(8):
            client = socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.2", 0))
            held += [client, other.accept()[0]]
        instance = Instance(
            "limit", tmp_path,
            "--host", "127.0.0.1", "--workers", "0", "--backend", "fake", "--reuse-port",
            "--max-connections-per-address", "7",
            port=port,
        )  # fmt: skip
        instance.start()
        other.close()  # new connections now reach the instance only
        try:

            async def main() -> list[bool]:
                conns = [await connect("127.0.0.1", port, "127.0.0.2") for _ in range(3)]
                await asyncio.gather(*(asyncio.wait_for(c.settings_acked.wait(), 10) for c in conns))
                await asyncio.sleep(2.0)  # four passes of the guard
                still = [c.is_open for c in conns]
                for c in conns:
                    c.close()
                return still

            assert asyncio.run(main()) == [True, True, True]
            assert instance.metric("pacsys_limits_hit_total", '{limit="max_connections_per_address"}') == 0
        finally:
            instance.stop()
    finally:
        other.close()
        for sock in held:
            sock.close()


def test_a_port_held_by_a_process_that_does_not_share_it_still_exits_3(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        argv = [sys.executable, "-m", "pacsys.supervised.cli", "--workers", "0", "--backend", "fake"]
        argv += ["--host", "127.0.0.1", "--port", str(port), "--reuse-port"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO, env=process_env())
    assert done.returncode == 3, done
    assert done.stderr.splitlines() == [
        f"pacsys-supervisor: error: cannot listen on 127.0.0.1:{port}: port {port} is in use by a process that "
        f"does not share it (`ss -ltnp 'sport = :{port}'` shows which): reuse_port shares a port only with "
        "processes of the same user that set it too"
    ], done.stderr
