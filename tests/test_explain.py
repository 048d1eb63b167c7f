"""`pacsys-supervisor explain`: which policy decides a request and why, without a server."""

import subprocess

import grpc
import pytest

from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2, DAQ_pb2_grpc
from pacsys.backends.sim import SimBackend
from pacsys.supervised import SupervisedServer, write_gate
from pacsys.supervised.cli import main
from pacsys.supervised.config import load_config
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
    done = run_cli("explain", "--config", config, "--method", "Read", *many)
    assert done.returncode == 1 and "max_stream_rate" in done.stdout


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
        assert done.returncode == 1 and f"DENIED: {served} -> PERMISSION_DENIED" in done.stdout
