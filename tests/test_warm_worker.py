"""The warm worker (core/standby.py, daemon/standby.py): a job is handed to a worker started ahead,
the run names that worker before it learns its job, a daemon killed with -9 leaves no idle standby
behind, and a new daemon finds the warm worker that was training and stops it before resuming."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psutil
import pytest

from management.db import ModelDB
from tests.e2e_helpers import DaemonProc, make_home, wait_for, write_jsonl
from trainbox.home import Home
from trainbox.status import TRAINING_STATUS, TrainingStatus, read_status

pytestmark = pytest.mark.e2e


def _standby_of(daemon_pid: int, given: tuple[int, ...] = ()) -> int | None:
    """The daemon's waiting standby worker, if it has one (``given``: standbys handed a job already)."""
    try:
        children = psutil.Process(daemon_pid).children()
    except psutil.Error:
        return None
    for child in children:
        try:
            if "core.standby" in child.cmdline() and child.pid not in given:
                return child.pid
        except psutil.Error:
            continue
    return None


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _training_step(home: Home) -> int:
    status = read_status(home.status / TRAINING_STATUS, TrainingStatus)
    return status.step if status is not None and status.job_id == 1 else 0


def _drop(home_inbox: Path, name: str) -> None:
    write_jsonl(home_inbox / name, [{"text": f"{name}: the warm worker trains line {k}"} for k in range(24)])


def test_a_job_runs_in_the_warm_worker_and_a_killed_daemon_leaves_no_idle_one(tmp_path: Path, embedded: Path) -> None:
    home = make_home(tmp_path / "home", embedded, max_steps=4)
    home.config_file.write_text(home.config_file.read_text().replace("warm_worker = false", "warm_worker = true"))
    daemon = DaemonProc(home)
    try:
        idle = wait_for(lambda: _standby_of(daemon.proc.pid), 60, "a standby worker")
        os.kill(daemon.proc.pid, signal.SIGKILL)
        daemon.proc.wait(10)
        wait_for(lambda: _gone(idle), 60, "the idle standby dies with its daemon")

        daemon.log.close()
        daemon = DaemonProc(home, env={"TRAINBOX_TEST_STEP_SLEEP": "0.5"})
        warm = wait_for(lambda: _standby_of(daemon.proc.pid), 60, "a standby worker")
        (home.inbox / "b.toml").write_text("max_steps = 400\n")  # long enough for the daemon to die under it
        _drop(home.inbox, "b.jsonl")
        db = ModelDB(home.db_url)
        wait_for(lambda: [r.pid for r in db.runs(1)] == [warm], 60, "the job handed to the standby")
        wait_for(lambda: _training_step(home) >= 1, 120, "the job training")
        assert f"warm worker pid {warm} --run-dir {home.run_dir(1)}" in (home.run_dir(1) / "worker.log").read_text()
        os.kill(daemon.proc.pid, signal.SIGKILL)
        daemon.proc.wait(10)
        assert not _gone(warm)  # a standby given its job is a worker: it goes on without its daemon

        daemon.log.close()
        daemon = DaemonProc(home)
        wait_for(lambda: _gone(warm), 120, "the new daemon stops the orphaned warm worker")
        wait_for(lambda: len(db.runs(1)) == 2, 60, "the job resumed by a new worker")
        stopped = [e.message for e in db.events(kind="orphan_stopped")]
        assert any(f"pid {warm}" in m for m in stopped), stopped
        db.close()
    finally:
        daemon.stop()
