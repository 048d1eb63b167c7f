"""`pacsys-supervisor explain`: which policy decides a request and why, without a server."""

import subprocess

import grpc
import pytest

from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2, DAQ_pb2_grpc
from pacsys.backends.sim import SimBackend
from pacsys.settings import load_config
from pacsys.supervised import SupervisedServer, write_gate
from pacsys.supervised.cli import main
from pacsys.supervised.policy_config import build_policies


@pytest.fixture
def run_cli(capsys):
    """The command in this process (it starts no server): exit status, stdout and stderr."""

    def run(*args):
        code = main(list(args))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    return run


CONFIG = """\
allow_writes = ["Z:ACLTST"]

[[policies]]
type = "write_grant"
identities = ["CN=ops-*"]
patterns = ["M:*"]

[[policies]]
type = "value_range"
limits = { "M:OUTTMP" = [40.0, 105.0] }
"""


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "supervisor.toml"
    path.write_text(CONFIG)
    return str(path)


def test_a_granted_identity_is_allowed_step_by_step(run_cli, config):
    done = run_cli("explain", "--config", config, "--identity", "CN=ops-1,O=Lab", "--method", "Set", "M:OUTTMP=70")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "Set M:OUTTMP=70 from CN=ops-1,O=Lab"
    assert "1. WriteGrantPolicy: approved M:OUTTMP" in lines
    assert lines[-1] == "ALLOWED"


def test_another_identity_is_denied_by_the_approval_rule(run_cli, config):
    done = run_cli("explain", "--config", config, "--identity", "ipv4:10.0.0.5", "--method", "Set", "M:OUTTMP=70")
    assert done.returncode == 1
    assert "approval: DENIED: Device M:OUTTMP not approved for Set" in done.stdout


def test_the_policy_that_denies_is_named_with_its_reason(run_cli, config):
    done = run_cli("explain", "--config", config, "--identity", "CN=ops-1", "--method", "Set", "M:OUTTMP=200")
    assert done.returncode == 1
    assert "2. ValueRangePolicy: DENIED: Value 200.0 for M:OUTTMP outside [40.0, 105.0]" in done.stdout


def test_door_refusals_are_explained_too(run_cli, config):
    done = run_cli("explain", "--config", config, "--method", "Read", "M:OUTTMP@p,0")
    assert done.returncode == 1 and "refused at the door: INVALID_ARGUMENT" in done.stdout
    many = [f"Z:SIM{i:03d}@p,1" for i in range(10)]
    done = run_cli("explain", "--config", config, *many)  # --method Read is the default for DRFs
    assert done.returncode == 1 and "refused: RESOURCE_EXHAUSTED (limit): this stream would ask" in done.stdout


def test_a_setting_without_a_value_is_a_usage_error(run_cli, config):
    done = run_cli("explain", "--config", config, "--method", "Set", "M:OUTTMP")
    assert done.returncode == 2 and "every setting is DEVICE=VALUE; no value in 'M:OUTTMP'" in done.stderr
    done = run_cli("explain", "--config", config, "Z:ACLTST=1", "M:OUTTMP@I")
    assert done.returncode == 2 and "is a setting" in done.stderr


def test_settings_alone_mean_set(run_cli, config):
    done = run_cli("explain", "--config", config, "--identity", "CN=ops-1", "M:OUTTMP=70")
    assert done.returncode == 0 and done.stdout.startswith("Set M:OUTTMP=70 from CN=ops-1")


AGREEMENT_CONFIG = """\
allow_writes = ["Z:ACLTST"]
max_drfs_per_request = 5

[[policies]]
type = "device_access"
patterns = ["E:*"]
mode = "deny"

[[policies]]
type = "value_range"
limits = { "Z:ACLTST" = [-10.0, 10.0] }
"""

# (method, the request's DRFs or DEVICE=VALUE settings): every kind of verdict the server gives.
AGREEMENT_CASES = [
    ("Read", ["M:OUTTMP@I", "G:AMANDA@I"]),
    ("Read", ["M:OUTTMP@p,0"]),  # the shortest period (max_rate_hz): limit
    ("Read", ["M:OUTTMP@@I"]),  # does not parse: invalid
    ("Read", ["M:" + "X" * 600 + "@I"]),  # max_drf_length
    ("Read", [f"Z:SIM{i:03d}@I" for i in range(6)]),  # max_drfs_per_request
    ("Read", [f"Z:SIM{i:03d}@p,1" for i in range(10)]),  # max_stream_rate, after the policies
    ("Read", ["E:SECRET@I"]),  # device_access: denied
    ("Set", ["Z:ACLTST=5"]),
    ("Set", ["Z:ACLTST=50"]),  # value_range
    ("Set", ["M:OUTTMP=70"]),  # not granted: the approval rule
    ("Set", ["Z:ACLTST=1", "E:SECRET=1"]),
    ("Set", ["Z:ACLTST@@=1"]),  # a setting that does not parse
]


def test_explain_and_the_server_agree_on_every_case_wording_included(run_cli, tmp_path):
    """Each case through a real server (a gRPC client on loopback) and through explain with the same
    file: the same verdict, the same status, decision label and details."""
    from pacsys.supervised.gate import ServicerLimits
    from pacsys.testing import FakeBackend

    path = tmp_path / "supervisor.toml"
    path.write_text(AGREEMENT_CONFIG)
    settings = load_config(str(path))
    limits = ServicerLimits.from_settings(settings)
    server = SupervisedServer(
        FakeBackend(), port=0, host="127.0.0.1", policies=write_gate(settings, build_policies(settings)), limits=limits
    )
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = DAQ_pb2_grpc.DAQStub(channel)
            for method, requests in AGREEMENT_CASES:
                counted = dict(server.servicer.stats.requests)
                try:
                    if method == "Read":
                        list(stub.Read(DAQ_pb2.ReadingList(drf=requests), timeout=10))
                    else:
                        settings_sent = DAQ_pb2.SettingList()
                        for text in requests:
                            device, _, value = text.partition("=")
                            settings_sent.setting.add(device=device).value.scalar = float(value)
                        stub.Set(settings_sent, timeout=10)
                    server_says = "ALLOWED"
                except grpc.RpcError as exc:
                    (label,) = [k[1] for k, n in server.servicer.stats.requests.items() if n != counted.get(k, 0)]
                    server_says = f"{exc.code().name} ({label}): {exc.details()}"
                done = run_cli(
                    "explain", "--config", str(path), "--identity", "ipv4:127.0.0.1", "--method", method, *requests
                )
                last = done.stdout.splitlines()[-1]
                assert done.returncode == (0 if server_says == "ALLOWED" else 1), (requests, done.stdout)
                assert last == server_says or last.split(": ", 1)[1] == server_says, (requests, server_says, last)
    finally:
        server.stop()


def test_a_bad_config_exits_2_with_a_message(run_cli, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("x = " + "[" * 500 + "]" * 500 + "\n")
    done = run_cli("explain", "--config", str(path), "--method", "Read", "M:OUTTMP@I")
    assert done.returncode == 2 and "nested too deeply" in done.stderr and "Traceback" not in done.stderr


PROTECTED = """\
allow_writes = ["Z:*"]

[[policies]]
type = "value_range"
limits = { "Z:ACLTST" = [-10.0, 10.0] }

[[policies]]
type = "slew_rate"
limits = { "Z:ACLTST" = { max_step = 3.0 } }
"""


@pytest.fixture
def protected(tmp_path):
    path = tmp_path / "protected.toml"
    path.write_text(PROTECTED)
    return str(path)


def test_a_slew_limit_says_what_it_cannot_judge_without_the_device(run_cli, protected):
    done = run_cli("explain", "--config", protected, "--method", "Set", "Z:ACLTST=9", "Z:ACLTST.SETTING=-9")
    assert done.returncode == 0, done.stdout
    assert (
        "2. SlewRatePolicy: allowed, no change; not judged here: what it judges from the current value of "
        "Z:ACLTST.SETTING (not read)"
    ) in done.stdout.splitlines()


@pytest.mark.parametrize(
    "setting",
    [
        ("Z:ACLTST[7]", 7.0),  # the request starts so
        ("Z:ACLTST.SETTING{0:8}", 7.0),
        ("Z:ACLTST.SETTING.RAW", 7.0),
        ("Z:ACLTST", "seven"),
        ("Z:ACLTST", 50.0),
        ("Z:ACLTST", float("nan")),
        ("Z|ACLTST", "RESET"),  # another property: outside both limits
    ],
)
def test_explain_and_the_server_agree_on_what_needs_no_device(run_cli, protected, setting):
    drf, value = setting
    done = run_cli("explain", "--config", protected, "--method", "Set", f"{drf}={value}")
    settings = load_config(protected)
    request = DAQ_pb2.SettingList()
    s = request.setting.add()
    s.device = drf
    if isinstance(value, str):
        s.value.text = value
    else:
        s.value.scalar = value
    chain = write_gate(settings, build_policies(settings))
    with SupervisedServer(SimBackend(), port=0, host="127.0.0.1", policies=chain) as srv:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
            try:
                DAQ_pb2_grpc.DAQStub(channel).Set(request, timeout=10)
                served = None
            except grpc.RpcError as exc:
                assert exc.code() is grpc.StatusCode.PERMISSION_DENIED
                served = exc.details()
    if served is None:
        assert done.returncode == 0, done.stdout
    else:
        assert done.returncode == 1 and done.stdout.splitlines()[-1] == f"refused: PERMISSION_DENIED (denied): {served}"
