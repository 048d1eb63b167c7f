"""/readyz and /healthz keep answering while the metrics port is flooded with silent connections.

A real `pacsys-supervisor` process; 100 connections that never send a request, held against
its metrics port by another process (tests/connection_flood.py) and reopened as soon as the
server closes them, from one address or spread over ten; meanwhile this process probes
/readyz and /healthz every 100 ms, as haproxy and a scraper would.
"""

import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from processes import FAKE, SERVING

FLOOD = Path(__file__).resolve().parent / "connection_flood.py"
PROBE_INTERVAL = 0.1
PROBE_TIMEOUT = 2.0  # haproxy's `timeout check` in ops/haproxy.cfg
FLOOD_SECONDS = 6.0
SOCKETS = 100


def _get(port: int, path: str) -> tuple[int, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=PROBE_TIMEOUT) as reply:
        return reply.status, reply.read().decode()


def _probe(port: int, stop: threading.Event, results: dict[str, list[bool]]) -> None:
    """Every PROBE_INTERVAL: /readyz, then /healthz; each result True when answered 200."""
    next_at = time.monotonic()
    while not stop.is_set():
        for path, body in (("/readyz", "ready\n"), ("/healthz", "ok\n")):
            try:
                results[path].append(_get(port, path) == (200, body))
            except OSError:  # refused, reset, timed out
                results[path].append(False)
        next_at += PROBE_INTERVAL
        stop.wait(max(0.0, next_at - time.monotonic()))


def _limits_hit(port: int) -> dict[str, float]:
    _, text = _get(port, "/metrics")
    return {m[1]: float(m[2]) for m in re.finditer(r'^pacsys_limits_hit_total\{limit="(\w+)"\} (\S+)$', text, re.M)}


@pytest.mark.parametrize(
    ("sources", "cap"),
    [
        (["127.0.0.1"], "metrics_max_connections_per_address"),  # the prober's own address, too
        ([f"127.0.0.{i}" for i in range(2, 12)], "metrics_max_connections"),
    ],
    ids=["one-address", "ten-addresses"],
)
def test_probes_answer_while_silent_connections_flood_the_metrics_port(supervisor, sources, cap):
    sup = supervisor(
        *FAKE,
        *("--host", "127.0.0.1", "--metrics-port", "0"),
        # Ten addresses x 8 connections exceed the 32 in all: both caps bite. The kernel hands
        # a silent connection over after about metrics_timeout: 1 s, so that they bite soon.
        *("--metrics-max-connections", "32", "--metrics-max-connections-per-address", "8", "--metrics-timeout", "1"),
    )
    port = int(re.search(r"metrics on port (\d+)", SERVING.match(sup.lines["stdout"][0]).group(3)).group(1))  # type: ignore[union-attr]
    flood = subprocess.Popen(
        [sys.executable, str(FLOOD), str(port), str(SOCKETS), str(FLOOD_SECONDS), *sources],
        stdout=subprocess.PIPE,
        text=True,
    )
    results: dict[str, list[bool]] = {"/readyz": [], "/healthz": []}
    stop = threading.Event()
    prober = threading.Thread(target=_probe, args=(port, stop, results))
    try:
        assert flood.stdout is not None and flood.stdout.readline() == "started\n"
        prober.start()
        out, _ = flood.communicate(timeout=FLOOD_SECONDS + 30)
    finally:
        stop.set()
        if prober.is_alive():
            prober.join(PROBE_TIMEOUT * 3)
        if flood.poll() is None:
            flood.kill()
            flood.wait(10)
    counts = dict(pair.split("=") for pair in out.split())
    limits = _limits_hit(port)
    figures = {path: (sum(r), len(r)) for path, r in results.items()}
    print(f"{sources[0]}..{sources[-1]}: answered {figures}; flood {counts}; limits_hit {limits}")
    # The flood was real: its connections were closed and reopened many times over, by the cap.
    assert int(counts["closed"]) >= 2 * SOCKETS and limits.get(cap, 0) >= SOCKETS
    for path, (answered, sent) in figures.items():
        assert sent >= 20, figures
        assert answered >= 0.9 * sent, f"{path} answered {answered} of {sent} probes"  # >= 99% measured
