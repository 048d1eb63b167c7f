"""The deployment files agree with the schemas, with each other and with the code.

- ops/k8s/*.yaml validate against the Kubernetes schemas (kubernetes-validate, strict, with
  the schemas it ships: no network), and a broken manifest is rejected (the check is real).
- The ConfigMap holds ops/supervisor.container.toml, which `check-config` accepts.
- Stop timings fit: Kubernetes' terminationGracePeriodSeconds and compose's stop_grace_period
  cover preStop, drain_delay and shutdown_grace; drain_delay outlasts haproxy's detection.
- The probes ask the metrics port (the service port serves TLS, which the kubelet's gRPC
  probes do not speak); compose's services are the servers of ops/haproxy.cfg, and the
  token, certificate and CA files compose and Kubernetes mount are where the config and
  haproxy look for them; haproxy accepts ops/haproxy.cfg with its addresses substituted
  (nothing is resolved through the system's name servers); compose publishes each instance's
  plaintext listener and gives the instances haproxy's fixed address as their trusted proxy.
"""

from __future__ import annotations

import copy
import ipaddress
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from benchmarks.pair import Certificates, render_haproxy_cfg

yaml = pytest.importorskip("yaml", reason="PyYAML comes with kubernetes-validate (the test extra)")

REPO = Path(__file__).resolve().parent.parent
OPS = REPO / "ops"
K8S = sorted((OPS / "k8s").glob("*.yaml"))
CONTAINER_CONFIG = OPS / "supervisor.container.toml"
HAPROXY_CFG = OPS / "haproxy.cfg"
WORKERS_STOP = 10  # seconds, with margin, for the workers to finish and exit after the drain
NEEDS_OPENSSL = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


def manifests() -> dict[str, dict]:
    """Each manifest by kind, and by kind/name for kinds with several (Service/pacsys-supervisor-pods)."""
    found = {}
    for path in K8S:
        for doc in yaml.safe_load_all(path.read_text()):
            found.setdefault(doc["kind"], doc)
            found[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
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


@NEEDS_OPENSSL
def test_the_configmap_holds_the_container_config_and_check_config_accepts_it(tmp_path):
    data = manifests()["ConfigMap"]["data"]
    assert data["supervisor.toml"] == CONTAINER_CONFIG.read_text()
    token = tmp_path / "token"
    token.write_text("t\n")
    config = tmp_path / "supervisor.toml"
    settings = container_settings()
    certificates = Certificates(tmp_path)
    # The token, the certificate and the audit directory are the pod's mounts: stand-ins here.
    text = CONTAINER_CONFIG.read_text().replace(settings["token_file"], str(token))
    text = text.replace(settings["tls_cert"], str(certificates.cert)).replace(
        settings["tls_key"], str(certificates.key)
    )
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


def test_the_deployment_mounts_config_token_and_certificate_where_the_config_says():
    settings = container_settings()
    pod = manifests()["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["config"] == "/etc/pacsys" and volumes["config"]["configMap"]["name"]
    secrets = {
        f"{mounts['secrets']}/{item['path']}": (source["secret"]["name"], item["key"])
        for source in volumes["secrets"]["projected"]["sources"]
        for item in source["secret"]["items"]
    }
    assert secrets == {
        settings["token_file"]: (manifests()["Secret"]["metadata"]["name"], "token"),
        # kubectl create secret tls: the keys of a kubernetes.io/tls Secret.
        settings["tls_cert"]: ("pacsys-supervisor-tls", "tls.crt"),
        settings["tls_key"]: ("pacsys-supervisor-tls", "tls.key"),
    }
    assert Path(settings["audit_path"]).parent == Path(mounts["audit"])
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_probes_and_ports_name_the_services_health_checks():
    settings = container_settings()
    container = manifests()["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {
        "grpc": settings["port"],
        "grpc-plain": settings["plaintext_port"],
        "metrics": settings["metrics_port"],
    }
    assert settings["tls_cert"], "the service port serves TLS: the probes cannot ask it"
    assert container["livenessProbe"]["httpGet"] == {"port": "metrics", "path": "/healthz"}
    assert container["startupProbe"]["httpGet"] == {"port": "metrics", "path": "/healthz"}
    assert container["readinessProbe"]["httpGet"] == {"port": "metrics", "path": "/readyz"}
    for name in ("Service/pacsys-supervisor", "Service/pacsys-supervisor-pods"):
        service = manifests()[name]["spec"]
        assert service["selector"] == manifests()["Deployment"]["spec"]["selector"]["matchLabels"]
        assert {p["targetPort"] for p in service["ports"]} <= set(ports)
    # The headless Service: its name resolves to every ready pod (client-side fail-over).
    assert manifests()["Service/pacsys-supervisor-pods"]["spec"]["clusterIP"] == "None"
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
    settings = container_settings()
    for name in servers:
        mounted = [v.split(":")[0] for v in services[name]["volumes"] if v.startswith("./")]
        assert mounted and all((OPS / m).exists() for m in mounted), mounted
        assert services[name]["build"]["context"] == ".." and (REPO / services[name]["build"]["dockerfile"]).exists()
        # compose mounts each secret as /run/secrets/NAME: where the config reads them.
        given = {f"/run/secrets/{s}" for s in services[name]["secrets"]}
        assert {settings["token_file"], settings["tls_cert"], settings["tls_key"]} <= given
        # Streaming clients of the release reach each instance's plaintext listener directly.
        assert [p.split(":")[1] for p in services[name]["ports"]] == [str(settings["plaintext_port"])]
        # haproxy's fixed address is the one proxy whose x-forwarded-for the instances believe,
        # and it is not held to the per-address connection limit.
        environment = compose["x-supervisor"]["environment"]
        haproxy_address = services["haproxy"]["networks"]["pacsys"]["ipv4_address"]
        assert environment["PACSYS_SUPERVISOR_TRUSTED_PROXIES"] == haproxy_address
        assert environment["PACSYS_SUPERVISOR_CONNECTIONS_PER_ADDRESS_EXEMPT"] == haproxy_address
    subnet = compose["networks"]["pacsys"]["ipam"]["config"][0]["subnet"]
    assert ipaddress.ip_address(services["haproxy"]["networks"]["pacsys"]["ipv4_address"]) in ipaddress.ip_network(
        subnet
    )
    haproxy = dict(v.rsplit(":", 1)[0].split(":", 1) for v in services["haproxy"]["volumes"])
    assert (OPS / next(src for src, dst in haproxy.items() if dst.endswith("haproxy.cfg"))).resolve() == HAPROXY_CFG
    ca_file = re.search(r"\bca-file (\S+)", HAPROXY_CFG.read_text()).group(1)
    assert haproxy["./tls/ca.crt"] == ca_file


@NEEDS_OPENSSL
@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed (apt-get install haproxy)")
def test_haproxy_accepts_its_config_with_addresses_substituted(tmp_path):
    """`haproxy -c` on the shipped file would resolve pacsys-a and pacsys-b through the system's
    name servers: it is checked with loopback addresses (and a CA made here) instead, as the
    pair tests run it, and the substitution refuses to leave a name on a server line."""
    certificates = Certificates(tmp_path)
    servers = {"a": (50001, 9001), "b": (50002, 9002)}
    text = render_haproxy_cfg(HAPROXY_CFG.read_text(), 50051, 8404, servers, certificates.ca)
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(text)
    done = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    with pytest.raises(ValueError, match="name a host"):
        render_haproxy_cfg(HAPROXY_CFG.read_text(), 50051, 8404, {"a": (50001, 9001)}, certificates.ca)
