"""The pacsys-supervisor command as a real process: serving, write gate, probe, signals, errors.

Every process started here is killed in a fixture's teardown (tests/processes.py). Nothing
waits by sleeping: the tests read the serving line and the log lines the process writes.
"""

import io
import json
import logging
import os
import re
import shutil
import signal
import sys
import urllib.request

import grpc
import pytest
from processes import FAKE, SERVING, free_port, read_scalar, run_cli, set_scalar

from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2
from pacsys.settings import FIELDS, flag_name
from pacsys.supervised.cli import main, serve_parser
from pacsys.supervised.service import SIGNALS, Service
from workers.logformat import configure_logging

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


# -- serving ------------------------------------------------------------------------------------------------


def test_serves_reads_and_denies_writes_by_default(supervisor, daq):
    sup = supervisor(*FAKE)
    host, _, detail = SERVING.match(sup.lines["stdout"][0]).groups()  # type: ignore[union-attr]
    assert host == "[::]" and detail == "backend fake, in process"
    stub = daq(sup.port)
    assert read_scalar(stub, "M:OUTTMP@I") == pytest.approx(72.5)
    assert set_scalar(stub, "M:OUTTMP", 70.0) == grpc.StatusCode.PERMISSION_DENIED


def test_allow_writes_grants_matching_devices_only(supervisor, daq):
    sup = supervisor(*FAKE, "--allow-writes", "M:*")
    stub = daq(sup.port)
    assert set_scalar(stub, "M:OUTTMP", 70.0) == grpc.StatusCode.OK
    assert read_scalar(stub, "M:OUTTMP@I") == pytest.approx(70.0)
    assert set_scalar(stub, "G:AMANDA", 1.0) == grpc.StatusCode.PERMISSION_DENIED


def test_probe_then_sigterm_exits_0(supervisor):
    sup = supervisor(*FAKE)
    probe = run_cli("probe", "--addr", f"127.0.0.1:{sup.port}")
    assert probe.returncode == 0, probe
    assert probe.stdout.strip() == f"127.0.0.1:{sup.port}: SERVING"
    probe = run_cli("probe", "--addr", f"127.0.0.1:{sup.port}", "--service", "services.daq.DAQ")
    assert probe.returncode == 0, probe
    sup.proc.send_signal(signal.SIGTERM)
    assert sup.wait_exit(15) == 0
    assert "Traceback" not in sup.output()


def test_sigint_exits_0(supervisor):
    sup = supervisor(*FAKE)
    sup.proc.send_signal(signal.SIGINT)
    assert sup.wait_exit(15) == 0


def test_probe_of_a_closed_port_exits_2():
    port = free_port()
    probe = run_cli("probe", "--addr", f"127.0.0.1:{port}", "--timeout", "5")
    assert probe.returncode == 2, probe
    assert probe.stdout.startswith(f"127.0.0.1:{port}: unreachable")


def test_probe_of_an_unknown_service_exits_1(supervisor):
    sup = supervisor(*FAKE)
    probe = run_cli("probe", "--addr", f"127.0.0.1:{sup.port}", "--service", "no.such.Service")
    assert probe.returncode == 1, probe
    assert "NOT_SERVING" in probe.stdout


def test_metrics_port(supervisor, daq):
    sup = supervisor(*FAKE, "--metrics-port", "0")
    detail = SERVING.match(sup.lines["stdout"][0]).group(3)  # type: ignore[union-attr]
    metrics_port = int(re.search(r"metrics on port (\d+)", detail).group(1))  # type: ignore[union-attr]
    assert read_scalar(daq(sup.port), "M:OUTTMP@I") == pytest.approx(72.5)
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/readyz", timeout=10) as reply:
        assert reply.status == 200
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
        assert "pacsys_requests" in reply.read().decode()


# -- SIGHUP -------------------------------------------------------------------------------------------------


def test_sighup_with_a_broken_file_keeps_the_old_policies(supervisor, daq, tmp_path):
    config = tmp_path / "supervisor.toml"
    config.write_text('allow_writes = ["M:*"]\n')
    sup = supervisor(*FAKE, "--config", str(config))
    stub = daq(sup.port)
    assert set_scalar(stub, "M:OUTTMP", 71.0) == grpc.StatusCode.OK
    assert set_scalar(stub, "G:AMANDA", 1.0) == grpc.StatusCode.PERMISSION_DENIED

    config.write_text('allow_writes = ["G:*"]\n[[policies]]\ntype = "rate_limit"\nmax_requests = "many"\n')
    mark = sup.mark()
    sup.proc.send_signal(signal.SIGHUP)
    failed = sup.wait_line("stderr", r"level=ERROR .*event=config_reload_failed kept=running_config error=", start=mark)
    assert "policies[0] (rate_limit): 'max_requests'" in failed.string

    assert sup.proc.poll() is None
    assert set_scalar(stub, "M:OUTTMP", 72.0) == grpc.StatusCode.OK
    assert set_scalar(stub, "G:AMANDA", 1.0) == grpc.StatusCode.PERMISSION_DENIED
    assert read_scalar(stub, "M:OUTTMP@I") == pytest.approx(72.0)


def test_sighup_with_a_good_file_swaps_the_policies(supervisor, daq, tmp_path):
    config = tmp_path / "supervisor.toml"
    config.write_text("")
    sup = supervisor(*FAKE, "--config", str(config))
    stub = daq(sup.port)
    assert set_scalar(stub, "G:AMANDA", 1.0) == grpc.StatusCode.PERMISSION_DENIED

    config.write_text('allow_writes = ["G:*"]\nmax_streams = 5\n')
    mark = sup.mark()
    sup.proc.send_signal(signal.SIGHUP)
    sup.wait_line("stderr", r"level=INFO .*event=config_reloaded policies=1 ", start=mark)
    restart = sup.wait_line("stderr", r"level=WARNING .*event=config_changes_need_restart settings=", start=mark)
    assert "max_streams" in restart.string
    assert set_scalar(stub, "G:AMANDA", 1.0) == grpc.StatusCode.OK
    assert set_scalar(stub, "M:OUTTMP", 1.0) == grpc.StatusCode.PERMISSION_DENIED


def test_sighup_applies_a_rotated_token(supervisor, daq, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("first\n")
    config = tmp_path / "supervisor.toml"
    config.write_text(f'allow_writes = ["M:*"]\ntoken_file = "{token_file}"\n')
    sup = supervisor(*FAKE, "--allow-token-plaintext", "--config", str(config))  # bound to [::], no TLS
    stub = daq(sup.port)
    request = DAQ_pb2.SettingList(setting=[DAQ_pb2.Setting(device="M:OUTTMP")])
    request.setting[0].value.scalar = 1.0

    def code(token):
        try:
            stub.Set(request, timeout=10, metadata=[("authorization", f"Bearer {token}")])
        except grpc.RpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    assert code("first") == grpc.StatusCode.OK
    token_file.write_text("second\n")
    mark = sup.mark()
    sup.proc.send_signal(signal.SIGHUP)
    sup.wait_line("stderr", r"level=INFO .*event=config_reloaded ", start=mark)
    assert code("first") == grpc.StatusCode.UNAUTHENTICATED
    assert code("second") == grpc.StatusCode.OK


def test_command_line_still_overrides_after_reload(supervisor, daq, tmp_path):
    config = tmp_path / "supervisor.toml"
    config.write_text('allow_writes = ["G:*"]\n')
    sup = supervisor(*FAKE, "--config", str(config), "--allow-writes", "M:*")
    stub = daq(sup.port)
    mark = sup.mark()
    sup.proc.send_signal(signal.SIGHUP)
    sup.wait_line("stderr", r"event=config_reloaded ", start=mark)
    assert set_scalar(stub, "M:OUTTMP", 1.0) == grpc.StatusCode.OK
    assert set_scalar(stub, "G:AMANDA", 1.0) == grpc.StatusCode.PERMISSION_DENIED


def test_scaling_signals_without_a_pool_are_logged(supervisor, daq):
    sup = supervisor(*FAKE)
    mark = sup.mark()
    sup.proc.send_signal(signal.SIGTTIN)
    sup.wait_line(
        "stderr", r"event=scale_refused signal=SIGTTIN action=add_worker reason=not_a_worker_pool", start=mark
    )
    assert read_scalar(daq(sup.port), "M:OUTTMP@I") == pytest.approx(72.5)


def test_every_handled_signal_has_its_handle_method():
    # The service's loop calls handle_<name> for each signal it installed: a signal without its
    # method would end the service with an AttributeError instead of being handled.
    assert {"INT", "TERM", "HUP", "USR1", "TTIN", "TTOU"} <= set(SIGNALS)
    for name in SIGNALS:
        assert hasattr(signal, f"SIG{name}"), name
        assert callable(getattr(Service, f"handle_{name.lower()}", None)), name


# -- with a worker pool --------------------------------------------------------------------------------------


def test_worker_pool_serves_scales_and_stops(supervisor, daq):
    sup = supervisor("--workers", "1", "--port", "0", "--backend", "fake", "--allow-writes", "M:*")
    assert SERVING.match(sup.lines["stdout"][0]).group(3) == "backend fake, 1 worker ready"  # type: ignore[union-attr]
    stub = daq(sup.port)
    assert read_scalar(stub, "M:OUTTMP@I") == pytest.approx(72.5)
    assert set_scalar(stub, "G:AMANDA", 1.0) == grpc.StatusCode.PERMISSION_DENIED
    mark = sup.mark()
    sup.proc.send_signal(signal.SIGTTIN)
    sup.wait_line("stderr", r"event=scale_done action=add_worker workers_ready=2", start=mark)
    assert read_scalar(stub, "G:AMANDA@I") == pytest.approx(42.0)
    sup.proc.send_signal(signal.SIGTERM)
    assert sup.wait_exit(15) == 0


def test_worker_that_cannot_build_its_backend_exits_3():
    result = run_cli("--workers", "1", "--port", "0", "--backend", "nosuch_module_xyz:make")
    assert result.returncode == 3, result
    assert result.stderr.strip().splitlines()[-1].startswith("pacsys-supervisor: error: "), result.stderr
    assert "nosuch_module_xyz" in result.stderr and "Traceback" not in result.stderr


# -- startup errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "fragment", "code"),
    [
        ("nosuch_module_xyz:make", "nosuch_module_xyz", 3),  # well formed, cannot be built: failed start
        ("bogus spec", "--backend must be sim, sim:PATH, fake, grpc://HOST:PORT or module:factory", 2),  # usage
        ("sim:/nonexistent/devices.toml", "/nonexistent/devices.toml", 3),
    ],
)
def test_bad_backend_spec_exit_status(spec, fragment, code):
    result = run_cli("--workers", "0", "--port", "0", "--backend", spec)
    assert result.returncode == code, result
    assert result.stderr.strip().splitlines()[-1].startswith("pacsys-supervisor: error: "), result.stderr
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr and "serving" not in result.stdout


def test_port_in_use_exits_3_saying_so_in_its_own_words():
    import json
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        serve = ("--workers", "0", "--backend", "fake", "--host", "127.0.0.1")
        for where, args in (
            ("", ("--port", str(port))),
            (" (metrics_port)", ("--port", "0", "--metrics-port", str(port))),
        ):
            result = run_cli(*serve, *args)
            assert result.returncode == 3, result
            # One line, ours: not gRPC's own "add_port.cc ... Failed to bind ... GRPC_VERBOSITY" lines.
            assert result.stderr.splitlines() == [
                f"pacsys-supervisor: error: cannot listen on 127.0.0.1:{port}{where}: port {port} is in use: "
                f"another process listens there (`ss -ltnp 'sport = :{port}'` shows which); stop it or choose "
                "another port"
            ], result.stderr
        result = run_cli(*serve, "--port", str(port), "--log-format", "json")
        assert result.returncode == 3
        lines = [json.loads(line) for line in result.stderr.splitlines()]  # every line JSON
        assert [line["level"] for line in lines] == ["ERROR"] and f"port {port} is in use" in lines[0]["msg"], lines


def test_bad_options_exit_2(tmp_path):
    result = run_cli("--port", "abc")
    assert result.returncode == 2 and "argument --port: must be an integer, got 'abc'" in result.stderr
    result = run_cli("--workers", "0", "--port", "70000")
    assert result.returncode == 2 and "--port must be an integer from 0 to 65535" in result.stderr
    config = tmp_path / "bad.toml"
    config.write_text("wokers = 1\n")
    result = run_cli("--config", str(config))
    assert result.returncode == 2 and f"{config}: unknown key 'wokers'" in result.stderr


# -- in-process: parser, status, logging ---------------------------------------------------------------------


def test_every_flag_setting_has_an_option():
    parser = serve_parser()
    options = {opt for action in parser._actions for opt in action.option_strings}
    for name, f in FIELDS.items():
        assert (flag_name(name) in options) == f.flag, name
    assert "--no-log-requests" in options
    ns = parser.parse_args(["--allow-writes", "M:*", "G:*", "--allow-writes", "Z:*", "--no-log-requests"])
    assert ns.allow_writes == ["M:*", "G:*", "Z:*"] and ns.log_requests is False and ns.port is None


@pytest.mark.parametrize(
    ("argv", "meant"),
    [
        (["--wokers", "4"], "--workers"),
        (["--metrics-prot=9109"], "--metrics-port"),
        (["probe", "--adress", "x"], "--addr"),
        (["explain", "--idenity", "x", "M:OUTTMP"], "--identity"),
        (["status", "--jsn"], "--json"),
    ],
)
def test_a_mistyped_option_says_which_was_meant(capsys, argv, meant):
    assert main(argv) == 2
    assert capsys.readouterr().err.rstrip().endswith(f"(did you mean {meant}?)")


def test_pacsys_audit_says_which_option_was_meant(capsys):
    from pacsys.supervised.audit_command import main as audit_main

    with pytest.raises(SystemExit):
        audit_main(["x.jsonl", "--sinse", "2020-01-01"])
    assert capsys.readouterr().err.rstrip().endswith("(did you mean --since?)")


def test_token_options_are_exclusive(capsys):
    assert main(["--token", "a", "--token-file", "b"]) == 2
    assert "not allowed with" in capsys.readouterr().err


def test_status_of_an_unreachable_service_exits_2(capsys):
    assert main(["status", "--addr", "127.0.0.1:1", "--timeout", "2"]) == 2
    assert "unreachable" in capsys.readouterr().out


def test_help_exits_0(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--allow-writes" in out and "check-config" in out


@pytest.fixture
def root_logging():
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    yield
    root.setLevel(saved[0])
    root.handlers[:] = saved[1]


def test_kv_logging(root_logging):
    stream = io.StringIO()
    configure_logging("debug", "kv", stream=stream)
    configure_logging("INFO", "kv", stream=stream)  # replaces its own handler: one line per record
    logging.getLogger("pacsys.supervised").info("event=x peer=%s", "ipv4:1.2.3.4:5")
    logging.getLogger("pacsys.supervised").debug("not shown")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    assert re.fullmatch(
        r'ts=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z level=INFO logger=pacsys.supervised msg="event=x peer=ipv4:1.2.3.4:5"',
        lines[0],
    ), lines[0]


def test_json_logging_with_exception(root_logging):
    stream = io.StringIO()
    configure_logging("INFO", "json", stream=stream)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("x").exception("failed\nbadly")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert set(entry) == {"ts", "level", "logger", "msg", "exc"}
    assert (entry["level"], entry["logger"], entry["msg"]) == ("ERROR", "x", "failed\nbadly")
    assert "RuntimeError: boom" in entry["exc"]


def test_kv_logging_keeps_one_record_per_line(root_logging):
    stream = io.StringIO()
    configure_logging("INFO", "kv", stream=stream)
    try:
        raise ValueError("bad")
    except ValueError:
        logging.getLogger("x").exception("two\nlines")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and 'msg="two\\nlines" exc="Traceback' in lines[0]


def test_gc_tuning_for_serving_freezes_startup_objects():
    import gc

    from pacsys.supervised._server import tune_gc_for_serving

    before = gc.get_threshold()
    try:
        tune_gc_for_serving()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (20_000, 50, 100)
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


# -- version, exit status, environment, check-config ----------------------------------------------------------


def test_version_is_the_distributions():
    import importlib.metadata

    result = run_cli("--version")
    assert result.returncode == 0, result
    assert result.stdout.strip() == f"pacsys-supervisor {importlib.metadata.version('pacsys-supervisor')}"


def test_help_synopsis_shows_every_subcommands_options(capsys):
    assert main(["--help"]) == 0
    usage = capsys.readouterr().out.split("\n\n")[0]
    for fragment in (
        "check-config [-h] [-q] FILE",
        "--service NAME",
        "--wait",
        "status [-h] [--addr HOST:PORT]",
        "--json",
        "--token-file FILE",
        "explain [-h] [--config FILE] [--identity ID]",
        "[--method {Read,Set}]",
        "--pid PID",
        "--server-name NAME",
    ):
        assert fragment in usage, usage
    # every admin command has its line
    from pacsys.supervised import admin

    assert all(f"pacsys-supervisor {name} " in usage for name in admin.COMMANDS), usage


@pytest.mark.parametrize("where", ["missing", "read-only"])
def test_audit_log_that_cannot_be_opened_exits_3(tmp_path, where):
    directory = tmp_path / "no-such-dir" if where == "missing" else _read_only_directory(tmp_path)
    path = f"{directory}/audit.jsonl"
    result = run_cli(*FAKE, "--audit-path", path)
    assert result.returncode == 3, result
    assert result.stderr.startswith("pacsys-supervisor: error: cannot open the audit log") and path in result.stderr


def test_environment_sits_between_the_file_and_the_command_line(supervisor, daq, tmp_path):
    config = tmp_path / "supervisor.toml"
    config.write_text('allow_writes = ["G:*"]\nworkers = 3\n')
    env = {
        "PACSYS_SUPERVISOR_ALLOW_WRITES": "M:* Z:*",
        "PACSYS_SUPERVISOR_WORKERS": "0",
        "PACSYS_SUPERVISOR_BACKEND": "fake",
    }
    sup = supervisor("--config", str(config), "--port", "0", "--allow-writes", "Z:*", env=env)
    assert SERVING.match(sup.lines["stdout"][0]).group(3) == "backend fake, in process"  # type: ignore[union-attr]
    stub = daq(sup.port)
    assert set_scalar(stub, "Z:ACLTST", 1.0) == grpc.StatusCode.OK  # the command line
    assert set_scalar(stub, "M:OUTTMP", 1.0) == grpc.StatusCode.PERMISSION_DENIED  # the environment lost to it
    assert set_scalar(stub, "G:AMANDA", 1.0) == grpc.StatusCode.PERMISSION_DENIED  # the file lost to both


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"PACSYS_SUPERVISOR_PORT": "abc"}, "PACSYS_SUPERVISOR_PORT must be an integer, got 'abc'"),
        ({"PACSYS_SUPERVISOR_PORT": "70000"}, "PACSYS_SUPERVISOR_PORT must be an integer from 0 to 65535"),
        ({"PACSYS_SUPERVISOR_WOKERS": "2"}, "unknown environment variable PACSYS_SUPERVISOR_WOKERS (did you mean"),
        ({"PACSYS_SUPERVISOR_LOG_REQUESTS": "maybe"}, "PACSYS_SUPERVISOR_LOG_REQUESTS must be true or false"),
        ({"PACSYS_SUPERVISOR_POLICIES": "[]"}, "unknown environment variable PACSYS_SUPERVISOR_POLICIES"),
    ],
)
def test_bad_environment_exits_2_naming_the_variable(env, fragment):
    result = run_cli("--workers", "0", "--backend", "fake", env=env)
    assert result.returncode == 2, result
    assert result.stderr.startswith("pacsys-supervisor: error: ") and fragment in result.stderr, result.stderr


def test_check_config_shows_where_each_value_came_from(tmp_path):
    config = tmp_path / "supervisor.toml"
    config.write_text('workers = 3\nport = 50099\ntoken = "s3cret"\n')
    result = run_cli("check-config", str(config), env={"PACSYS_SUPERVISOR_WORKERS": "4"})
    assert result.returncode == 0, result
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{config}: OK (backend sim, 4 workers")
    rows = {line.split()[0]: line.split(None, 2)[1:] for line in lines[2:]}
    assert rows["workers"] == ["4", "environment (PACSYS_SUPERVISOR_WORKERS)"]
    assert rows["port"] == ["50099", "file"]
    assert rows["host"] == ['"[::]"', "default"]
    assert rows["token"] == ["(hidden)", "file"] and "s3cret" not in result.stdout


def test_check_config_checks_the_audit_files_as_the_start_would(tmp_path):
    config = tmp_path / "supervisor.toml"
    config.write_text(f'audit_path = "{tmp_path}/missing/audit.jsonl"\n')
    result = run_cli("check-config", str(config))
    assert result.returncode == 2, result
    assert (
        f"'audit_path' {tmp_path}/missing/audit.jsonl: its directory {tmp_path}/missing does not exist" in result.stderr
    )
    config.write_text(f'audit_path = "{tmp_path}/audit.jsonl"\naudit_proto_path = "{tmp_path}"\n')
    result = run_cli("check-config", str(config))
    assert result.returncode == 2 and f"'audit_proto_path' {tmp_path}: is a directory" in result.stderr, result
    config.write_text(f'audit_path = "{tmp_path}/audit.jsonl"\n')
    assert run_cli("check-config", "-q", str(config)).returncode == 0
    assert not (tmp_path / "audit.jsonl").exists()  # checked, not created


def _read_only_directory(tmp_path):
    """A directory this user cannot write to: mode 0500, or for root (who may write there) /proc/sys."""
    if os.geteuid() != 0:
        directory = tmp_path / "ro"
        directory.mkdir(mode=0o500)
        return directory
    if not os.access("/proc/sys", os.W_OK):
        return "/proc/sys"
    pytest.skip("no directory here that root cannot write to")


def test_check_config_refuses_a_read_only_audit_directory(tmp_path):
    directory = _read_only_directory(tmp_path)
    config = tmp_path / "supervisor.toml"
    config.write_text(f'audit_path = "{directory}/audit.jsonl"\n')
    result = run_cli("check-config", str(config))
    assert result.returncode == 2 and f"its directory {directory} is not writable by this user" in result.stderr, result


def test_sigusr1_reopens_the_audit_files(supervisor, daq, tmp_path):
    audit = tmp_path / "audit.jsonl"
    sup = supervisor(*FAKE, "--audit-path", str(audit), umask=0o077)
    stub = daq(sup.port)
    read_scalar(stub, "M:OUTTMP@I")
    audit.rename(tmp_path / "audit.jsonl.1")
    mark = sup.mark()
    sup.proc.send_signal(signal.SIGUSR1)
    sup.wait_line("stderr", r"event=audit_reopened", start=mark)
    read_scalar(stub, "G:AMANDA@I")
    sup.proc.send_signal(signal.SIGTERM)
    assert sup.wait_exit(15) == 0
    old = [json.loads(line)["drfs"] for line in (tmp_path / "audit.jsonl.1").read_text().splitlines()]
    new = [json.loads(line)["drfs"] for line in audit.read_text().splitlines()]
    assert (old, new) == ([["M:OUTTMP@I"]], [["G:AMANDA@I"]])
    assert audit.stat().st_mode & 0o777 == 0o640  # not the process's umask (0600)


def test_sigusr1_with_the_audit_directory_gone_says_it_could_not_reopen(supervisor, daq, tmp_path):
    folder = tmp_path / "logs"
    folder.mkdir()
    sup = supervisor(*FAKE, "--audit-path", str(folder / "audit.jsonl"))
    read_scalar(daq(sup.port), "M:OUTTMP@I")
    shutil.rmtree(folder)
    mark = sup.mark()
    sup.proc.send_signal(signal.SIGUSR1)
    sup.wait_line("stderr", r"level=ERROR .*event=audit_reopen_failed ", start=mark)
    assert not any("event=audit_reopened" in line for line in sup.lines["stderr"][mark:])


def test_console_scripts_name_callables():
    # pyproject's [project.scripts] name functions by "module:attribute": a module that moved
    # would leave an installed command that fails on its first use.
    import importlib
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    scripts = pyproject["project"]["scripts"]
    assert set(scripts) == {"pacsys-supervisor", "pacsys-audit"}
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), name
