"""Run by the pacsys 0.3.0 release's interpreter (tests/release_venv.py), never imported here.

    python -I release_subscribe.py HOST PORT DRF SECONDS

Subscribes to DRF through the release's gRPC backend and prints one line per event, flushed:
``reading <value>`` for a reading, ``error <message>`` for an error the client reports.
Stops after SECONDS, or earlier when its standard input closes.
"""

import sys
import threading

import pacsys

host, port, drf, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
done = threading.Event()


def on_reading(reading, _handle):
    print(f"reading {reading.value}", flush=True)


def on_error(exc, _handle):
    print(f"error {str(exc).splitlines()[0]}", flush=True)


def watch_stdin():
    sys.stdin.read()
    done.set()


threading.Thread(target=watch_stdin, daemon=True).start()
with pacsys.grpc(host=host, port=port, timeout=5.0) as backend:
    handle = backend.subscribe([drf], callback=on_reading, on_error=on_error)
    done.wait(seconds)
    handle.stop()
print("end", flush=True)
