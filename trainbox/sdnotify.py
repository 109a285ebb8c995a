"""The sd_notify datagram protocol: tell systemd "ready", "still alive" and "stopping".

systemd (``Type=notify``) passes ``$NOTIFY_SOCKET``: a unix datagram socket path, or an abstract
socket name written with a leading '@' (the kernel's leading NUL byte). Each message is one datagram
of ``KEY=VALUE`` lines. Without the variable (not under systemd) every call is a no-op, so the
daemon and the siblings call these unconditionally. ``WatchdogSec`` sets ``$WATCHDOG_USEC``: the
service must send ``WATCHDOG=1`` more often than that or systemd kills and restarts it.
"""

from __future__ import annotations

import os
import socket

NOTIFY_SOCKET = "NOTIFY_SOCKET"


def _address(raw: str) -> str | bytes:
    return b"\0" + raw[1:].encode() if raw.startswith("@") else raw


def notify(*lines: str) -> bool:
    """Send ``lines`` (e.g. ``"READY=1"``) as one datagram; False when not under systemd or on error."""
    raw = os.environ.get(NOTIFY_SOCKET, "")
    if not raw or not lines:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(lines).encode(), _address(raw))
    except OSError:  # systemd gone or socket unreachable: being unsupervised is not an error
        return False
    return True


def ready(status: str = "") -> bool:
    return notify("READY=1", *([f"STATUS={status}"] if status else []))


def watchdog_ping() -> bool:
    return notify("WATCHDOG=1")


def stopping() -> bool:
    return notify("STOPPING=1")


def watchdog_interval() -> float | None:
    """Seconds systemd's watchdog allows between pings (``$WATCHDOG_USEC``), if it applies to us."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or (pid.isdigit() and int(pid) != os.getpid()):
        return None
    return int(usec) / 1e6


def under_systemd() -> bool:
    """systemd sets ``$INVOCATION_ID`` for every service it starts."""
    return bool(os.environ.get("INVOCATION_ID"))
