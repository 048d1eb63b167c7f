"""`SupervisedServer.run`: the library's blocking serve, stopped by a signal as the command is."""

import signal
import subprocess
import sys
import textwrap

import grpc

PROGRAM = textwrap.dedent(
    """
    import logging, sys
    from pacsys.supervised import SupervisedServer
    from pacsys.testing import demo_backend

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    server = SupervisedServer(demo_backend(), port=0, host="127.0.0.1")
    original = server.start
    def start(*a, **k):
        original(*a, **k)
        print(server.port, flush=True)
    server.start = start
    server.run()
    print("returned", flush=True)
    """
)


def test_run_serves_until_sigterm_and_returns():
    proc = subprocess.Popen([sys.executable, "-c", PROGRAM], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=10)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert out.strip() == "returned"
    assert "event=shutting_down signal=SIGTERM" in err and "event=server_stopped" in err
