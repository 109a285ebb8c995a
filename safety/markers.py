"""The watchdog's kill marker: ``runs/job-N/watchdog-kill.json``, written before it signals a hung
worker, so the daemon can tell a watchdog kill (resume from the last checkpoint) from a crash.

The marker names the worker's pid; it speaks only for that process, so a stale marker never
turns a later run's crash into a resume. The daemon reads it in ``JobRunner.finish``:
``read_kill_marker(run_dir, worker.pid)`` is not None -> treat the exit as an interruption.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainbox.atomic import atomic_write_json, read_json

KILL_MARKER = "watchdog-kill.json"


def write_kill_marker(run_dir: Path, evidence: dict[str, Any]) -> Path:
    path = Path(run_dir) / KILL_MARKER
    atomic_write_json(path, evidence)
    return path


def read_kill_marker(run_dir: Path, pid: int | None) -> dict[str, Any] | None:
    """The marker for worker ``pid`` (any pid when None), or None."""
    data = read_json(Path(run_dir) / KILL_MARKER)
    if not isinstance(data, dict):
        return None
    if pid is not None and data.get("pid") != pid:
        return None
    return data
