"""A virtual environment with the pacsys release from the package index, for tests that run it.

`release_python()` creates it once per machine under `tests/.release-venv/` (gitignored),
installs `pacsys==0.3.0` with msgspec and protobuf, and returns its interpreter. Later
calls, in this process or another, reuse it. When it cannot be installed (no package index,
no network) the calling test is skipped with pip's reason; `.ci/run` makes sure it can.

The release depends on gssapi, which builds from source against Kerberos headers (and
fails without them, slowly); nothing a test does needs Kerberos, so the release is installed
without its dependencies, then the ones its import and its gRPC and fake backends need.
"""

from __future__ import annotations

import fcntl
import pathlib
import shutil
import subprocess
import sys
import venv

RELEASE = "pacsys==0.3.0"
# The release's own dependencies except gssapi and paramiko (Kerberos and SSH), and ours.
_WITHOUT_KERBEROS = [
    "numpy>=1.23",
    "httpx>=0.23",
    "grpcio>=1.80",
    "protobuf>=6.30",
    "pika>=1.2",
    "typing-extensions>=4.12",
]
_WORKER_NEEDS = ["msgspec", "protobuf"]

VENV = pathlib.Path(__file__).resolve().parent / ".release-venv"
_DONE = VENV / "installed.txt"  # written last: its presence means the venv is complete


def _python() -> pathlib.Path:
    return VENV / "bin" / "python"


def _pip(*args: str) -> subprocess.CompletedProcess:
    # Our own pip installs into the venv (--python): the venv needs no pip of its own.
    cmd = [sys.executable, "-m", "pip", "--python", str(_python()), "--disable-pip-version-check", "-q", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def _install() -> str | None:
    """Create and fill the venv; the reason it failed, or None."""
    shutil.rmtree(VENV, ignore_errors=True)
    venv.EnvBuilder(with_pip=False).create(VENV)
    for args in (["--no-deps", RELEASE], [*_WITHOUT_KERBEROS, *_WORKER_NEEDS]):
        done = _pip("install", *args)
        if done.returncode != 0:
            tail = [line for line in (done.stderr or done.stdout).splitlines() if "is ignored" not in line][-3:]
            return " / ".join(tail) or f"pip exited with {done.returncode}"
    return None


def build() -> str | None:
    """Make the venv once (under a lock: another process may be making it); why it failed, or None."""
    VENV.parent.mkdir(parents=True, exist_ok=True)
    with open(VENV.parent / ".release-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _DONE.exists():
            return None
        why = _install()
        if why is not None:
            shutil.rmtree(VENV, ignore_errors=True)
            return f"cannot install {RELEASE} into {VENV}: {why}"
        check = subprocess.run(
            [str(_python()), "-I", "-c", "import msgspec, pacsys.testing; print(pacsys.__file__)"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check.returncode != 0:
            shutil.rmtree(VENV, ignore_errors=True)
            return f"{RELEASE} installed into {VENV} but does not import: {check.stderr.strip()[-300:]}"
        _DONE.write_text(f"{RELEASE}\n{check.stdout}")
    return None


def release_python() -> pathlib.Path:
    """The interpreter of a venv where `import pacsys` is the release; skips the test if it cannot be made."""
    why = build()
    if why is not None:
        import pytest  # only here: .ci/run calls build() before pytest is installed

        pytest.skip(why)
    return _python()


if __name__ == "__main__":  # .ci/run: make it before the tests, and fail when it cannot be made
    failure = build()
    if failure is not None:
        sys.exit(failure)
    print(_python())
