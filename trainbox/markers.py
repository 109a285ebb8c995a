"""The watchdog's kill marker: ``runs/job-N/watchdog-kill.json``, written before it signals a hung
worker, so the daemon can tell a watchdog kill (a hang: an attempt of the job, resumed from the last
checkpoint while retries remain) from a crash or a pause.

The marker names the worker's pid; it speaks only for that process, so a stale marker never
turns a later run's crash into a hang. The daemon reads it in ``JobRunner.finish``:
``read_kill_marker(run_dir, worker.pid)`` is not None -> the watchdog killed this worker.

Beside it, ``runs/job-N/watchdog-kills.json`` keeps every kill of the job's workers (the marker holds
only the last), so a job failed for hanging again and again can show each kill as evidence. The
watchdog is the only writer of both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainbox.atomic import atomic_write_json, read_json

KILL_MARKER = "watchdog-kill.json"
KILL_HISTORY = "watchdog-kills.json"


def write_kill_marker(run_dir: Path, evidence: dict[str, Any]) -> Path:
    """The marker, and the same evidence added to the job's kill history (history first: a marker the
    daemon acts on is always in the history too)."""
    history = [k for k in kill_history(run_dir) if k.get("pid") != evidence.get("pid")]
    atomic_write_json(Path(run_dir) / KILL_HISTORY, [*history, evidence])
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


def kill_history(run_dir: Path) -> list[dict[str, Any]]:
    """Every watchdog kill of the job's workers, oldest first (one per pid); [] when there was none.
    An unreadable history is empty rather than an error: it is evidence, never a reason to stop."""
    try:
        data = read_json(Path(run_dir) / KILL_HISTORY)
    except (ValueError, OSError):
        return []
    if not isinstance(data, list):
        return []
    return [k for k in data if isinstance(k, dict)]


def kills_of(run_dir: Path, pid: int) -> list[dict[str, Any]]:
    """The job's kills up to and including worker ``pid``'s, which is last; [] when the watchdog did not
    kill that worker. A marker missing from the history (written by an older watchdog) still counts."""
    marker = read_kill_marker(run_dir, pid)
    if marker is None:
        return []
    return [*(k for k in kill_history(run_dir) if k.get("pid") != pid), marker]
