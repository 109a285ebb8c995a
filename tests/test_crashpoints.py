"""The chaos test's aimed kills: a point fires on its armed hit only, counted across processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from trainbox import crashpoints

PROGRAM = """
import sys
from trainbox.crashpoints import crash_point
for i in range(3):
    crash_point("version.renamed")
    print(i, flush=True)
"""


def _run(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, **env, "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.run([sys.executable, "-c", PROGRAM], env=full, capture_output=True, text=True, timeout=60)


def test_a_point_kills_on_its_armed_hit_counted_across_processes(tmp_path: Path) -> None:
    env = {crashpoints.CRASH_ENV: "version.renamed:2,version.renamed:4", crashpoints.CRASH_DIR_ENV: str(tmp_path)}
    first = _run(env)
    assert first.returncode == -signal.SIGKILL and first.stdout.split() == ["0"]
    second = _run(env)  # hits 3 and 4 in this process: dies at 4, the second of its own
    assert second.returncode == -signal.SIGKILL and second.stdout.split() == ["0"]
    third = _run(env)  # every armed hit has fired: runs through
    assert third.returncode == 0 and third.stdout.split() == ["0", "1", "2"]
    assert _run({}).returncode == 0


def test_unknown_points_fail_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="unknown crash point"):
        crashpoints.crash_point("version.renammed")
    monkeypatch.setenv(crashpoints.CRASH_ENV, "nowhere:1")
    with pytest.raises(ValueError, match="nowhere"):
        crashpoints.armed()
