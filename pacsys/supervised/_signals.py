"""Signals handled by the main thread, each by the method named after it, as uvicorn's
supervisor does (SIGHUP by `handle_hup`, SIGTERM by `handle_term`).

The handler installed for a signal only queues it: it runs between two bytecodes of the main
thread, where little is safe. The main thread's loop (`SignalLoop.run`) takes the signals from
the queue one at a time and calls the owner's `handle_<name>()`; between signals it calls
`idle()` every `poll` seconds (has the server stopped? must the service give up?). Either
returns an exit status to end the loop, or None to go on. A second SIGINT or SIGTERM while the
owner is `stopping` is not queued: it does what it does without a handler, at once.

The command's service (`service.py`) and `SupervisedServer.run` both run this loop.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any, Protocol

__all__ = ["SignalLoop", "SignalOwner"]

logger = logging.getLogger("pacsys.supervised")


class SignalOwner(Protocol):
    """What the loop needs of its owner, besides one `handle_<name>()` method per signal."""

    #: True once a stop is under way: a second SIGINT or SIGTERM then ends the process at once.
    stopping: bool


class SignalLoop:
    """Queue `names` (``"INT"``, ``"HUP"`` ...) while installed, and hand them to `owner`."""

    def __init__(self, owner: SignalOwner, names: Iterable[str], poll: float = 0.5):
        self._owner = owner
        self._handlers: dict[int, Callable[[], int | None]] = {}
        for name in names:
            signum = getattr(signal, f"SIG{name}", None)
            if signum is not None:  # SIGTTIN and the like exist on POSIX only
                self._handlers[signum] = getattr(owner, f"handle_{name.lower()}")
        self._poll = poll
        self._queue: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            logger.warning("event=signals_not_handled reason=not_main_thread")
            return
        for signum in self._handlers:
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def restore(self) -> None:
        """Put back the handlers found at `install`."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def __enter__(self) -> SignalLoop:
        self.install()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.restore()

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        # Only queue it (SimpleQueue.put is reentrant).
        if signum in (signal.SIGINT, signal.SIGTERM) and self._owner.stopping:
            # A second termination signal while stopping: give up on a graceful stop.
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
        self._queue.put(signum)

    def run(self, idle: Callable[[], int | None]) -> int:
        """Hand each queued signal to its handler until one of them, or `idle()`, returns a status."""
        while True:
            try:
                signum = self._queue.get(timeout=self._poll)
            except queue.Empty:
                status = idle()
            else:
                status = self._handlers[signum]()
            if status is not None:
                return status
