"""The files an operator or a newcomer uses as they are: README's commands, .ci/run, the
systemd units, logrotate's config, and no reference to files outside this repository."""

import configparser
import grp
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from processes import REPO, free_port, process_env, read_scalar

UNITS = ("pacsys-supervisor.service", "pacsys-supervisor@.service")
HARDENING = {
    "NoNewPrivileges": "yes",
    "CapabilityBoundingSet": "",
    "SystemCallFilter": "@system-service",
    "RestrictSUIDSGID": "yes",
    "ProtectHostname": "yes",
    "ProtectClock": "yes",
    "ProtectKernelLogs": "yes",
    "RestrictRealtime": "yes",
    "ProtectProc": "invisible",
    "ProtectSystem": "strict",
    "UMask": "0027",
    "RestartPreventExitStatus": "2",
}


def _code_blocks(text: str) -> list[list[str]]:
    return [block.strip("\n").splitlines() for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, re.M | re.S)]


def test_readme_opens_with_two_commands_that_ci_runs_from_there():
    readme = (REPO / "README.md").read_text()
    serve, test = _code_blocks(readme)[0]
    assert re.fullmatch(r"pip install -e \. && pacsys-supervisor\s+# .*", serve), serve  # defaults: sim, port 50051
    assert re.fullmatch(r"pip install -e '\.\[test\]' && pytest\s+# .*", test), test
    ci = (REPO / ".ci/run").read_text()
    # CI holds both commands as written, checks them against the README first, and ends with
    # the test command (so a fresh clone runs what CI ran).
    command = [re.sub(r"\s+#.*$", "", line) for line in (serve, test)]
    assert f'serve_command="{command[0]}"' in ci and f'test_command="{command[1]}"' in ci
    assert ci.index("README.md") < ci.index("apt-get")  # the check comes before any work
    assert ci.rstrip().splitlines()[-1] == command[1]


def _try_it(port: int) -> str:
    """README's "Try it" block, with `port` for 50051 (other sessions of this machine may use 50051)."""
    readme = (REPO / "README.md").read_text()
    block = re.search(r"^```\n(.*?)^```", readme.split("## Try it")[1], re.M | re.S)[1]
    assert block.count("50051") == 3, block  # the server's port, the probe's and the client's
    return block.replace("50051", str(port))


def _run_block(block: str) -> subprocess.CompletedProcess:
    """The block in bash as a newcomer pastes it; whatever it left running is killed after."""
    proc = subprocess.Popen(
        ["bash", "-c", block],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        start_new_session=True,
        # `pacsys-supervisor` and `python` of this environment, as after the README's install.
        env=process_env({"PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}),
    )
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(proc.args, proc.returncode, out)


def test_try_it_reads_from_its_own_server_and_stops_it():
    done = _run_block(_try_it(free_port()))
    assert done.returncode == 0, done.stdout
    readings = [line.split() for line in done.stdout.splitlines() if re.fullmatch(r"\d+ \S+", line)]
    assert [index for index, _ in readings] == ["0", "1"], done.stdout


def test_try_it_fails_loudly_when_another_server_holds_its_port():
    """Another gRPC server (with health, answering SERVING) on the port: the block must not read from it."""
    from pacsys.supervised import SupervisedServer
    from pacsys.testing import FakeBackend

    other = SupervisedServer(FakeBackend(), port=0, host="127.0.0.1")
    other.start()
    try:
        done = _run_block(_try_it(other.port))
    finally:
        other.stop()
    assert done.returncode == 3, done.stdout  # the server's own exit status: the start failed
    assert f"port {other.port} is in use" in done.stdout, done.stdout
    assert "not process" in done.stdout and "the port is taken" in done.stdout, done.stdout
    assert not any(re.fullmatch(r"\d+ \S+", line) for line in done.stdout.splitlines()), "it read from the other"


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment, method-assign]
    parser.read_string((REPO / "ops" / name).read_text())
    return parser


@pytest.mark.parametrize("name", UNITS)
def test_units_carry_the_hardening(name):
    service = _unit(name)["Service"]
    for key, value in HARDENING.items():
        assert service.get(key) == value, (name, key)
    assert service["Type"] == "notify" and service["KillMode"] == "mixed"


def test_template_unit_keeps_instances_apart():
    single, template = _unit(UNITS[0])["Service"], _unit(UNITS[1])["Service"]
    assert template["ExecStart"] == "/opt/pacsys/bin/pacsys-supervisor --config /etc/pacsys/%i.toml"
    assert template["LogsDirectory"] == "pacsys/%i" and template["ReadWritePaths"] == "/var/log/pacsys/%i"
    differ = {k for k in single if single[k] != template.get(k)}
    assert differ == {"ExecStart", "LogsDirectory", "ReadWritePaths"}


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed (apt-get install systemd)"
)
@pytest.mark.parametrize("name", UNITS)
def test_systemd_analyze_verifies_the_units(tmp_path, name):
    # The installed command does not exist here: verify the unit with one that does.
    text = (REPO / "ops" / name).read_text().replace("/opt/pacsys/bin/pacsys-supervisor", "/bin/true")
    unit = tmp_path / name.replace("@.", "@check.")
    unit.write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr == "", result


@pytest.mark.skipif(shutil.which("logrotate") is None, reason="logrotate is not installed (apt-get install logrotate)")
def test_logrotate_config_rotates_a_running_service(supervisor, daq, tmp_path):
    """ops/logrotate.conf with its paths, owner and signal pointed at a test server that also
    rotates its files itself (audit_max_bytes): each leaves the other's files alone, and
    `pacsys-audit --all` reads every request from them in order."""
    logs = tmp_path / "log"
    logs.mkdir()
    audit = logs / "audit.jsonl"
    sup = supervisor(
        "--workers", "0", "--port", "0", "--backend", "fake", "--audit-path", str(audit),
        "--audit-proto-path", str(logs / "audit.bin"), "--audit-max-bytes", "4096", "--audit-keep", "5",
    )  # fmt: skip
    stub = daq(sup.port)
    for _ in range(500):  # until the service has rotated its files twice (about 40 reads)
        if (logs / "audit.jsonl.2").exists():
            break
        read_scalar(stub, "G:AMANDA@I")
    read_scalar(stub, "M:OUTTMP@I")
    own = {p.name: p.read_bytes() for p in logs.glob("audit.*.[0-9]")}
    assert {"audit.jsonl.1", "audit.jsonl.2", "audit.bin.1", "audit.bin.2"} <= set(own)
    conf = (REPO / "ops/logrotate.conf").read_text()
    owner = f"{pwd.getpwuid(os.getuid()).pw_name} {grp.getgrgid(os.getgid()).gr_name}"
    conf = conf.replace("/var/log/pacsys", str(logs)).replace("create 0640 pacsys pacsys", f"create 0640 {owner}")
    conf = re.sub(r"(?m)^\s*systemctl kill .*\n", "", conf, count=1)
    conf = re.sub(r"(?m)^\s*systemctl kill .*$", f"kill -USR1 {sup.proc.pid}", conf)
    (tmp_path / "logrotate.conf").write_text(conf)
    mark = sup.mark()
    command = ["logrotate", "--force", "--state", str(tmp_path / "state"), str(tmp_path / "logrotate.conf")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result
    sup.wait_line("stderr", r"event=audit_reopened", start=mark)
    read_scalar(stub, "G:AMANDA@I")
    sup.proc.send_signal(signal.SIGTERM)
    assert sup.wait_exit(15) == 0
    (dated,) = logs.glob("audit.jsonl-*")  # logrotate's, named by date
    assert re.fullmatch(r"audit\.jsonl-\d{8}-\d+", dated.name) and (logs / f"audit.bin{dated.name[11:]}").exists()
    assert "M:OUTTMP@I" in dated.read_text()
    assert "G:AMANDA@I" in audit.read_text() and "M:OUTTMP" not in audit.read_text()
    assert {p.name: p.read_bytes() for p in logs.glob("audit.*.[0-9]")} == own  # untouched by logrotate
    pacsys_audit = [sys.executable, "-m", "pacsys.supervised.audit_command", "--all", "--json", str(audit)]
    listed = subprocess.run(pacsys_audit, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    seqs = [json.loads(line)["seq"] for line in listed.stdout.splitlines()]
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) > 20
    assert "G:AMANDA@I" in listed.stdout.splitlines()[-1]


def test_nothing_refers_to_files_outside_the_repository():
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True, timeout=30
    ).stdout.split(b"\0")
    # The design notes and specs this project started from live outside it; docs/ holds what a reader needs.
    outside = re.compile(
        r"shared/(spec|design)|/work/|spec/(drf|daq-wire)\.md|shared design|\b(the|pacsys) seed\b|\bseed's\b|seed plan",
        re.I,
    )
    hits = []
    for name in filter(None, files):
        path = REPO / name.decode()
        if path.suffix in (".png", ".bin") or not path.is_file() or path.name == Path(__file__).name:
            continue
        for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if outside.search(line):
                hits.append(f"{name.decode()}:{lineno}: {line.strip()}")
    assert hits == []
