"""`unready_exit`: a front whose workers cannot run drains and exits 4 for its service manager to restart it."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from helpers import wait_for

from pacsys.supervised.reporting import EXIT_UNREADY

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

REPO = Path(__file__).resolve().parent.parent


def test_no_worker_for_unready_limit_exits_with_status_4(tmp_path):
    flag = tmp_path / "broken"
    env = dict(os.environ, FAULT_FLAG=str(flag), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "tests"), str(REPO), env.get("PYTHONPATH")) if p)
    args = ["--backend", "fault_backends:broken_everywhere_when_flagged", "--workers", "2", "--port", "0"]
    args += ["--host", "127.0.0.1", "--unready-limit", "1", "--unready-exit", "--restart-backoff-initial", "0.05"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pacsys.supervised.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    try:
        assert "serving DAQ" in proc.stdout.readline()
        children = psutil.Process(proc.pid).children()
        wait_for(lambda: len(psutil.Process(proc.pid).children()) == 2, what="two workers")
        flag.touch()
        for child in psutil.Process(proc.pid).children():
            os.kill(child.pid, signal.SIGKILL)
        code = proc.wait(timeout=60)
        stderr = proc.stderr.read()
        assert code == EXIT_UNREADY == 4, stderr
        assert "event=unready_exit" in stderr
        for child in children:
            assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
