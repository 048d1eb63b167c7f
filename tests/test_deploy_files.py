"""The deployment files agree with the schemas, with each other and with the code.

- ops/k8s/*.yaml validate against the Kubernetes schemas (kubernetes-validate, strict, with
  the schemas it ships: no network), and a broken manifest is rejected (the check is real).
- The ConfigMap holds ops/supervisor.container.toml, which `check-config` accepts.
- Stop timings fit: Kubernetes' terminationGracePeriodSeconds and compose's stop_grace_period
  cover preStop, drain_delay and shutdown_grace; drain_delay outlasts haproxy's detection.
- The probes name the service's health services and ports; compose's services are the
  servers of ops/haproxy.cfg; haproxy accepts ops/haproxy.cfg.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML comes with kubernetes-validate (the test extra)")

REPO = Path(__file__).resolve().parent.parent
OPS = REPO / "ops"
K8S = sorted((OPS / "k8s").glob("*.yaml"))
CONTAINER_CONFIG = OPS / "supervisor.container.toml"
HAPROXY_CFG = OPS / "haproxy.cfg"
WORKERS_STOP = 10  # seconds, with margin, for the workers to finish and exit after the drain


def manifests() -> dict[str, dict]:
    found = {}
    for path in K8S:
        for doc in yaml.safe_load_all(path.read_text()):
            found[doc["kind"]] = doc
    return found


def container_settings() -> dict:
    return tomllib.loads(CONTAINER_CONFIG.read_text())


def test_manifests_validate_against_the_kubernetes_schemas():
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    assert {"Deployment", "Service", "ConfigMap", "Secret", "PodDisruptionBudget"} <= set(manifests())
    version = kubernetes_validate.latest_version()
    for path in K8S:
        for doc in yaml.safe_load_all(path.read_text()):
            kubernetes_validate.validate(doc, version, strict=True)
    broken = copy.deepcopy(manifests()["Deployment"])
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def test_the_configmap_holds_the_container_config_and_check_config_accepts_it(tmp_path):
    data = manifests()["ConfigMap"]["data"]
    assert data["supervisor.toml"] == CONTAINER_CONFIG.read_text()
    token = tmp_path / "token"
    token.write_text("t\n")
    config = tmp_path / "supervisor.toml"
    settings = container_settings()
    # The token and the audit directory are the pod's mounts: stand-ins here.
    text = CONTAINER_CONFIG.read_text().replace(settings["token_file"], str(token))
    config.write_text(text.replace(settings["audit_path"], str(tmp_path / "audit.jsonl")))
    done = subprocess.run(
        [sys.executable, "-m", "pacsys.supervised.cli", "check-config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "writes granted by policy" in done.stdout


def test_the_deployment_mounts_config_and_token_where_the_config_says():
    settings = container_settings()
    pod = manifests()["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["config"] == "/etc/pacsys" and volumes["config"]["configMap"]["name"]
    secret = volumes["token"]["secret"]
    assert secret["secretName"] == manifests()["Secret"]["metadata"]["name"]
    assert f"{mounts['token']}/{secret['items'][0]['path']}" == settings["token_file"]
    assert Path(settings["audit_path"]).parent == Path(mounts["audit"])
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_probes_and_ports_name_the_services_health_checks():
    settings = container_settings()
    container = manifests()["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": settings["port"], "metrics": settings["metrics_port"]}
    assert container["livenessProbe"]["grpc"] == {"port": settings["port"], "service": "liveness"}
    assert container["startupProbe"]["grpc"] == {"port": settings["port"], "service": "liveness"}
    assert container["readinessProbe"]["grpc"] == {"port": settings["port"], "service": "readiness"}
    service_ports = {p["name"]: p["targetPort"] for p in manifests()["Service"]["spec"]["ports"]}
    assert set(service_ports.values()) <= set(ports)
    assert manifests()["Deployment"]["spec"]["replicas"] >= 2
    assert manifests()["PodDisruptionBudget"]["spec"]["minAvailable"] >= 1


def test_stop_timings_cover_the_drain():
    settings = container_settings()
    drain = settings["drain_delay"] + settings["shutdown_grace"]
    pod = manifests()["Deployment"]["spec"]["template"]["spec"]
    pre_stop = pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] >= float(pre_stop[1]) + drain + WORKERS_STOP
    compose = yaml.safe_load((OPS / "compose.yaml").read_text())
    grace = compose["x-supervisor"]["stop_grace_period"]
    assert float(grace.rstrip("s")) >= drain + WORKERS_STOP
    # haproxy sees an instance down within inter x fall, plus one interval of phase.
    inter = float(re.search(r"default-server .*\binter (\d+(?:\.\d+)?)s\b", HAPROXY_CFG.read_text()).group(1))
    fall = int(re.search(r"default-server .*\bfall (\d+)\b", HAPROXY_CFG.read_text()).group(1))
    assert settings["drain_delay"] > inter * fall + inter


def test_compose_runs_the_servers_haproxy_names_with_the_files_in_ops():
    compose = yaml.safe_load((OPS / "compose.yaml").read_text())
    services = compose["services"]
    servers = set(re.findall(r"^\s*server \w+ ([\w-]+):\d+", HAPROXY_CFG.read_text(), flags=re.MULTILINE))
    assert servers == {name for name in services if name != "haproxy"}
    for name in servers:
        mounted = [v.split(":")[0] for v in services[name]["volumes"] if v.startswith("./")]
        assert mounted and all((OPS / m).exists() for m in mounted), mounted
        assert services[name]["build"]["context"] == ".." and (REPO / services[name]["build"]["dockerfile"]).exists()
    assert (OPS / services["haproxy"]["volumes"][0].split(":")[0]).resolve() == HAPROXY_CFG


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed (apt-get install haproxy)")
def test_haproxy_accepts_its_config():
    done = subprocess.run(["haproxy", "-c", "-f", str(HAPROXY_CFG)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
