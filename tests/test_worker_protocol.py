"""A worker started from other code than the front's is refused by its protocol version.

A replaced worker starts from whatever code is on disk then; an upgrade may have changed it
under a running front. The "interpreter" here (`worker_python`) runs the worker from a copy
of `workers/` whose PROTOCOL_VERSION differs while a flag file exists, else from this tree:
real worker processes, real frames.
"""

import logging
import os
import re
import shutil
import signal
import sys
from pathlib import Path

import pytest
from helpers import FAST, wait_for, worker_pids

from pacsys.pool.pool import WorkerPool, WorkerStartupError
from pacsys.supervised import SupervisedServer
from workers import protocol as p

ROOT = Path(__file__).resolve().parent.parent
OTHER = p.PROTOCOL_VERSION + 98


@pytest.fixture
def other_code(tmp_path):
    """(worker_python, flag): the worker runs the other version's code while `flag` exists."""
    other = tmp_path / "other"
    shutil.copytree(ROOT / "workers", other / "workers", ignore=shutil.ignore_patterns("__pycache__"))
    protocol = other / "workers" / "protocol.py"
    text, n = re.subn(r"^PROTOCOL_VERSION = \d+$", f"PROTOCOL_VERSION = {OTHER}", protocol.read_text(), flags=re.M)
    assert n == 1
    protocol.write_text(text)
    flag = tmp_path / "upgraded"
    python = tmp_path / "python"
    # Called as `python -I -c BOOTSTRAP ROOT CWD --fd N ...` (workers.worker.command).
    python.write_text(
        f"#!{sys.executable}\n"
        "import os, sys\n"
        f"root = {str(other)!r} if os.path.exists({str(flag)!r}) else sys.argv[4]\n"
        "sys.path.insert(0, root)\n"
        "from workers.worker import main\n"
        "main(sys.argv[sys.argv.index('--fd'):])\n"
    )
    python.chmod(0o755)
    return str(python), flag


def test_a_worker_of_another_protocol_fails_the_start(other_code):
    python, flag = other_code
    flag.touch()
    pool = WorkerPool(backend="sim", workers=1, worker_python=python, **FAST)
    server = SupervisedServer(pool, port=0, host="127.0.0.1", close_backend=True)
    with pytest.raises(WorkerStartupError, match=f"speaks worker protocol {OTHER}, this front {p.PROTOCOL_VERSION}"):
        server.start()


def test_a_replacement_of_another_protocol_is_refused_until_the_code_matches(running, other_code, caplog):
    python, flag = other_code
    r = running(workers=1, worker_python=python)
    assert len(r.read(["Z:SIM001@I"])) == 1
    (victim,) = worker_pids(r.pool)
    flag.touch()  # the code on disk changes under the running front
    with caplog.at_level(logging.ERROR, logger="pacsys.workers"):
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: r.pool.stats.exits_by_reason["startup_failed"] >= 1, what="a refused replacement")
    refused = [rec for rec in caplog.records if "worker_protocol_mismatch" in rec.getMessage()]
    assert refused and refused[0].levelno == logging.ERROR
    assert f"worker_protocol={OTHER}" in refused[0].getMessage()
    assert r.pool.ready_count == 0
    flag.unlink()  # the front's own code again: the slot's next restart serves
    wait_for(lambda: r.pool.ready_count == 1, timeout=30, what="a replacement of the front's protocol")
    assert len(r.read(["Z:SIM001@I"])) == 1
