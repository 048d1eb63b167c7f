"""Shared subscriptions through real workers and a real server: errors isolated to their index, release,
slow clients. Late joiners, sharing and moves are unit-tested without processes (tests/test_pool_logic.py)."""

import time

import psutil
from helpers import wait_for

from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2


def _stream(r, drfs):
    return r.stub.Read(DAQ_pb2.ReadingList(drf=drfs))


def test_a_subscription_error_reaches_only_its_index(running):
    r = running(backend="fault_backends:scripted", workers=2)
    call = _stream(r, ["Z:BADSUB@p,100", "Z:GOOD@p,100"])
    seen = {0: [], 1: []}
    for reply in call:
        seen[reply.index].append(reply)
        if len(seen[1]) >= 5:
            break
    call.cancel()
    (error,) = seen[0]
    assert error.WhichOneof("value") == "status" and error.status.status_code < 0
    assert "BADSUB" in error.status.message
    assert all(x.WhichOneof("value") == "readings" for x in seen[1])


def test_a_cancelled_stream_releases_its_share_quickly(running):
    r = running(workers=2, subscription_linger=0.2)
    call = _stream(r, [f"Z:SIM{i:03d}@p,50" for i in range(10)])
    next(call)
    assert r.pool.client_subscription_count == 1
    call.cancel()
    cancelled = time.monotonic()
    wait_for(lambda: r.pool.client_subscription_count == 0, what="the client share to be released")
    released = time.monotonic() - cancelled
    wait_for(lambda: r.pool.subscription_count == 0, what="the backend subscriptions to close after the linger")
    assert released < 1.0, f"released after {released:.2f} s"


def test_the_front_encodes_nothing_the_workers_encoded(running, monkeypatch):
    """Workers send each reading's reply body; the front (this process) only prepends indices."""
    import pacsys.replies

    encoded = []
    original = pacsys.replies.reading_body
    monkeypatch.setattr(pacsys.replies, "reading_body", lambda reading: encoded.append(reading) or original(reading))
    r = running(workers=2)
    oneshot = r.read([f"Z:SIM{i:03d}@I" for i in range(10)])
    call = _stream(r, ["Z:SIM001@p,20", "Z:SIM003@p,20"])
    replies = [next(call) for _ in range(20)]
    call.cancel()
    assert [x.index for x in oneshot] == list(range(10))
    assert all(x.WhichOneof("value") == "readings" for x in oneshot + replies)
    assert encoded == []


def test_a_client_that_never_reads_costs_bounded_memory_nobody_else_and_is_named_in_the_status_view(running, caplog):
    import logging

    from pacsys.supervised.admin import render_status

    r = running(workers=2, stream_buffer=200)
    front = psutil.Process()
    stalled = _stream(r, [f"Z:SIM{i:03d}@p,20" for i in range(100)])  # never read
    reader = _stream(r, ["Z:SIM000@p,20"])
    next(reader)
    wait_for(lambda: r.server.servicer.dropped_now() > 0, timeout=30, what="the stalled stream to drop readings")
    rss_then = front.memory_info().rss
    started, got = time.monotonic(), 0
    for _ in reader:  # the other client keeps its 50 Hz
        got += 1
        if got == 100:
            break
    rate = got / (time.monotonic() - started)
    grown = front.memory_info().rss - rss_then
    assert rate > 30, f"the reading client got {rate:.0f}/s of 50/s"
    assert grown < 20 * 2**20, f"front RSS grew {grown / 2**20:.1f} MiB while one client stalled"
    # The status view puts the stream that falls behind first, and names it.
    view = r.server.status()
    behind, keeping_up = view["streams"]
    assert behind["drfs"] == "Z:SIM000@p,20, Z:SIM001@p,20 and 98 more" and behind["dropped"] > 0
    assert keeping_up["drfs"] == "Z:SIM000@p,20" and keeping_up["dropped"] == 0
    assert behind["peer"].startswith("ipv") and behind["age_s"] >= 0
    assert "open streams, most behind first (2 of 2):" in render_status(view)
    with caplog.at_level(logging.WARNING, logger="pacsys.supervised"):
        stalled.cancel()
        wait_for(
            lambda: any("event=stream_ended_behind" in x.getMessage() for x in caplog.records),
            what="the stalled stream's end to be logged with its drops",
        )
    reader.cancel()
    (line,) = [x.getMessage() for x in caplog.records if "event=stream_ended_behind" in x.getMessage()]
    assert "drfs=Z:SIM000@p,20" in line and "dropped=" in line
