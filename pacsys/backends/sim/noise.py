"""Deterministic noise and phases: pure functions of (seed, device name, clock time).

A hash, not a random generator: a generator's sequence depends on how many draws came before,
which concurrency changes; a hash gives the same value for the same inputs in every process.
"""

from __future__ import annotations

import hashlib
import math

NOISE_QUANTUM_PER_S = 1000  # the noise changes once per millisecond of the clock
TWO_PI = 2.0 * math.pi
_M64 = (1 << 64) - 1


def name_key(*parts: object) -> int:
    text = "\x1f".join(repr(p) if not isinstance(p, str) else p for p in parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def auto_phase(name: str) -> float:
    return (name_key("phase", name) >> 11) / float(1 << 53) * TWO_PI


def unit_noise(key: int, tick: int, element: int) -> float:
    """A uniform value in [-1, 1): a splitmix64-style hash of (device key, tick, element)."""
    z = (key ^ (tick * 0x9E3779B97F4A7C15) ^ ((element + 1) * 0xC2B2AE3D27D4EB4F)) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    z ^= z >> 31
    return z / 9223372036854775808.0 - 1.0
