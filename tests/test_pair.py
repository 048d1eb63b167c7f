"""Two pacsys-supervisor instances behind haproxy on loopback, as ops/ ships them (benchmarks/pair.py).

One-shot reads through the balancer keep succeeding while one instance is SIGKILLed (only
calls in flight on it may fail) and while one is drained with SIGTERM (none fails: readiness
turns NOT_SERVING and the instance keeps serving for drain_delay, longer than haproxy takes
to stop sending it calls); the instance that comes back gets calls again. A stream of the
pacsys 0.3.0 release's client moves to the other instance when its instance drains; when
its instance is killed, haproxy ends it in a way that client does not recover from, which is
why streaming clients are given the instances' addresses instead (tests/test_client_failover.py):
as shipped, the instances' plaintext listeners (`plaintext_port`), which this test streams from
through a SIGKILL too.

haproxy is Debian's package (.ci/run installs it); the tests skip only where it is missing.
"""

from __future__ import annotations

import shutil
import signal
import sys
import time

import pytest
from release_venv import release_python

from benchmarks.pair import Instance, Load, Pair, wait_until
from benchmarks.release_subscriber import ReleaseSubscriber

pytestmark = [
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals"),
    pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed (apt-get install haproxy)"),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command"),
]

CLIENTS = 4
DRF = "M:OUTTMP@p,100"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    p = Pair(tmp_path_factory.mktemp("pair"))
    try:
        p.start()
        yield p
    finally:
        p.close()


def both_up(pair: Pair) -> None:
    for instance in pair.instances.values():
        if not instance.running:
            instance.start()
    pair.wait_up("a", "b")


def test_one_shot_reads_survive_a_kill_and_a_drain_and_a_returning_instance_gets_calls(pair):
    both_up(pair)
    a0, b0 = pair.a.reads_served(), pair.b.reads_served()
    with Load(f"127.0.0.1:{pair.port}", clients=CLIENTS) as load:
        wait_until(
            lambda: pair.a.reads_served() > a0 + 20 and pair.b.reads_served() > b0 + 20,
            30,
            "calls on both instances",
        )

        killed = time.monotonic()
        pair.a.signal(signal.SIGKILL)
        pair.a.wait(10)
        wait_until(lambda: load.succeeded(since=killed + 1.0) >= 50, 30, "calls served by the survivor")
        on_kill = load.failures(since=killed)
        # Each client has at most one call in flight: only those on the killed instance may fail.
        assert len(on_kill) <= CLIENTS, on_kill
        assert all(end < killed + 1.0 for _, end, _ in on_kill), on_kill

        pair.a.start()
        pair.wait_up("a")
        wait_until(lambda: pair.a.reads_served() >= 20, 30, "calls on the instance that came back")

        drained = time.monotonic()
        pair.b.signal(signal.SIGTERM)
        assert pair.b.wait(30) == 0
        gone = time.monotonic()
        wait_until(lambda: load.succeeded(since=gone) >= 50, 30, "calls after the drain")
    assert load.failures(since=drained) == []
    assert load.succeeded(since=drained) > 100


def _release_stream_through_haproxy(pair: Pair, signum: int) -> tuple[ReleaseSubscriber, Instance, Instance, float]:
    """A release client's stream through haproxy, and its instance sent `signum`: (the stream,
    the instance that had it, the other, the moment the signalled instance had exited)."""
    both_up(pair)
    sub = ReleaseSubscriber(release_python(), "127.0.0.1", pair.port, "Z:SIM001@p,100")
    wait_until(lambda: sub.readings() >= 5, 30, "the release's stream through haproxy")
    streams = {name: i.metric("pacsys_active_streams") for name, i in pair.instances.items()}
    assert sorted(streams.values()) == [0.0, 1.0], streams
    victim: Instance = pair.a if streams["a"] else pair.b
    other: Instance = pair.b if victim is pair.a else pair.a
    victim.signal(signum)
    victim.wait(30)
    return sub, victim, other, time.monotonic()


def test_a_release_clients_stream_moves_to_the_other_instance_on_a_drain(pair):
    sub, _, other, gone = _release_stream_through_haproxy(pair, signal.SIGTERM)
    with sub:
        # The release subscribes again 1 s after UNAVAILABLE; through haproxy it reaches the survivor.
        wait_until(lambda: sub.readings(since=gone) >= 10, 30, "readings after the instance ended")
        assert other.metric("pacsys_active_streams") == 1


def test_the_shipped_pair_streams_to_the_release_client_from_its_plaintext_listeners_through_a_kill(pair):
    """The shipped topology for streaming clients that speak plaintext only: the release's client
    given both instances' plaintext listeners (`plaintext_port`), no proxy in the stream's path;
    the instance holding the stream SIGKILLed, the stream carries on from the other."""
    both_up(pair)
    a, b = pair.a, pair.b
    with ReleaseSubscriber(
        release_python(), f"ipv4:127.0.0.1:{a.plaintext_port},127.0.0.1", b.plaintext_port, DRF
    ) as sub:
        wait_until(lambda: sub.readings() >= 5, 30, "the release's stream from the plaintext listeners")
        streams = {name: i.metric("pacsys_active_streams") for name, i in pair.instances.items()}
        assert streams == {"a": 1.0, "b": 0.0}, streams  # pick_first: the first address
        killed = time.monotonic()
        a.signal(signal.SIGKILL)
        a.wait(10)
        wait_until(lambda: sub.readings(since=killed) >= 10, 30, "readings after the kill")
        gap = sub.longest_gap(killed, time.monotonic())
        assert gap < 2.0, f"{gap:.2f} s without readings:\n{sub.output()}"
        assert b.metric("pacsys_active_streams") == 1


def test_haproxy_ends_a_killed_instances_stream_without_a_status_and_the_release_client_gives_up(pair):
    """Why streaming clients are not given haproxy (ops/README.md, "Several hosts: behind haproxy").

    haproxy 2.6 ends a stream whose server died with an empty DATA frame with END_STREAM and
    no grpc-status; gRPC reports UNKNOWN, which the 0.3.0 client treats as final (it
    subscribes again after UNAVAILABLE and CANCELLED only). tests/test_client_failover.py
    shows the same client carrying on when it is given the instances' addresses instead.
    """
    sub, _, _, gone = _release_stream_through_haproxy(pair, signal.SIGKILL)
    with sub:
        wait_until(lambda: sub.errors(since=gone - 1.0), 10, "the client's error")
        assert "UNKNOWN" in sub.errors()[0], sub.output()
        # The client says it will not subscribe again ("non-retryable") and gets nothing more.
        wait_until(lambda: "non-retryable" in sub.output(), 10, "the client to give up")
        assert sub.readings(since=gone) == 0
