"""Run the pacsys release's public-API test files against this project and against the release.

    python tests/release_tests.py [--tests DIR] [FILE ...]

prints, for each test file, how many of its tests pass under this project's `pacsys` (this
interpreter) and under the release's (the venv of tests/release_venv.py), side by side.
It prints and never fails on the counts: a drop is read by a person, and the differences
that remain on purpose are listed in docs/supervised.md.

Where the tests come from: the release's source distribution on the package index is
downloaded into `tests/.release-tests/` (gitignored) and its tests are used when it ships
them. pacsys 0.3.0's does not, so the tests must be given with `--tests`: the `tests/`
directory of a checkout of the release's public repository. Without either, the script
says so and exits 0. Nothing of the release is ever copied into this repository: the files
are adapted in the gitignored directory, run there, and rewritten on every run.

The adaptation, so that one test's missing name fails that test rather than its whole
file: every import at a file's top level is split into one import per name, and a name that
does not import is bound to a stand-in that raises the ImportError when the test uses it
(its attributes are stand-ins too, so that a name used while tests are collected, in a
parametrize list, fails only the tests that use it).
The release's tests need numpy (this project does not) and the release's venv lacks pytest:
both are installed with `pip install --target` into the gitignored directory and put on
that interpreter's path only, so neither environment is changed.
"""

from __future__ import annotations

import argparse
import ast
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from release_venv import RELEASE, VENV, build  # noqa: E402

CACHE = Path(__file__).resolve().parent / ".release-tests"
# The release's test files at the level of its public API (the types, the subscription
# handles, the fakes, the device API, the audit log, the supervised server and its policies).
PUBLIC_API_FILES = (
    "test_types.py",
    "test_subscription.py",
    "test_testing.py",
    "test_device.py",
    "test_audit.py",
    "test_supervised_policies.py",
    "test_supervised.py",
)
_PER_FILE_TIMEOUT = 600  # seconds; a hung file is reported as such, and the next one runs

# Bound in each adapted file: a name that did not import, which fails the test that uses it.
_STAND_IN = """
class _NotImported:
    def __init__(self, name, error):
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_error", error)

    def _fail(self, *args, **kwargs):
        raise ImportError(f"{self._name} did not import: {self._error}")

    __call__ = __iter__ = __enter__ = _fail

    def __getattr__(self, attribute):
        # a private attribute is absent: pytest looks for its markers on every module name
        if attribute.startswith("_"):
            raise AttributeError(attribute)
        return _NotImported(f"{self._name}.{attribute}", self._error)

    def __mro_entries__(self, bases):
        self._fail()
"""


def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900)


def _sdist_tests() -> Path | None:
    """The tests/ directory of the release's source distribution, or None when it ships none."""
    unpacked = CACHE / "sdist"
    if not unpacked.exists():
        with tempfile.TemporaryDirectory() as download:
            _pip("download", "--no-deps", "--no-binary", ":all:", RELEASE, "-d", download)
            (archive,) = Path(download).glob("*.tar.gz")
            with tarfile.open(archive) as tar:
                tar.extractall(unpacked, filter="data")
    found = [path for path in unpacked.glob("*/tests") if path.is_dir()]
    return found[0] if found else None


def _library(name: str, *requirements: str) -> Path:
    """A directory holding `requirements`, installed once with pip --target."""
    target = CACHE / name
    done = target / ".installed"
    if not done.exists():
        shutil.rmtree(target, ignore_errors=True)
        _pip("install", "--target", str(target), *requirements)
        done.write_text(" ".join(requirements))
    return target


def _split_imports(node: ast.stmt) -> list[ast.stmt]:
    """One guarded import per name: `from m import a, b` becomes a try for a and one for b."""
    if isinstance(node, ast.ImportFrom):
        pieces = [ast.ImportFrom(node.module, [alias], node.level) for alias in node.names]
        bound = [alias.asname or alias.name for alias in node.names]
        shown = [f"{node.module}.{alias.name}" for alias in node.names]
    elif isinstance(node, ast.Import):
        pieces = [ast.Import([alias]) for alias in node.names]
        bound = [alias.asname or alias.name.partition(".")[0] for alias in node.names]
        shown = [alias.name for alias in node.names]
    else:
        return [node]
    guarded: list[ast.stmt] = []
    for piece, name, label in zip(pieces, bound, shown, strict=True):
        fallback = ast.parse(f"{name} = _NotImported({label!r}, _error)").body
        handler = ast.ExceptHandler(ast.Name("ImportError", ast.Load()), "_error", fallback)
        guarded.append(ast.Try([piece], [handler], [], []))
    return guarded


def _adapt(source: str) -> str:
    tree = ast.parse(source)
    body: list[ast.stmt] = []
    for node in tree.body:
        body.extend(_split_imports(node))
    future = [node for node in body if isinstance(node, ast.ImportFrom) and node.module == "__future__"]
    rest = [node for node in body if node not in future]
    tree.body = [*future, *ast.parse(_STAND_IN).body, *rest]
    return ast.unparse(ast.fix_missing_locations(tree))


def _count(python: Path, test_file: Path, library: Path, report: Path) -> str:
    """'passed/total' of one test file under one interpreter, or why it has no count."""
    env = {**os.environ, "PYTHONPATH": str(library), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", test_file.name]
    try:
        subprocess.run(cmd, cwd=test_file.parent, env=env, capture_output=True, timeout=_PER_FILE_TIMEOUT)
    except subprocess.TimeoutExpired:
        return f"timed out ({_PER_FILE_TIMEOUT} s)"
    if not report.exists():
        return "did not run"
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    total, failed, errors, skipped = (int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped"))
    return f"{total - failed - errors - skipped}/{total}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tests", type=Path, help="the release's tests/ directory (its sdist ships none)")
    parser.add_argument("files", nargs="*", default=list(PUBLIC_API_FILES), help="test files to run")
    args = parser.parse_args(argv)
    CACHE.mkdir(exist_ok=True)
    source = args.tests or _sdist_tests()
    if source is None:
        print(f"{RELEASE}: its source distribution ships no tests; pass --tests DIR (the release repository's tests/)")
        return 0
    why = build()
    if why is not None:
        print(why)
        return 0
    release = VENV / "bin" / "python"
    ours_library = _library("lib-ours", "numpy")
    release_library = _library("lib-release", "pytest")
    run = CACHE / "run"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir()
    (run / "pytest.ini").write_text("[pytest]\n")  # this directory is the root: no config of ours applies
    print(f"{'release test file':34} {'ours':>9} {'release':>9}")
    for name in args.files:
        original = source / name
        if not original.exists():
            print(f"{name:34} {'missing':>9}")
            continue
        adapted = run / name
        adapted.write_text(_adapt(original.read_text()))
        ours = _count(Path(sys.executable), adapted, ours_library, run / f"ours-{name}.xml")
        theirs = _count(release, adapted, release_library, run / f"release-{name}.xml")
        print(f"{name:34} {ours:>9} {theirs:>9}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
