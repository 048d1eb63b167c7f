"""Client-side fail-over: the pacsys 0.3.0 client given every instance's address, no proxy between.

The topology ops/README.md recommends for streaming clients ("Several hosts: clients given
every address"): one name with every instance's address (a DNS name with several records,
a Kubernetes headless Service). Here the release's own client (`pacsys.grpc`, run under the release's interpreter)
is given two loopback addresses through gRPC's own resolver, `ipv4:127.0.0.1:P1,127.0.0.1`
and port P2, so no name is resolved. Without a service config the client's channel uses
pick_first: its stream goes to the first address that accepts. When the instance holding
the stream is SIGKILLed, or drained (SIGTERM, `drain_delay`), the client sees UNAVAILABLE,
subscribes again on the same channel after 1 s, and its channel connects to the other
address: readings carry on within 2 s.
"""

from __future__ import annotations

import signal
import sys
import threading
import time

import pytest
from release_venv import release_python

from benchmarks.pair import Instance, plain_options, wait_until
from benchmarks.release_subscriber import ReleaseSubscriber

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

DRF = "M:OUTTMP@p,100"
LONGEST_GAP = 2.0  # seconds without a reading that the client may see when its instance goes away


@pytest.fixture(scope="module")
def instances(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("client-failover")
    pair = [Instance(name, logdir, *plain_options()) for name in ("a", "b")]
    try:
        threads = [threading.Thread(target=i.start) for i in pair]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        yield pair
    finally:
        for i in pair:
            i.stop()


def both_up(instances: list[Instance]) -> None:
    for i in instances:
        if not i.running:
            i.start()


def subscriber(instances: list[Instance]) -> ReleaseSubscriber:
    first, second = instances
    return ReleaseSubscriber(release_python(), f"ipv4:127.0.0.1:{first.port},127.0.0.1", second.port, DRF)


def holder(instances: list[Instance]) -> tuple[Instance, Instance]:
    """(the instance serving the client's stream, the other one)."""
    streams = [i.metric("pacsys_active_streams") for i in instances]
    assert sorted(streams) == [0.0, 1.0], streams
    first, second = instances
    return (first, second) if streams[0] else (second, first)


def test_the_stream_goes_to_the_first_address_and_moves_to_the_other_when_its_instance_is_killed(instances):
    both_up(instances)
    with subscriber(instances) as sub:
        wait_until(lambda: sub.readings() >= 5, 30, "the release's stream")
        victim, survivor = holder(instances)
        assert victim is instances[0], "pick_first: the first address that accepts"
        killed = time.monotonic()
        victim.signal(signal.SIGKILL)
        victim.wait(10)
        wait_until(lambda: sub.readings(since=killed) >= 10, 30, "readings after the kill")
        gap = sub.longest_gap(killed, time.monotonic())
        assert gap < LONGEST_GAP, f"{gap:.2f} s without readings:\n{sub.output()}"
        assert survivor.metric("pacsys_active_streams") == 1
        assert [e for e in sub.errors(since=killed) if "UNAVAILABLE" not in e] == []


def test_the_stream_moves_to_the_other_instance_when_its_instance_drains(instances):
    both_up(instances)
    # A client of its own: the release doubles its 1 s wait after each error within 30 s.
    with subscriber(instances) as sub:
        wait_until(lambda: sub.readings() >= 5, 30, "the release's stream")
        victim, survivor = holder(instances)
        drained = time.monotonic()
        victim.signal(signal.SIGTERM)
        assert victim.wait(30) == 0
        gone = time.monotonic()
        wait_until(lambda: sub.readings(since=gone) >= 10, 30, "readings after the drain")
        gap = sub.longest_gap(drained, time.monotonic())
        assert gap < LONGEST_GAP, f"{gap:.2f} s without readings:\n{sub.output()}"
        assert survivor.metric("pacsys_active_streams") == 1
        # The instance served the stream through its drain_delay before it ended it.
        assert sub.readings(since=drained) - sub.readings(since=gone) >= 20
