"""The capacity benchmark's one-shot check: a server that answers every call with an error does
not look fast. h2load counts such calls as succeeded (HTTP 200, the error in the trailers); the
benchmark counts the reply bytes instead.
"""

import argparse
import shutil
from concurrent import futures

import grpc
import pytest

from benchmarks.bench_capacity import answered_share, h2load, probe, request_file
from benchmarks.null_server import NullServer

pytestmark = pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load is not installed (nghttp2-client)")

DRFS = ["Z:SIM000@I"]
ARGS = argparse.Namespace(h2_connections=2, h2_streams=4, duration=1.0)


def _failing_server() -> tuple[grpc.Server, int]:
    def read(request: bytes, context):
        context.abort(grpc.StatusCode.UNAVAILABLE, "no backend")
        yield b""  # a generator, as a server-streaming handler is

    server = grpc.server(futures.ThreadPoolExecutor(2))
    handler = grpc.method_handlers_generic_handler(
        "services.daq.DAQ", {"Read": grpc.unary_stream_rpc_method_handler(read)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def test_calls_answered_with_readings_count_and_calls_answered_with_errors_do_not(tmp_path):
    data = request_file(DRFS, tmp_path)
    with NullServer() as null:
        expected = probe(null.port, DRFS)
        good = h2load(null.port, data, ARGS, calls=200)
    assert good["done"] == 200
    assert 0.95 < answered_share(good, expected) < 1.05

    server, port = _failing_server()
    try:
        with pytest.raises(RuntimeError, match="UNAVAILABLE"):
            probe(port, DRFS)
        bad = h2load(port, data, ARGS, calls=200)
    finally:
        server.stop(0)
    assert bad["done"] == 200 and bad["failed"] == 0  # h2load alone sees 200 successes
    assert answered_share(bad, expected) == 0.0
