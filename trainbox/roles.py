"""One loop contract for the long-running siblings (STYLE 1): ``loop(now)`` and ``shutdown()``.

The watchdog and retention each implement ``Role``; ``run_role`` owns the ``while`` loop, the
flag-only signal handlers (STYLE 3), the sd_notify READY/WATCHDOG/STOPPING messages, and calls
``shutdown()`` in a ``finally``. Passing ``now`` in keeps every decision testable without a clock.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType
from typing import Protocol

from trainbox import sdnotify

log = logging.getLogger("trainbox.roles")


class Role(Protocol):
    name: str
    interval: float

    def loop(self, now: float) -> None: ...

    def shutdown(self) -> None: ...


def run_role(role: Role, stop: threading.Event | None = None, once: bool = False) -> None:
    """Run ``role.loop(now)`` every ``role.interval`` seconds until SIGTERM/SIGINT (or ``stop``)."""
    stop = stop or threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    sdnotify.ready(f"{role.name} running")
    log.info("%s started", role.name)
    try:
        while not stop.is_set():
            try:
                role.loop(time.time())
            except Exception:  # boundary: one bad pass (a locked DB, a vanished file) must not end the role
                log.exception("%s: loop failed; trying again next interval", role.name)
            sdnotify.watchdog_ping()
            if once:
                break
            stop.wait(role.interval)
    finally:
        sdnotify.stopping()
        role.shutdown()
        log.info("%s stopped", role.name)
