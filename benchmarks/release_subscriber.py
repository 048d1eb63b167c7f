"""A stream of the pacsys 0.3.0 release's own client, run in its own process and timed here.

`ReleaseSubscriber` runs tests/release_subscribe.py with the interpreter of a venv where
`import pacsys` is the release (tests/release_venv.py makes one), and timestamps each line it
prints as it arrives: readings, the errors the client reports, and the client's own log
lines (it logs "retrying in 1.0s" when it will subscribe again). Used by tests/test_pair.py,
tests/test_client_failover.py and benchmarks/bench_client_failover.py.
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SUBSCRIBER = REPO / "tests" / "release_subscribe.py"


class ReleaseSubscriber:
    """`pacsys.grpc(host=host, port=port).subscribe([drf])` in the release's interpreter; its output lines, timed.

    `host` may be anything the release accepts as a host: a name, an address, or a gRPC target
    prefix such as "ipv4:127.0.0.1:5001,127.0.0.1" (the release connects to f"{host}:{port}").
    """

    def __init__(self, python: Path, host: str, port: int, drf: str, seconds: float = 90.0):
        self.lines: list[tuple[float, str]] = []
        self.proc = subprocess.Popen(
            [str(python), "-I", str(SUBSCRIBER), host, str(port), drf, str(seconds)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=python.parent,  # -I and this cwd: the repository's pacsys must not shadow the release
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def reading_times(self) -> list[float]:
        return [t for t, line in list(self.lines) if line.startswith("reading ")]

    def readings(self, since: float = 0.0) -> int:
        return sum(1 for t in self.reading_times() if t >= since)

    def errors(self, since: float = 0.0) -> list[str]:
        return [line for t, line in list(self.lines) if t >= since and line.startswith("error ")]

    def longest_gap(self, since: float, until: float) -> float:
        """The longest wait between two readings from the last one before `since` to the last one before `until`."""
        times = self.reading_times()
        before = [t for t in times if t < since]
        span = before[-1:] + [t for t in times if since <= t < until]
        if len(span) < 2:
            return float("inf")
        return max(b - a for a, b in zip(span, span[1:], strict=False))

    def output(self) -> str:
        return "\n".join(line for _, line in list(self.lines))

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(5)

    def __enter__(self) -> ReleaseSubscriber:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
