"""The systemd notify protocol (sd_notify), without libsystemd.

With `Type=notify`, systemd passes a datagram socket in $NOTIFY_SOCKET; the service
says READY=1 once it serves, STOPPING=1 when it starts draining, and, when the unit sets
WatchdogSec (systemd then passes $WATCHDOG_USEC), WATCHDOG=1 at half that interval for
as long as the front's event loop answers.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable

logger = logging.getLogger("pacsys.supervised")


def notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1") to systemd; False when not run under a notify unit."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
        return True
    except OSError as exc:
        logger.warning("event=systemd_notify_failed state=%s error=%s", state, exc)
        return False


def watchdog_interval() -> float | None:
    """Half the unit's WatchdogSec, in seconds, when systemd asked this process for pings."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


def start_watchdog(alive: Callable[[], bool], stop: threading.Event) -> threading.Thread | None:
    """Ping systemd's watchdog while `alive()` holds; a stuck front stops pinging and is restarted."""
    interval = watchdog_interval()
    if interval is None:
        return None

    def run() -> None:
        while not stop.wait(interval):
            if alive():
                notify("WATCHDOG=1")

    thread = threading.Thread(target=run, name="pacsys-watchdog", daemon=True)
    thread.start()
    return thread
