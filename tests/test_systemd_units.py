"""sd_notify against a real unix datagram socket; unit files checked by systemd-analyze where available."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from trainbox import sdnotify
from trainbox.systemd import UNITS, install, render

REPO = Path(__file__).resolve().parent.parent


def _receive(sock: socket.socket) -> str:
    sock.settimeout(5)
    return sock.recv(4096).decode()


def test_notify_path_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert sdnotify.ready("daemon up")
        assert _receive(sock) == "READY=1\nSTATUS=daemon up"
        assert sdnotify.watchdog_ping()
        assert _receive(sock) == "WATCHDOG=1"


def test_notify_abstract_socket_and_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"trainbox-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.stopping()
        assert _receive(sock) == "STOPPING=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert sdnotify.watchdog_ping() is False  # not under systemd: a no-op


def test_daemon_sends_ready_and_watchdog_pings(tmp_path: Path) -> None:
    """A real daemon process with NOTIFY_SOCKET set: READY=1 at start, WATCHDOG=1 every tick."""
    path = tmp_path / "n.sock"
    home = tmp_path / "home"
    home.mkdir()
    (home / "trainbox.toml").write_text("[daemon]\npoll_interval = 0.1\n")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(30)
        proc = subprocess.Popen(
            [sys.executable, "-m", "trainbox.cli", "daemon", "--home", str(home)],
            env={**os.environ, "NOTIFY_SOCKET": str(path)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            messages = [sock.recv(4096).decode() for _ in range(3)]
        finally:
            proc.terminate()
            assert proc.wait(30) == 0
    assert messages[0].startswith("READY=1")
    assert "WATCHDOG=1" in messages[1:]


def test_units_render_and_ship_in_sync(tmp_path: Path) -> None:
    written = install(tmp_path / "home", user_mode=True, target_dir=tmp_path / "units", python="/usr/bin/python3")
    assert sorted(p.name for p in written) == sorted([*UNITS, "trainbox.target"])
    daemon = (tmp_path / "units" / "trainbox-daemon.service").read_text()
    for line in ("Type=notify", "Restart=on-failure", "KillSignal=SIGTERM", "WatchdogSec=", "TimeoutStopSec=300"):
        assert line in daemon
    assert f"--home {tmp_path / 'home'}" in daemon
    shipped = render("/opt/trainbox/.venv/bin/python", "/var/lib/trainbox", False, "trainbox")
    for name, text in shipped.items():
        assert (REPO / "scripts" / "systemd" / name).read_text() == text, f"scripts/systemd/{name} is stale"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed (apt: systemd)")
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    for name, text in render(sys.executable, str(tmp_path), False, None).items():
        (tmp_path / name).write_text(text)
    files = [str(tmp_path / n) for n in ("trainbox.target", *UNITS)]
    out = subprocess.run(["systemd-analyze", "verify", "--man=no", *files], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
