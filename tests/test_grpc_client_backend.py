"""DAQClientBackend against real SupervisedServers on loopback (no mocks).

Each test runs its async body with asyncio.run; synchronization polls a condition with a
deadline, never a fixed sleep. Every server started here is stopped by its fixture or by
the test that started it.
"""

from __future__ import annotations

import asyncio
import logging
import socket

import grpc
import pytest
from helpers import until

from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2, DAQ_pb2_grpc
from pacsys.aio import AsyncBackend, caller_authorization
from pacsys.backends.grpc_client import KEEPALIVE_OPTIONS, DAQClientBackend
from pacsys.errors import AuthenticationError, BackendUnavailable, PolicyDenied
from pacsys.supervised import ReadOnlyPolicy, SupervisedServer
from pacsys.testing import AsyncFakeBackend, FakeBackend
from pacsys.types import BackendCapability, Reading, ValueType

DEADLINE = 20.0  # generous: CI machines can be slow


def _run(coro, timeout: float = 60.0):
    async def bounded():
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


async def _next_reading(handle, timeout: float = DEADLINE) -> Reading:
    async for reading, _ in handle.readings(timeout=timeout):
        return reading
    raise AssertionError("no reading arrived")


def _seeded(fb):
    fb.set_reading("M:OUTTMP", 72.5)
    fb.set_reading("G:AMANDA", 42.0)
    return fb


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _target(srv: SupervisedServer) -> str:
    return f"127.0.0.1:{srv.port}"


@pytest.fixture
def fake():
    return _seeded(FakeBackend())


@pytest.fixture
def upstream(fake):
    srv = SupervisedServer(fake, port=0)
    srv.start()
    yield srv
    srv.stop(grace=0)


@pytest.fixture
def secured(fake):
    srv = SupervisedServer(fake, port=0, token="s3cret", allow_token_plaintext=True)  # [::], no TLS
    srv.start()
    yield srv
    srv.stop(grace=0)


# -- one-shot reads --------------------------------------------------------------------------


def test_capabilities_and_keepalive():
    b = DAQClientBackend("127.0.0.1:1")
    caps = b.capabilities
    for cap in (BackendCapability.READ, BackendCapability.WRITE, BackendCapability.STREAM, BackendCapability.BATCH):
        assert cap in caps
    options = dict(KEEPALIVE_OPTIONS)
    assert options["grpc.keepalive_time_ms"] == 30_000
    assert options["grpc.keepalive_permit_without_calls"] == 1
    assert "s3cret" not in repr(DAQClientBackend("h:1", token="s3cret"))


def test_oneshot_read_values_in_request_order(upstream):
    backend = DAQClientBackend(_target(upstream))  # built outside any loop

    async def body():
        async with backend:
            return await backend.get_many(["M:OUTTMP@I", "G:AMANDA@I", "M:OUTTMP@I"])

    readings = _run(body())
    assert [r.drf for r in readings] == ["M:OUTTMP@I", "G:AMANDA@I", "M:OUTTMP@I"]
    assert [r.value for r in readings] == [pytest.approx(72.5), pytest.approx(42.0), pytest.approx(72.5)]
    assert all(r.ok and r.value_type is ValueType.SCALAR and r.timestamp is not None for r in readings)


def test_oneshot_read_error_statuses(fake, upstream):
    fake.set_error("M:BADDEV", -42, "Device not found")

    async def body():
        async with DAQClientBackend(_target(upstream)) as backend:
            return await backend.get_many(["M:BADDEV@I", "G:AMANDA@I", "Z:NOSUCH@I"])

    bad, good, missing = _run(body())
    assert (bad.drf, bad.facility_code, bad.error_code, bad.message) == ("M:BADDEV@I", 17, -42, "Device not found")
    assert bad.value is None and not bad.ok
    assert good.ok and good.value == pytest.approx(42.0)
    assert (missing.facility_code, missing.error_code) == (1, -1)  # the fake: "No reading configured"


def test_read_single_and_value_helpers(upstream):
    async def body():
        async with DAQClientBackend(_target(upstream)) as backend:
            return await backend.read("M:OUTTMP@I"), await backend.get("G:AMANDA@I")

    value, reading = _run(body())
    assert value == pytest.approx(72.5)
    assert reading.drf == "G:AMANDA@I" and reading.value == pytest.approx(42.0)


def test_read_of_subscription_drfs_returns_first_reading_and_cancels(fake, upstream):
    async def body():
        async with DAQClientBackend(_target(upstream)) as backend:
            task = asyncio.create_task(backend.get_many(["M:OUTTMP@p,1000", "G:AMANDA@p,1000"], timeout=DEADLINE))
            await until(lambda: fake.subscription_count == 1, DEADLINE, what="the upstream subscription")
            fake.emit_reading("M:OUTTMP", 1.0)
            fake.emit_reading("G:AMANDA", 2.0)
            fake.emit_reading("M:OUTTMP", 3.0)
            readings = await task
            # the call is cancelled once every index is answered: the upstream drops it
            await until(lambda: fake.subscription_count == 0, DEADLINE, what="the upstream subscription to end")
            return readings

    first, second = _run(body())
    assert (first.drf, first.value) == ("M:OUTTMP@p,1000", 1.0)
    assert (second.drf, second.value) == ("G:AMANDA@p,1000", 2.0)


def test_read_deadline_with_partial_answers_gives_timeout_readings(fake, upstream):
    async def body():
        async with DAQClientBackend(_target(upstream)) as backend:
            task = asyncio.create_task(backend.get_many(["M:OUTTMP@p,1000", "G:AMANDA@p,1000"], timeout=2.0))
            await until(lambda: fake.subscription_count == 1, DEADLINE, what="the upstream subscription")
            fake.emit_reading("M:OUTTMP", 1.0)
            return await task

    answered, missing = _run(body())
    assert answered.ok and answered.value == 1.0
    assert (missing.drf, missing.facility_code, missing.error_code) == ("G:AMANDA@p,1000", 1, -6)


def test_read_deadline_with_no_answer_raises_timeout(upstream):
    async def body():
        async with DAQClientBackend(_target(upstream), default_timeout=0.5) as backend:
            await backend.get_many(["M:OUTTMP@p,1000"])

    with pytest.raises(TimeoutError, match="DEADLINE_EXCEEDED"):
        _run(body())


def test_invalid_drf_is_value_error(upstream):
    async def body():
        async with DAQClientBackend(_target(upstream)) as backend:
            await backend.get_many(["not a drf!!"])

    with pytest.raises(ValueError, match="INVALID_ARGUMENT"):
        _run(body())


def test_empty_requests_do_not_call_upstream():
    async def body():
        async with DAQClientBackend(f"127.0.0.1:{_free_port()}") as backend:
            return await backend.get_many([]), await backend.write_many([])

    assert _run(body()) == ([], [])


# -- writes ----------------------------------------------------------------------------------


def test_write_statuses_in_request_order(fake, upstream):
    fake.set_write_result("Z:ACLTST", success=False, error_code=-17, message="no privilege")

    async def body():
        async with DAQClientBackend(_target(upstream)) as backend:
            results = await backend.write_many([("M:OUTTMP", 80.0), ("Z:ACLTST", 1.0), ("G:AMANDA", 43.5)])
            after = await backend.get_many(["M:OUTTMP@I", "G:AMANDA@I"])
            return results, after

    results, after = _run(body())
    assert [r.drf for r in results] == ["M:OUTTMP", "Z:ACLTST", "G:AMANDA"]
    assert [(r.facility_code, r.error_code) for r in results] == [(0, 0), (17, -17), (0, 0)]
    assert results[0].ok and not results[1].ok and results[1].message == "no privilege"
    assert fake.was_written("M:OUTTMP") and fake.was_written("Z:ACLTST") and fake.was_written("G:AMANDA")
    assert fake.get_written_value("G:AMANDA") == pytest.approx(43.5)
    assert [r.value for r in after] == [pytest.approx(80.0), pytest.approx(43.5)]


def test_write_value_kinds_round_trip(fake, upstream):
    async def body():
        async with DAQClientBackend(_target(upstream)) as backend:
            return await backend.write_many([("Z:TEXT", "hello"), ("Z:ARR", [1.0, 2.0]), ("Z:RAW", b"\x01\x02")])

    assert all(r.ok for r in _run(body()))
    assert fake.get_written_value("Z:TEXT") == "hello"
    assert fake.get_written_value("Z:ARR") == [1.0, 2.0]
    assert fake.get_written_value("Z:RAW") == b"\x01\x02"


def test_write_denied_by_upstream_policy(fake):
    srv = SupervisedServer(fake, port=0, policies=[ReadOnlyPolicy()])
    srv.start()
    try:

        async def body():
            async with DAQClientBackend(_target(srv)) as backend:
                await backend.write("M:OUTTMP", 1.0)

        with pytest.raises(PolicyDenied, match="PERMISSION_DENIED") as info:
            _run(body())
        assert isinstance(info.value, PermissionError)
        assert not fake.was_written("M:OUTTMP")
    finally:
        srv.stop(grace=0)


class _ReadOnlyBackend(AsyncBackend):
    @property
    def capabilities(self) -> BackendCapability:
        return BackendCapability.READ

    async def get_many(self, drfs, timeout=None):
        return [Reading(drf=d, value_type=ValueType.SCALAR, value=1.0) for d in drfs]

    async def close(self):
        pass


def test_upstream_without_writes_is_not_implemented():
    srv = SupervisedServer(_ReadOnlyBackend(), port=0)
    srv.start()
    try:

        async def body():
            async with DAQClientBackend(_target(srv)) as backend:
                await backend.write("M:OUTTMP", 1.0)

        with pytest.raises(NotImplementedError, match="UNIMPLEMENTED"):
            _run(body())
    finally:
        srv.stop(grace=0)


# -- authorization ---------------------------------------------------------------------------


@pytest.mark.parametrize("token", [None, "wrong"])
def test_write_without_the_right_token_is_refused(fake, secured, token):
    async def body():
        async with DAQClientBackend(_target(secured), token=token) as backend:
            await backend.write("M:OUTTMP", 80.0)

    with pytest.raises(AuthenticationError, match="UNAUTHENTICATED"):
        _run(body())
    assert not fake.was_written("M:OUTTMP")


def test_write_with_token_succeeds(fake, secured):
    async def body():
        async with DAQClientBackend(_target(secured), token="s3cret") as backend:
            return await backend.write("M:OUTTMP", 80.0)

    assert _run(body()).ok
    assert fake.was_written("M:OUTTMP")


def test_caller_token_is_passed_through(fake, secured):
    async def body(caller, token):
        if caller is not None:
            caller_authorization.set(caller)
        async with DAQClientBackend(_target(secured), token=token, pass_caller_token=True) as backend:
            return await backend.write("M:OUTTMP", 80.0)

    assert _run(body("Bearer s3cret", None)).ok
    # the caller's header wins over the configured token ...
    with pytest.raises(AuthenticationError):
        _run(body("Bearer nope", "s3cret"))
    assert _run(body("Bearer s3cret", "wrong")).ok
    # ... which is the fallback when the caller sent none
    assert _run(body(None, "s3cret")).ok
    with pytest.raises(AuthenticationError):
        _run(body(None, None))


def test_caller_token_is_not_passed_without_the_option(secured):
    async def body():
        caller_authorization.set("Bearer s3cret")
        async with DAQClientBackend(_target(secured)) as backend:
            await backend.write("M:OUTTMP", 80.0)

    with pytest.raises(AuthenticationError):
        _run(body())


# -- upstream down ---------------------------------------------------------------------------


def test_upstream_down_is_backend_unavailable():
    target = f"127.0.0.1:{_free_port()}"

    async def read():
        async with DAQClientBackend(target) as backend:
            await backend.get_many(["M:OUTTMP@I"])

    async def write():
        async with DAQClientBackend(target) as backend:
            await backend.write("M:OUTTMP", 1.0)

    with pytest.raises(BackendUnavailable, match="UNAVAILABLE"):
        _run(read())
    with pytest.raises(BackendUnavailable, match="UNAVAILABLE"):
        _run(write())


# -- subscriptions ---------------------------------------------------------------------------


def test_subscription_delivers_readings_and_stops(fake, upstream):
    async def body():
        async with DAQClientBackend(_target(upstream)) as backend:
            handle = await backend.subscribe(["G:AMANDA@p,500", "M:OUTTMP@p,1000"])
            await until(lambda: fake.subscription_count == 1, DEADLINE, what="the upstream subscription")
            await asyncio.to_thread(fake.emit_reading, "M:OUTTMP", 1.5)
            first = await _next_reading(handle)
            await asyncio.to_thread(fake.emit_error, "G:AMANDA", -42, "gone")
            second = await _next_reading(handle)
            await handle.stop()
            await until(lambda: fake.subscription_count == 0, DEADLINE, what="the upstream subscription to end")
            assert backend.subscription_count == 0
            return first, second

    first, second = _run(body())
    assert (first.drf, first.value) == ("M:OUTTMP@p,1000", 1.5)
    assert (second.drf, second.error_code, second.message) == ("G:AMANDA@p,500", -42, "gone")


def test_subscription_ended_by_upstream_error(upstream):
    async def body():
        async with DAQClientBackend(_target(upstream)) as backend:
            handle = await backend.subscribe(["not a drf!!"])
            async for _ in handle.readings(timeout=DEADLINE):
                pass
            raise AssertionError("the handle did not end with an error")

    with pytest.raises(ValueError, match="INVALID_ARGUMENT"):
        _run(body())


def test_close_ends_subscriptions_and_later_calls_fail(fake, upstream):
    async def body():
        backend = DAQClientBackend(_target(upstream))
        handle = await backend.subscribe(["M:OUTTMP@p,1000"])
        await until(lambda: fake.subscription_count == 1, DEADLINE, what="the upstream subscription")
        await backend.close()
        assert handle.stopped and handle.exc is None
        await until(lambda: fake.subscription_count == 0, DEADLINE, what="the upstream subscription to end")
        with pytest.raises(RuntimeError, match="closed"):
            await backend.get_many(["M:OUTTMP@I"])

    _run(body())


def test_subscription_reconnects_after_upstream_restart(caplog):
    caplog.set_level(logging.DEBUG, logger="pacsys.backends.grpc_client")

    def interruptions() -> int:
        return sum("event=subscription_interrupted " in r.getMessage() for r in caplog.records)

    first_fake = _seeded(FakeBackend())
    srv = SupervisedServer(first_fake, port=0)
    srv.start()
    port = srv.port
    servers = [srv]
    try:

        async def body():
            async with DAQClientBackend(f"127.0.0.1:{port}") as backend:
                handle = await backend.subscribe(["M:OUTTMP@p,1000"])
                await until(lambda: first_fake.subscription_count == 1, DEADLINE, what="the first subscription")
                first_fake.emit_reading("M:OUTTMP", 1.0)
                assert (await _next_reading(handle)).value == 1.0

                await asyncio.to_thread(srv.stop, 0)
                # the stream ends, and at least one retry finds nobody listening
                await until(lambda: interruptions() >= 2, DEADLINE, what="a failed reconnect attempt")
                assert not handle.stopped
                second_fake = AsyncFakeBackend()
                restarted = SupervisedServer(second_fake, port=port)
                servers.append(restarted)
                await asyncio.to_thread(restarted.start)

                await until(lambda: second_fake.subscription_count == 1, 30, what="the subscription to come back")
                assert not handle.stopped  # a gap, not an end
                second_fake.emit_reading("M:OUTTMP", 2.0)
                reading = await _next_reading(handle)
                assert (reading.drf, reading.value) == ("M:OUTTMP@p,1000", 2.0)
                await handle.stop()

        _run(body(), timeout=90)
    finally:
        for s in servers:
            s.stop(grace=0)


# -- chained supervisors ---------------------------------------------------------------------


def test_chained_supervisor_reads_through(upstream):
    downstream = SupervisedServer(DAQClientBackend(_target(upstream)), port=0, close_backend=True)
    downstream.start()
    try:
        with grpc.insecure_channel(_target(downstream)) as ch:
            stub = DAQ_pb2_grpc.DAQStub(ch)
            replies = list(stub.Read(DAQ_pb2.ReadingList(drf=["G:AMANDA@I", "M:OUTTMP@I"]), timeout=DEADLINE))
        values = {r.index: r.readings.reading[0].data.scalar for r in replies}
        assert values == {0: pytest.approx(42.0), 1: pytest.approx(72.5)}
    finally:
        downstream.stop(grace=0)


def test_chained_supervisor_streams_through_and_releases(fake, upstream):
    downstream = SupervisedServer(DAQClientBackend(_target(upstream)), port=0, close_backend=True)
    downstream.start()
    try:

        async def body():
            async with grpc.aio.insecure_channel(_target(downstream)) as ch:
                stub = DAQ_pb2_grpc.DAQStub(ch)
                call = stub.Read(DAQ_pb2.ReadingList(drf=["G:AMANDA@p,500", "M:OUTTMP@p,1000"]))
                await until(lambda: fake.subscription_count == 1, DEADLINE, what="the upstream subscription")
                fake.emit_reading("M:OUTTMP", 7.0)
                reply = await asyncio.wait_for(call.read(), DEADLINE)
                call.cancel()
            await until(lambda: fake.subscription_count == 0, DEADLINE, what="the upstream subscription to end")
            return reply

        reply = _run(body())
        assert reply.index == 1 and reply.readings.reading[0].data.scalar == 7.0
    finally:
        downstream.stop(grace=0)


def test_backend_survives_a_new_event_loop(upstream):
    backend = DAQClientBackend(_target(upstream))
    assert _run(backend.read("M:OUTTMP@I")) == pytest.approx(72.5)

    async def second():  # another loop: another channel, opened lazily
        async with backend:
            return await backend.read("G:AMANDA@I")

    assert _run(second()) == pytest.approx(42.0)
