"""A virtual environment with the pacsys release from the package index, for tests that run it.

`release_python()` creates it once per machine under `tests/.release-venv/` (gitignored) and
returns its interpreter. Later calls, in this process or another, reuse it. It is made by the
recipe that docs/supervised.md gives operators ("The release's backends in workers"), read
from that file and run as written: only its path `/opt/pacsys-release` is replaced by this
one, and `python3` by the interpreter running the tests. The recipe installs the release
without its dependencies, then the list in ops/release-backends.txt. A venv made by another
recipe, or from another list, is made again. When it cannot be installed (no package index,
no network) the calling test is skipped with pip's reason; `.ci/run` makes sure it can.
"""

from __future__ import annotations

import fcntl
import hashlib
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

RELEASE = "pacsys==0.3.0"
REPO = pathlib.Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "supervised.md"
REQUIREMENTS = REPO / "ops" / "release-backends.txt"
DOCS_VENV = "/opt/pacsys-release"  # the recipe's path

VENV = pathlib.Path(__file__).resolve().parent / ".release-venv"
_DONE = VENV / "installed.txt"  # written last: its presence means the venv is complete


def recipe() -> list[str]:
    """The command lines of the docs' recipe: the code block that starts with `python3 -m venv /opt/pacsys-release`."""
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", DOCS.read_text(), flags=re.M | re.S)
    for block in blocks:
        lines = [line for line in block.splitlines() if line.strip()]
        if lines and lines[0] == f"python3 -m venv {DOCS_VENV}":
            return lines
    raise AssertionError(f"{DOCS.name}: no code block starting with `python3 -m venv {DOCS_VENV}`")


def _as_run_here(line: str) -> str:
    """A recipe line with this machine's venv and interpreter."""
    line = line.replace(DOCS_VENV, shlex.quote(str(VENV)))
    return shlex.quote(sys.executable) + line[len("python3") :] if line.startswith("python3 ") else line


def _python() -> pathlib.Path:
    return VENV / "bin" / "python"


def _stamp(lines: list[str]) -> str:
    """What the venv was made from: the recipe and the list it installs."""
    return hashlib.sha256("\n".join(lines).encode() + REQUIREMENTS.read_bytes()).hexdigest()


def _install(lines: list[str]) -> str | None:
    """Create and fill the venv by the recipe; the reason it failed, or None."""
    shutil.rmtree(VENV, ignore_errors=True)
    for line in lines:
        done = subprocess.run(["bash", "-c", _as_run_here(line)], cwd=REPO, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            tail = [t for t in (done.stderr or done.stdout).splitlines() if "is ignored" not in t][-3:]
            return f"`{line}`: " + (" / ".join(tail) or f"exited with {done.returncode}")
    return None


def build() -> str | None:
    """Make the venv once (under a lock: another process may be making it); why it failed, or None."""
    VENV.parent.mkdir(parents=True, exist_ok=True)
    lines = recipe()
    stamp = _stamp(lines)
    with open(VENV.parent / ".release-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _DONE.exists() and _DONE.read_text().startswith(stamp):
            return None
        why = _install(lines)
        if why is not None:
            shutil.rmtree(VENV, ignore_errors=True)
            return f"cannot install {RELEASE} into {VENV} by the recipe of {DOCS.name}: {why}"
        check = subprocess.run(
            [str(_python()), "-I", "-c", "import msgspec, pacsys.testing; print(pacsys.__file__)"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check.returncode != 0:
            shutil.rmtree(VENV, ignore_errors=True)
            return f"{RELEASE} installed into {VENV} but does not import: {check.stderr.strip()[-300:]}"
        _DONE.write_text(f"{stamp}\n{RELEASE}\n{check.stdout}")
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
