"""The released pacsys client (`pacsys==0.3.0` from PyPI) in a virtual environment of its own.

Tests run the release's own client against this service to show that existing programs
work unchanged. The release is GPL: it is installed here for testing only, never imported
into this process and never copied into the repository.

The environment is made once per machine under `tests/.release-venv/` (gitignored) and
reused; a lock file keeps two test processes from building it at the same time. The
release depends on `gssapi` (Kerberos), which has no wheel for Linux and needs the krb5
headers and a compiler to build; nothing the gRPC client does uses it, so the release is
installed with all its other dependencies and without that one.
"""

from __future__ import annotations

import fcntl
import pathlib
import re
import subprocess
import sys
import venv

import pytest

RELEASE = "pacsys==0.3.0"
HERE = pathlib.Path(__file__).resolve().parent
VENV = HERE / ".release-venv"
INSTALL_TIMEOUT = 900.0
# Dependencies left out, and why (see the module's docstring).
LEFT_OUT = {"gssapi": "Kerberos: builds from source, unused by the gRPC client"}

# Prints the release's own dependencies (not its extras), one per line.
_LIST_REQUIREMENTS = """
import importlib.metadata as m
for r in m.requires("pacsys") or []:
    if "extra ==" not in r:
        print(r)
"""


def _python(env: pathlib.Path) -> pathlib.Path:
    return env / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")


def _run(*args: str | pathlib.Path) -> str:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=INSTALL_TIMEOUT, check=False)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(str(a) for a in args[:4])} ... failed:\n{tail}")
    return done.stdout


def _build() -> None:
    venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    python = _python(VENV)
    pip = (python, "-m", "pip", "install", "-q", "--disable-pip-version-check")
    _run(*pip, "--no-deps", RELEASE)
    wanted = []
    for line in _run(python, "-I", "-c", _LIST_REQUIREMENTS).splitlines():
        name = re.split(r"[\[<>=!~; ]", line, maxsplit=1)[0].lower()
        if name in LEFT_OUT:
            continue
        wanted.append(re.sub(r"\[[^\]]*\]", "", line))  # paramiko[gssapi] -> paramiko
    _run(*pip, *wanted)
    _run(python, "-I", "-c", "import pacsys.backends.grpc_backend")


def release_python() -> pathlib.Path:
    """The interpreter of a virtual environment holding the pacsys 0.3.0 release.

    Run it with ``-I`` (isolated: no PYTHONPATH, no current directory on the path), so that
    this repository's own ``pacsys`` package never shadows the release. Skips the calling
    test (with the reason) when the release cannot be installed here.
    """
    python = _python(VENV)
    done = VENV / ".complete"
    if done.exists() and python.exists():
        return python
    HERE.mkdir(exist_ok=True)
    with open(HERE / ".release-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (done.exists() and python.exists()):
            try:
                _build()
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
                pytest.skip(f"cannot install the pacsys release ({RELEASE}) in {VENV}: {exc}")
            done.write_text(RELEASE + "\n")
    return python
