"""The DAQ wire contract (docs/wire.md) checked against the generated modules.

Existing DAQ clients depend on exact names, numbers and types, so the expected table below is
transcribed from the contract by hand rather than derived from the .proto files it is checking.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.timestamp_pb2 import Timestamp

from pacsys._proto.controls.common.v1 import device_pb2, status_pb2
from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2, DAQ_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
GENERATED = REPO / "pacsys" / "_proto" / "controls"

# modifiers: "" plain, "repeated", or "oneof:<name>"; types: scalar name, message full name, map<k,v>
MESSAGES: dict[str, dict[str, tuple[int, str, str]]] = {
    "common.status.Status": {
        "facility_code": (1, "int32", ""),
        "status_code": (2, "int32", ""),
        "message": (3, "string", ""),
    },
    "common.device.Value": {
        "scalar": (1, "double", "oneof:value"),
        "scalarArr": (2, "common.device.Value.ScalarArray", "oneof:value"),
        "raw": (3, "bytes", "oneof:value"),
        "text": (4, "string", "oneof:value"),
        "textArr": (5, "common.device.Value.TextArray", "oneof:value"),
        "anaAlarm": (6, "common.device.Value.AnalogAlarm", "oneof:value"),
        "digAlarm": (7, "common.device.Value.DigitalAlarm", "oneof:value"),
        "basicStatus": (8, "common.device.Value.BasicStatus", "oneof:value"),
    },
    "common.device.Value.ScalarArray": {"value": (1, "double", "repeated")},
    "common.device.Value.TextArray": {"value": (1, "string", "repeated")},
    "common.device.Value.AnalogAlarm": {
        "minimum": (1, "double", ""),
        "maximum": (2, "double", ""),
        "alarmEnable": (3, "bool", ""),
        "alarmStatus": (4, "bool", ""),
        "abort": (5, "bool", ""),
        "abortInhibit": (6, "bool", ""),
        "triesNeeded": (7, "uint32", ""),
        "triesNow": (8, "uint32", ""),
    },
    "common.device.Value.DigitalAlarm": {
        "nominal": (1, "int32", ""),
        "mask": (2, "uint32", ""),
        "alarmEnable": (3, "bool", ""),
        "alarmStatus": (4, "bool", ""),
        "abort": (5, "bool", ""),
        "abortInhibit": (6, "bool", ""),
        "triesNeeded": (7, "uint32", ""),
        "triesNow": (8, "uint32", ""),
    },
    "common.device.Value.BasicStatus": {"value": (1, "map<string,string>", "repeated")},
    "services.daq.ReadingList": {"drf": (1, "string", "repeated")},
    "services.daq.Reading": {
        "timestamp": (1, "google.protobuf.Timestamp", ""),
        "data": (2, "common.device.Value", ""),
        "status": (3, "common.status.Status", ""),
    },
    "services.daq.Readings": {"reading": (2, "services.daq.Reading", "repeated")},
    "services.daq.ReadingReply": {
        "index": (1, "uint32", ""),
        "readings": (2, "services.daq.Readings", "oneof:value"),
        "status": (3, "common.status.Status", "oneof:value"),
    },
    "services.daq.Setting": {
        "device": (1, "string", ""),
        "value": (2, "common.device.Value", ""),
    },
    "services.daq.SettingList": {"setting": (1, "services.daq.Setting", "repeated")},
    "services.daq.SettingReply": {"status": (2, "common.status.Status", "repeated")},
}

FILES = {
    status_pb2: ("controls/common/v1/status.proto", "common.status"),
    device_pb2: ("controls/common/v1/device.proto", "common.device"),
    DAQ_pb2: ("controls/service/DAQ/v1/DAQ.proto", "services.daq"),
}

_TYPE_NAMES = {
    getattr(FieldDescriptor, name): name.removeprefix("TYPE_").lower()
    for name in dir(FieldDescriptor)
    if name.startswith("TYPE_")
}


def _all_messages(descs):
    for d in descs:
        if not d.GetOptions().map_entry:  # map entries are covered by the map<k,v> type string
            yield d
            yield from _all_messages(d.nested_types)


ALL = {d.full_name: d for mod in FILES for d in _all_messages(mod.DESCRIPTOR.message_types_by_name.values())}


def _describe(field: FieldDescriptor) -> tuple[int, str, str]:
    if field.message_type is None:
        type_name = _TYPE_NAMES[field.type]
    elif field.message_type.GetOptions().map_entry:
        key, value = (field.message_type.fields_by_name[n] for n in ("key", "value"))
        type_name = f"map<{_describe(key)[1]},{_describe(value)[1]}>"
    else:
        type_name = field.message_type.full_name
    if field.containing_oneof is not None:
        modifier = f"oneof:{field.containing_oneof.name}"
    else:
        modifier = "repeated" if field.is_repeated else ""
    return field.number, type_name, modifier


def test_files_and_packages():
    for mod, (name, package) in FILES.items():
        proto = descriptor_pb2.FileDescriptorProto()
        mod.DESCRIPTOR.CopyToProto(proto)  # syntax is only exposed on the proto form
        assert (proto.name, proto.package, proto.syntax) == (name, package, "proto3")


def test_no_unlisted_messages():
    assert set(ALL) == set(MESSAGES)


@pytest.mark.parametrize("full_name", sorted(MESSAGES))
def test_message_fields(full_name):
    actual = {f.name: _describe(f) for f in ALL[full_name].fields}
    assert actual == MESSAGES[full_name]


def test_reading_status_is_deprecated_and_nothing_else_is():
    deprecated = {f.full_name for d in ALL.values() for f in d.fields if f.GetOptions().deprecated}
    assert deprecated == {"services.daq.Reading.status"}


def test_service():
    service = DAQ_pb2.DESCRIPTOR.services_by_name["DAQ"]
    assert service.full_name == "services.daq.DAQ"
    methods = {
        m.name: (m.input_type.full_name, m.output_type.full_name, m.client_streaming, m.server_streaming)
        for m in service.methods
    }
    assert methods == {
        "Read": ("services.daq.ReadingList", "services.daq.ReadingReply", False, True),
        "Set": ("services.daq.SettingList", "services.daq.SettingReply", False, False),
    }


def test_grpc_stub_paths():
    """The generated stub must call the method paths existing servers serve."""
    calls = {}

    class Channel:
        def __getattr__(self, kind):
            def register(path, **_):
                calls[path] = kind

            return register

    DAQ_pb2_grpc.DAQStub(Channel())
    assert calls == {"/services.daq.DAQ/Read": "unary_stream", "/services.daq.DAQ/Set": "unary_unary"}


def _status(code=-26):
    return status_pb2.Status(facility_code=17, status_code=code, message="no such device")


Value = device_pb2.Value
SAMPLES = {
    "common.status.Status": _status(),
    "common.device.Value": Value(scalar=72.5),
    "common.device.Value.ScalarArray": Value.ScalarArray(value=[1.0, -2.5]),
    "common.device.Value.TextArray": Value.TextArray(value=["a", "b"]),
    "common.device.Value.AnalogAlarm": Value.AnalogAlarm(
        minimum=-1,
        maximum=1,
        alarmEnable=True,
        alarmStatus=True,
        abort=True,
        abortInhibit=True,
        triesNeeded=3,
        triesNow=2,
    ),
    "common.device.Value.DigitalAlarm": Value.DigitalAlarm(
        nominal=-5,
        mask=0xFF,
        alarmEnable=True,
        alarmStatus=True,
        abort=True,
        abortInhibit=True,
        triesNeeded=3,
        triesNow=2,
    ),
    "common.device.Value.BasicStatus": Value.BasicStatus(value={"on": "True", "ready": "False"}),
    "services.daq.ReadingList": DAQ_pb2.ReadingList(drf=["M:OUTTMP@I", "G:AMANDA"]),
    "services.daq.Reading": DAQ_pb2.Reading(
        timestamp=Timestamp(seconds=1_700_000_000, nanos=5), data=Value(text="x"), status=_status(0)
    ),
    "services.daq.Readings": DAQ_pb2.Readings(reading=[DAQ_pb2.Reading(data=Value(raw=b"\x00\x01"))]),
    "services.daq.ReadingReply": DAQ_pb2.ReadingReply(index=3, status=_status()),
    "services.daq.Setting": DAQ_pb2.Setting(device="Z:ACLTST", value=Value(scalarArr=Value.ScalarArray(value=[1]))),
    "services.daq.SettingList": DAQ_pb2.SettingList(
        setting=[DAQ_pb2.Setting(device="Z:ACLTST", value=Value(scalar=1))]
    ),
    "services.daq.SettingReply": DAQ_pb2.SettingReply(status=[_status(0), _status()]),
}
# Each oneof branch as well, since a client may send any of them.
EXTRA_SAMPLES = [
    Value(textArr=Value.TextArray(value=["t"])),
    Value(anaAlarm=Value.AnalogAlarm(maximum=2)),
    Value(digAlarm=Value.DigitalAlarm(mask=1)),
    Value(basicStatus=Value.BasicStatus(value={"remote": "True"})),
    DAQ_pb2.ReadingReply(index=0, readings=DAQ_pb2.Readings(reading=[DAQ_pb2.Reading(data=Value(scalar=1))])),
]


def test_samples_cover_every_message():
    assert set(SAMPLES) == set(MESSAGES)


@pytest.mark.parametrize("msg", [*SAMPLES.values(), *EXTRA_SAMPLES], ids=lambda m: m.DESCRIPTOR.name)
def test_round_trip(msg):
    data = msg.SerializeToString(deterministic=True)
    assert data  # every sample sets something, so an empty encoding means a lost field
    assert type(msg).FromString(data) == msg


def _generator_versions(root: Path) -> set[str]:
    """protoc and grpc plugin versions recorded in the generated files under root."""
    pattern = re.compile(r"^# Protobuf Python Version: (\S+)$|^GRPC_GENERATED_VERSION = '(\S+)'$", re.M)
    return {"".join(m.groups("")) for p in root.rglob("*.py") for m in pattern.finditer(p.read_text())}


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.suffix in (".py", ".pyi")}


@pytest.mark.skipif(importlib.util.find_spec("grpc_tools") is None, reason="grpcio-tools not installed")
def test_committed_modules_match_proto(tmp_path):
    subprocess.run([sys.executable, "-m", "pacsys._proto.regen", str(tmp_path)], cwd=REPO, check=True)
    fresh, committed = _tree(tmp_path / "controls"), _tree(GENERATED)
    if _generator_versions(tmp_path) != _generator_versions(GENERATED):
        # A different grpcio-tools emits different version stamps; that is not drift from proto/.
        pytest.skip(
            f"installed grpcio-tools generates {sorted(_generator_versions(tmp_path))}, committed code is "
            f"{sorted(_generator_versions(GENERATED))}; install the matching grpcio-tools to check drift"
        )
    assert sorted(fresh) == sorted(committed), "generated file set differs: run python -m pacsys._proto.regen"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"{stale} differ from proto/: run python -m pacsys._proto.regen"
