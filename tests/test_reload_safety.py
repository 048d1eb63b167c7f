"""Finding 4: a config file can make a reload fail, never end the process."""

import signal
import sys

import grpc
import pytest
from processes import FAKE, Supervisor, run_cli, set_scalar

from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2_grpc
from pacsys.settings import ConfigError, settings_from
from pacsys.supervised.policy_config import build_policies

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

NESTED = "x = " + "[" * 500 + "]" * 500 + "\n"


@pytest.fixture
def supervisor():
    started = []

    def start(*args):
        sup = Supervisor(*args)
        started.append(sup)
        sup.wait_serving()
        return sup

    yield start
    for sup in started:
        sup.kill()


def test_a_reload_of_a_file_nested_500_deep_keeps_serving(supervisor, tmp_path):
    config = tmp_path / "supervisor.toml"
    config.write_text('allow_writes = ["M:*"]\n')
    sup = supervisor(*FAKE, "--host", "127.0.0.1", "--config", str(config))
    config.write_text(NESTED)
    mark = sup.mark()
    sup.proc.send_signal(signal.SIGHUP)
    failed = sup.wait_line("stderr", r"level=ERROR .*event=config_reload_failed ", start=mark)
    assert "nested too deeply" in failed.string
    assert sup.proc.poll() is None
    with grpc.insecure_channel(f"127.0.0.1:{sup.port}") as channel:
        assert set_scalar(DAQ_pb2_grpc.DAQStub(channel), "M:OUTTMP", 70.0) == grpc.StatusCode.OK
    assert "Traceback" not in sup.output()


def test_check_config_of_a_file_nested_500_deep_exits_2_with_a_message(tmp_path):
    config = tmp_path / "supervisor.toml"
    config.write_text(NESTED)
    done = run_cli("check-config", str(config))
    assert done.returncode == 2
    assert "nested too deeply" in done.stderr and "Traceback" not in done.stderr


def test_a_custom_factory_does_not_run_before_the_rest_of_the_file_validates(tmp_path, monkeypatch):
    marker = tmp_path / "factory-ran"
    (tmp_path / "site_policy.py").write_text(
        "import pathlib\n"
        "from pacsys.supervised import ReadOnlyPolicy\n"
        f"def make():\n    pathlib.Path({str(marker)!r}).write_text('ran')\n    return ReadOnlyPolicy()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    policies = [
        {"type": "custom", "factory": "site_policy:make"},
        {"type": "rate_limit", "max_requests": "many"},
    ]
    with pytest.raises(ConfigError, match=r"policies\[1\]"):
        build_policies(settings_from({"policies": policies}, {}))
    assert not marker.exists()
    build_policies(settings_from({"policies": policies[:1]}, {}))
    assert marker.exists()  # and it does run for a valid file
