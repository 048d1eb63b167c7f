"""Choosing the event loop: uvloop when it is installed (the front's CPU is the budget)."""

from __future__ import annotations

import asyncio


def new_event_loop(kind: str = "auto") -> asyncio.AbstractEventLoop:
    """A new loop of `kind`: "uvloop", "asyncio", or "auto" (uvloop if importable)."""
    if kind not in ("auto", "uvloop", "asyncio"):
        raise ValueError(f"event loop must be auto, uvloop or asyncio, got {kind!r}")
    if kind != "asyncio":
        try:
            import uvloop
        except ImportError:
            if kind == "uvloop":
                raise
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()
