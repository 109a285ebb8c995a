"""``trainbox up`` with real children: all four start, the server URL is printed, a dead child is
restarted, ``trainbox health`` is ok, and SIGTERM stops the daemon first, then the rest."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e_helpers import cli, wait_for
from trainbox.home import Home

pytestmark = pytest.mark.e2e

CONFIG = """
[daemon]
poll_interval = 0.2
[server]
port = 0
[watchdog]
interval = 0.2
[retention]
interval = 1
"""


def _status(home: Home, name: str) -> dict:
    path = home.status / name
    return json.loads(path.read_text()) if path.exists() else {}


def test_up_runs_restarts_and_stops_in_order(tmp_path: Path) -> None:
    home = Home(tmp_path / "home").ensure()
    home.config_file.write_text(CONFIG)
    out_path = tmp_path / "up.out"
    with open(out_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "up", "--home", str(home.root)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        text = lambda: out_path.read_text()  # noqa: E731
        wait_for(lambda: "trainbox status server: http://127.0.0.1:" in text(), 60, "the server URL")
        wait_for(lambda: _status(home, "daemon.json").get("state") == "idle", 60, "daemon idle")
        wait_for(lambda: _status(home, "watchdog.json") and _status(home, "retention.json"), 30, "siblings")
        health = cli(home, "health", "--json", check=False)
        report = json.loads(health.stdout)
        assert health.returncode == 0, report
        assert {c["name"] for c in report["checks"]} >= {"daemon", "watchdog", "retention", "lock", "disk", "db"}
        assert report["status"] == "ok" and _status(home, "watchdog.json")["restart_owner"] == "trainbox up"
        old = _status(home, "watchdog.json")["pid"]
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: "watchdog exited (-9)" in text(), 10, "the supervisor to notice")
        wait_for(lambda: _status(home, "watchdog.json").get("pid") not in (None, old), 30, "watchdog restarted")
        daemon_pid = _status(home, "daemon.json")["pid"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        lines = text().splitlines()
        stop_lines = [line for line in lines if line.startswith("stopping ")]
        assert stop_lines[0].startswith("stopping daemon") and len(stop_lines) == 4
        assert _status(home, "daemon.json")["state"] == "stopped"
        with pytest.raises(ProcessLookupError):
            os.kill(daemon_pid, 0)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
