"""drain_delay: on stop, health turns NOT_SERVING first while calls and streams are still served."""

import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import wait_for

from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2, DAQ_pb2_grpc
from pacsys.supervised import SupervisedServer
from pacsys.testing import FakeBackend

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_not_serving_first_then_serving_for_the_delay_then_the_drain():
    delay = 1.5
    backend = FakeBackend()
    backend.set_reading("M:OUTTMP", 72.0)
    server = SupervisedServer(backend, port=0, host="127.0.0.1", shutdown_grace=1.0, drain_delay=delay)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    health = health_pb2_grpc.HealthStub(channel)
    daq = DAQ_pb2_grpc.DAQStub(channel)
    stream = daq.Read(DAQ_pb2.ReadingList(drf=["M:OUTTMP@p,100"]), timeout=30)
    wait_for(lambda: backend.subscription_count == 1, what="the stream's subscription")
    backend.emit_reading("M:OUTTMP", 1.0)
    assert next(stream).WhichOneof("value") == "readings"
    stopper = threading.Thread(target=server.stop)
    asked = time.monotonic()
    stopper.start()
    try:
        wait_for(lambda: health.Check(health_pb2.HealthCheckRequest(service="readiness")).status == NOT_SERVING)
        # Not serving by health, but a load balancer that has not noticed yet still gets answers.
        replies = list(daq.Read(DAQ_pb2.ReadingList(drf=["M:OUTTMP@I"]), timeout=5))
        assert replies[0].WhichOneof("value") == "readings"
        backend.emit_reading("M:OUTTMP", 2.0)
        assert next(stream).WhichOneof("value") == "readings"  # the open stream carries on
        assert time.monotonic() - asked < delay
        # After the delay the stream ends with UNAVAILABLE, which clients answer by reconnecting.
        try:
            for _ in stream:
                pass
            raise AssertionError("the stream was not ended by the drain")
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
        assert time.monotonic() - asked >= delay
    finally:
        stopper.join(30)
        channel.close()
    assert not stopper.is_alive()
