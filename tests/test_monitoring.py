"""The Prometheus alert rules and the Grafana dashboard against what a running server exports.

promtool (Debian's prometheus package, installed by .ci/run) checks and unit-tests the rules.
Every metric a dashboard query or an alert names must exist in the /metrics of a real
`pacsys-supervisor` process (with workers and an audit log), so renaming a metric fails here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest

from benchmarks.pair import free_port
from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2, DAQ_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
ALERTS = REPO / "ops" / "prometheus" / "alerts.yaml"
ALERT_TESTS = REPO / "ops" / "prometheus" / "alerts_test.yaml"
DASHBOARDS = sorted((REPO / "ops" / "grafana").glob("*.json"))
# Metrics the rules and dashboards use before the server exports them: the slot states
# (starting, ready, cooling, ...) as a gauge, 1 for each slot's current state.
# Series Prometheus makes itself.
PROMETHEUS_OWN = {"up"}
METRIC = re.compile(r"\b(pacsys_[a-z0-9_]+|up)\b(?!\s*\()")


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return path


def test_alert_rules_pass_promtool_check_and_their_unit_tests():
    tool = promtool()
    checked = subprocess.run([tool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run([tool, "test", "rules", str(ALERT_TESTS)], capture_output=True, text=True, timeout=60)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def alert_expressions() -> list[str]:
    return re.findall(r"^\s*expr:\s*(.+)$", ALERTS.read_text(), flags=re.MULTILINE)


def dashboard_expressions(path: Path) -> list[str]:
    found: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("expr", "definition") and isinstance(value, str):
                    found.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(json.loads(path.read_text()))
    return found


def names_in(expressions: list[str]) -> set[str]:
    # Label values in quotes ("cooling") and label names in braces are not metric names.
    stripped = [re.sub(r'"[^"]*"|\{[^}]*\}|by \([^)]*\)', " ", e) for e in expressions]
    return {m for e in stripped for m in METRIC.findall(e)}


def exported_names(text: str) -> set[str]:
    """Every series name of an exposition: samples, and the families declared without samples."""
    names = {line.split("{")[0].split()[0] for line in text.splitlines() if line and not line.startswith("#")}
    for family, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.MULTILINE):
        if kind == "histogram":
            names |= {f"{family}_bucket", f"{family}_sum", f"{family}_count"}
        elif kind == "counter" and not family.endswith("_total"):
            names.add(f"{family}_total")
        else:
            names.add(family)
    return names


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> set[str]:
    """The series names of a real pacsys-supervisor with a worker pool and an audit log."""
    tmp = tmp_path_factory.mktemp("metrics")
    port, metrics_port = free_port(), free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pacsys.supervised.cli",
            *("--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(metrics_port)),
            *("--workers", "1", "--audit-path", str(tmp / "audit.jsonl")),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=REPO,
        env=env,
    )
    try:
        assert proc.stdout is not None
        assert "serving DAQ" in proc.stdout.readline()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = DAQ_pb2_grpc.DAQStub(channel)
            list(stub.Read(DAQ_pb2.ReadingList(drf=["M:OUTTMP@I"]), timeout=10))
            request = DAQ_pb2.SettingList()
            request.setting.add(device="Z:ACLTST").value.scalar = 1.0
            with pytest.raises(grpc.RpcError):
                stub.Set(request, timeout=10)  # denied: a decision and a policy denial to count
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
            return exported_names(reply.read().decode())
    finally:
        proc.kill()
        proc.wait(10)


def test_the_dashboards_and_rules_are_found():
    assert DASHBOARDS, "no dashboard in ops/grafana"
    assert len(alert_expressions()) >= 6
    for path in DASHBOARDS:
        assert len(dashboard_expressions(path)) >= 10, path


def test_every_metric_the_alerts_name_is_exported(exported):
    names = names_in(alert_expressions())
    missing = names - exported - PROMETHEUS_OWN
    assert not missing, f"alerts.yaml names metrics the server does not export: {missing}"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_metric_a_dashboard_queries_is_exported(exported, path):
    names = names_in(dashboard_expressions(path))
    assert len(names) >= 15, names
    missing = names - exported - PROMETHEUS_OWN
    assert not missing, f"{path.name} queries metrics the server does not export: {missing}"


def test_a_renamed_metric_would_be_caught(exported):
    # The check itself: a name that is not exported is reported, one that is is not.
    assert "pacsys_worker_restarts_total" in exported
    assert names_in(["rate(pacsys_worker_restart_total[5m])"]) - exported == {"pacsys_worker_restart_total"}
