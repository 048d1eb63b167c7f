"""SupervisedServer with in-process backends: the first acceptance tests and their sync twins.

The Async* classes are the in-process server's first acceptance tests, unchanged. The sync classes run the same
scenarios through the sync FakeBackend (served through the one sync-to-async adapter).
"""

import grpc
import pytest
from helpers import wait_for

from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2, DAQ_pb2_grpc
from pacsys.supervised import ReadOnlyPolicy, SupervisedServer
from pacsys.testing import AsyncFakeBackend, FakeBackend


def _seed_backend(fb):
    fb.set_reading("M:OUTTMP", 72.5)
    fb.set_reading("G:AMANDA", 42.0)


def _make_channel(srv):
    ch = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
    grpc.channel_ready_future(ch).result(timeout=10)
    return ch


# -- the sync FakeBackend ---------------------------------------------------------------


@pytest.fixture(scope="module")
def sync_backend():
    fb = FakeBackend()
    _seed_backend(fb)
    return fb


@pytest.fixture(autouse=True)
def reset_sync_backend(request):
    if "sync_server" in request.fixturenames:
        fb = request.getfixturevalue("sync_backend")
        fb.reset()
        _seed_backend(fb)


@pytest.fixture(scope="module")
def sync_server(sync_backend):
    srv = SupervisedServer(sync_backend, port=0)
    srv.start()
    yield srv
    srv.stop()


class TestOneshotRead:
    def test_single_device(self, sync_server):
        with _make_channel(sync_server) as ch:
            stub = DAQ_pb2_grpc.DAQStub(ch)
            replies = list(stub.Read(DAQ_pb2.ReadingList(drf=["M:OUTTMP@I"]), timeout=5.0))
            assert len(replies) == 1
            assert replies[0].WhichOneof("value") == "readings"
            assert replies[0].readings.reading[0].data.scalar == pytest.approx(72.5)

    def test_multiple_devices_keep_request_order(self, sync_server):
        with _make_channel(sync_server) as ch:
            stub = DAQ_pb2_grpc.DAQStub(ch)
            replies = list(stub.Read(DAQ_pb2.ReadingList(drf=["M:OUTTMP@I", "G:AMANDA@I", "M:OUTTMP@I"]), timeout=5))
            values = {r.index: r.readings.reading[0].data.scalar for r in replies}
            assert values == {0: pytest.approx(72.5), 1: pytest.approx(42.0), 2: pytest.approx(72.5)}

    def test_error_reading(self, sync_backend, sync_server):
        sync_backend.set_error("M:BADDEV", -42, "Device not found")
        with _make_channel(sync_server) as ch:
            stub = DAQ_pb2_grpc.DAQStub(ch)
            replies = list(stub.Read(DAQ_pb2.ReadingList(drf=["M:BADDEV@I"]), timeout=5.0))
            assert replies[0].WhichOneof("value") == "status"
            assert replies[0].status.status_code == -42


class TestSet:
    def test_single_write(self, sync_backend, sync_server):
        with _make_channel(sync_server) as ch:
            stub = DAQ_pb2_grpc.DAQStub(ch)
            request = DAQ_pb2.SettingList()
            setting = request.setting.add()
            setting.device = "M:OUTTMP"
            setting.value.scalar = 80.0
            reply = stub.Set(request, timeout=5.0)
            assert [s.status_code for s in reply.status] == [0]
            assert sync_backend.get_written_value("M:OUTTMP") == pytest.approx(80.0)

    def test_statuses_answer_settings_in_order(self, sync_backend, sync_server):
        sync_backend.set_write_result("G:AMANDA", success=False, error_code=-17, message="no privilege")
        with _make_channel(sync_server) as ch:
            stub = DAQ_pb2_grpc.DAQStub(ch)
            request = DAQ_pb2.SettingList()
            for device in ("M:OUTTMP", "G:AMANDA", "M:OUTTMP"):
                s = request.setting.add()
                s.device = device
                s.value.scalar = 1.0
            reply = stub.Set(request, timeout=5.0)
            assert [s.status_code for s in reply.status] == [0, -17, 0]


class TestStreamingRead:
    def test_streaming_read(self, sync_backend):
        with SupervisedServer(sync_backend, port=0) as srv, _make_channel(srv) as ch:
            stub = DAQ_pb2_grpc.DAQStub(ch)
            request = DAQ_pb2.ReadingList(drf=["M:OUTTMP@p,1000"])
            subscribed = sync_backend.subscription_count
            call = stub.Read(request, timeout=10)
            # Emitted once the stream's subscription exists: none is lost, none waits on a guess.
            wait_for(lambda: sync_backend.subscription_count > subscribed, what="the stream's subscription")
            for i in range(3):
                sync_backend.emit_reading("M:OUTTMP@p,1000", 70.0 + i)
            values = []
            for reply in call:
                values.append(reply.readings.reading[0].data.scalar)
                if len(values) >= 3:
                    break
            call.cancel()
            assert values == [pytest.approx(70.0), pytest.approx(71.0), pytest.approx(72.0)]


class TestPolicyEnforcement:
    def test_set_blocked_with_readonly_policy(self, sync_backend):
        sync_backend.reset()
        _seed_backend(sync_backend)
        with SupervisedServer(sync_backend, port=0, policies=[ReadOnlyPolicy()]) as srv, _make_channel(srv) as ch:
            stub = DAQ_pb2_grpc.DAQStub(ch)
            request = DAQ_pb2.SettingList()
            s = request.setting.add()
            s.device = "M:OUTTMP"
            s.value.scalar = 80.0
            with pytest.raises(grpc.RpcError) as exc_info:
                stub.Set(request, timeout=5.0)
            assert exc_info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert not sync_backend.was_written("M:OUTTMP")
            replies = list(stub.Read(DAQ_pb2.ReadingList(drf=["M:OUTTMP@I"]), timeout=5.0))
            assert len(replies) == 1


# -- the first acceptance tests, unchanged ----------------------------------------------


@pytest.fixture(scope="module")
def async_backend():
    fb = AsyncFakeBackend()
    _seed_backend(fb)
    return fb


@pytest.fixture(autouse=True)
def reset_async_backend(request):
    if "async_server" in request.fixturenames:
        fb = request.getfixturevalue("async_backend")
        fb.reset()
        _seed_backend(fb)


@pytest.fixture(scope="module")
def async_server(async_backend):
    """Start a SupervisedServer with AsyncFakeBackend on an OS-assigned port."""
    srv = SupervisedServer(async_backend, port=0)
    srv.start()
    yield srv
    srv.stop()


class TestAsyncOneshotRead:
    def test_single_device(self, async_server):
        with _make_channel(async_server) as ch:
            stub = DAQ_pb2_grpc.DAQStub(ch)
            request = DAQ_pb2.ReadingList()
            request.drf.append("M:OUTTMP@I")

            replies = list(stub.Read(request, timeout=5.0))
            assert len(replies) == 1
            reply = replies[0]
            assert reply.WhichOneof("value") == "readings"
            reading = reply.readings.reading[0]
            assert reading.data.scalar == pytest.approx(72.5)

    def test_multiple_devices(self, async_server):
        with _make_channel(async_server) as ch:
            stub = DAQ_pb2_grpc.DAQStub(ch)
            request = DAQ_pb2.ReadingList()
            request.drf.append("M:OUTTMP@I")
            request.drf.append("G:AMANDA@I")

            replies = list(stub.Read(request, timeout=5.0))
            assert len(replies) == 2
            values = {}
            for r in replies:
                rd = r.readings.reading[0]
                values[r.index] = rd.data.scalar
            assert values[0] == pytest.approx(72.5)
            assert values[1] == pytest.approx(42.0)

    def test_error_reading(self, async_backend, async_server):
        async_backend.set_error("M:BADDEV", -42, "Device not found")
        with _make_channel(async_server) as ch:
            stub = DAQ_pb2_grpc.DAQStub(ch)
            request = DAQ_pb2.ReadingList()
            request.drf.append("M:BADDEV@I")

            replies = list(stub.Read(request, timeout=5.0))
            assert len(replies) == 1
            reply = replies[0]
            assert reply.WhichOneof("value") == "status"
            assert reply.status.status_code == -42


class TestAsyncSet:
    def test_single_write(self, async_backend, async_server):
        with _make_channel(async_server) as ch:
            stub = DAQ_pb2_grpc.DAQStub(ch)
            request = DAQ_pb2.SettingList()
            setting = DAQ_pb2.Setting()
            setting.device = "M:OUTTMP"
            setting.value.scalar = 80.0
            request.setting.append(setting)

            reply = stub.Set(request, timeout=5.0)
            assert len(reply.status) == 1
            assert reply.status[0].status_code == 0
            assert async_backend.was_written("M:OUTTMP")


class TestAsyncStreamingRead:
    def test_streaming_read(self, async_backend):
        with SupervisedServer(async_backend, port=0) as srv:
            with _make_channel(srv) as ch:
                stub = DAQ_pb2_grpc.DAQStub(ch)
                request = DAQ_pb2.ReadingList()
                request.drf.append("M:OUTTMP@p,1000")

                subscribed = async_backend.subscription_count
                call = stub.Read(request, timeout=10.0)
                # Emitted once the stream's subscription exists (the plan's version slept 0.3 s first).
                wait_for(lambda: async_backend.subscription_count > subscribed, what="the stream's subscription")
                for i in range(3):
                    async_backend.emit_reading("M:OUTTMP@p,1000", 70.0 + i)

                replies = []
                for reply in call:
                    replies.append(reply)
                    if len(replies) >= 3:
                        break
                call.cancel()

                assert len(replies) == 3
                values = [r.readings.reading[0].data.scalar for r in replies]
                assert values == [pytest.approx(70.0), pytest.approx(71.0), pytest.approx(72.0)]


@pytest.fixture(scope="module")
def async_policy_backend():
    fb = AsyncFakeBackend()
    _seed_backend(fb)
    return fb


@pytest.fixture(autouse=True)
def reset_async_policy_backend(request):
    if "async_server_with_policy" in request.fixturenames:
        fb = request.getfixturevalue("async_policy_backend")
        fb.reset()
        _seed_backend(fb)


@pytest.fixture(scope="module")
def async_server_with_policy(async_policy_backend):
    srv = SupervisedServer(async_policy_backend, port=0, policies=[ReadOnlyPolicy()])
    srv.start()
    yield srv
    srv.stop()


class TestAsyncPolicyEnforcement:
    def test_read_allowed_with_readonly_policy(self, async_server_with_policy):
        with _make_channel(async_server_with_policy) as ch:
            stub = DAQ_pb2_grpc.DAQStub(ch)
            request = DAQ_pb2.ReadingList()
            request.drf.append("M:OUTTMP@I")
            replies = list(stub.Read(request, timeout=5.0))
            assert len(replies) == 1

    def test_set_blocked_with_readonly_policy(self, async_server_with_policy):
        with _make_channel(async_server_with_policy) as ch:
            stub = DAQ_pb2_grpc.DAQStub(ch)
            request = DAQ_pb2.SettingList()
            setting = DAQ_pb2.Setting()
            setting.device = "M:OUTTMP"
            setting.value.scalar = 80.0
            request.setting.append(setting)
            with pytest.raises(grpc.RpcError) as exc_info:
                stub.Set(request, timeout=5.0)
            assert exc_info.value.code() == grpc.StatusCode.PERMISSION_DENIED


# -- several accept loops on the one port ---------------------------------------------------


def test_accept_loops_share_the_port_and_another_server_is_still_refused_it():
    fb = FakeBackend()
    _seed_backend(fb)
    with pytest.raises(ValueError, match="accept_loops"):
        SupervisedServer(fb, port=0, accept_loops=0)
    with SupervisedServer(fb, port=0, host="127.0.0.1", accept_loops=4) as srv:
        # Eight connections, spread by the kernel over the four servers: every one answered.
        for _ in range(8):
            options = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own
            with grpc.insecure_channel(f"127.0.0.1:{srv.port}", options=options) as ch:
                stub = DAQ_pb2_grpc.DAQStub(ch)
                (reply,) = stub.Read(DAQ_pb2.ReadingList(drf=["M:OUTTMP@I"]), timeout=5)
                assert reply.readings.reading[0].data.scalar == pytest.approx(72.5)
        # Its sockets share the port among themselves only: a second server is refused it.
        second = SupervisedServer(fb, port=srv.port, host="127.0.0.1", accept_loops=4)
        with pytest.raises(OSError, match=f"port {srv.port} is in use"):
            second.start()


def test_max_connections_holds_over_the_accept_loops():
    """gRPC caps connections per server: the cap is split between the accept loops (fewer of
    them when it is small), so the port as a whole holds no more than max_connections."""
    import socket
    import time

    from pacsys.supervised import TransportLimits

    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + empty SETTINGS
    limits = TransportLimits(max_connections=128, connections_per_address_exempt=("127.0.0.0/8",))
    with SupervisedServer(FakeBackend(), port=0, host="127.0.0.1", transport=limits, accept_loops=8) as srv:
        assert srv.accept_loops_serving == 2  # 64 connections at least per loop
        clients = [socket.create_connection(("127.0.0.1", srv.port), timeout=5) for _ in range(200)]
        try:
            for client in clients:
                client.sendall(preface)
                client.setblocking(False)
            closed: set[int] = set()

            def read_all() -> int:
                for i, client in enumerate(clients):
                    while i not in closed:
                        try:
                            if not client.recv(65536):
                                closed.add(i)
                        except BlockingIOError:
                            break
                        except OSError:
                            closed.add(i)
                return len(clients) - len(closed)

            wait_for(lambda: read_all() <= 128, timeout=20)
            time.sleep(0.5)  # what stays open stays open
            assert 100 <= read_all() <= 128
        finally:
            for client in clients:
                client.close()
