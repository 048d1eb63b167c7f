"""Micro-benchmark of the DRF parser: microseconds per parse, uncached and cached.

Run: ``python benchmarks/bench_drf.py [--iterations N] [--repeats R]``.  Prints, per DRF, the best
of R timed loops of N parses each (best-of filters out noise from other processes), then the
mean over the whole mix.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pacsys.drf import canonical, parse, parse_cached  # noqa: E402

# A mix of what clients send: plain reads, periodic subscriptions, settings, ranges, fields,
# clock and state events, logger extras.
TYPICAL_DRFS = [
    "M:OUTTMP",
    "M:OUTTMP@I",
    "M:OUTTMP@p,1000",
    "G:AMANDA@P,10H",
    "M_OUTTMP.SETTING@N",
    "Z:ACLTST[0:10]@I",
    "B:HS23T.RAW@E,8F,H,100",
    "M|OUTTMP.STATUS.TEXT@Q,10H,T",
    "B:HS23T[3]@S,G:AMANDA,1,100,>=",
    "Z:ACLTST<-LOGGER:1000:2000",
]


def per_call_us(function: Callable[[str], object], text: str, iterations: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iterations):
            function(text)
        best = min(best, time.perf_counter() - start)
    return best / iterations * 1e6


def main() -> None:
    options = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    options.add_argument("--iterations", type=int, default=20_000, help="parses per timed loop")
    options.add_argument("--repeats", type=int, default=5, help="timed loops per DRF (the best counts)")
    args = options.parse_args()

    for text in TYPICAL_DRFS:  # warm up, and fill the cache
        parse(text)
        parse_cached(text)

    print(f"python {sys.version.split()[0]}, {args.iterations} parses x best of {args.repeats}")
    print(f"{'DRF':34} {'parse us':>9} {'cached us':>10} {'canonical us':>13}")
    totals = [0.0, 0.0, 0.0]
    for text in TYPICAL_DRFS:
        row = [
            per_call_us(parse, text, args.iterations, args.repeats),
            per_call_us(parse_cached, text, args.iterations, args.repeats),
            per_call_us(canonical, text, args.iterations, args.repeats),
        ]
        totals = [total + value for total, value in zip(totals, row, strict=True)]
        print(f"{text:34} {row[0]:9.2f} {row[1]:10.2f} {row[2]:13.2f}")
    count = len(TYPICAL_DRFS)
    print(f"{'mean over the mix':34} {totals[0] / count:9.2f} {totals[1] / count:10.2f} {totals[2] / count:13.2f}")


if __name__ == "__main__":
    main()
