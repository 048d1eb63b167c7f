"""One error vocabulary: a backend's exception is answered with the same gRPC status in
process, through a worker pool, and becomes the same exception again in a chained client."""

import asyncio

import grpc
import pytest
from fault_backends import Raising

from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2, DAQ_pb2_grpc
from pacsys.backends.grpc_client import DAQClientBackend
from pacsys.errors import (
    ERROR_KINDS,
    BackendUnavailable,
    ReadError,
    exception_for_code,
    exception_for_kind,
    grpc_status_of,
)
from pacsys.supervised import SupervisedServer


def test_every_row_names_a_grpc_code_and_maps_both_ways():
    for kind in ERROR_KINDS:
        assert kind.code in grpc.StatusCode.__members__
        error = kind.exception("why")
        assert grpc_status_of(error) == (kind.code, "why")
        assert type(exception_for_code(kind.code, "m", ReadError)) is kind.exception
        assert type(exception_for_kind(kind.exception.__name__, "m")) is kind.exception
    assert grpc_status_of(RuntimeError("x")) == ("INTERNAL", "internal error: RuntimeError: x")
    assert grpc_status_of(TimeoutError()) == ("DEADLINE_EXCEEDED", "backend timed out")
    assert type(exception_for_code("CANCELLED", "m", ReadError)) is BackendUnavailable
    assert type(exception_for_code("DATA_LOSS", "m", ReadError)) is ReadError
    assert type(exception_for_kind("DRFError", "m")) is ValueError
    assert type(exception_for_kind("KeyError", "m")) is RuntimeError


def _codes(port):
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = DAQ_pb2_grpc.DAQStub(channel)
        codes = {}
        for device in Raising.ERRORS:
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Read(DAQ_pb2.ReadingList(drf=[f"{device}@I"]), timeout=10))
            codes[device] = info.value.code().name
        return codes


def test_in_process_pool_and_chained_client_agree(running):
    expected = {device: grpc_status_of(error)[0] for device, error in Raising.ERRORS.items()}
    assert expected["Z:DRFERR"] == "INVALID_ARGUMENT" and expected["Z:BUG"] == "INTERNAL"
    with SupervisedServer(Raising(), port=0, host="127.0.0.1") as in_process:
        assert _codes(in_process.port) == expected
    pooled = running(backend="fault_backends:raising", workers=1)
    assert _codes(pooled.server.port) == expected

    async def chained():
        got = {}
        async with DAQClientBackend(f"127.0.0.1:{pooled.server.port}", default_timeout=10) as client:
            for device in Raising.ERRORS:
                try:
                    await client.get_many([f"{device}@I"])
                except Exception as exc:
                    got[device] = type(exc)
        return got

    got = asyncio.run(chained())
    for device in Raising.ERRORS:
        if expected[device] == "INTERNAL":
            assert got[device] is ReadError  # INTERNAL upstream: a failed read here
        else:
            assert got[device] is type(exception_for_code(expected[device], "", ReadError)), device


def test_the_worker_runtimes_status_codes_are_pacsys_status():
    from pacsys import status
    from workers import reply_body

    assert (reply_body.DPM, reply_body.DPM_INTERNAL) == (status.DPM, status.DPM_INTERNAL)
