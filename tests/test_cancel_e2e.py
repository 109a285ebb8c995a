"""``trainbox cancel`` of a job that is training or paused, end to end: a real daemon, real workers on
the embedded tiny model, a real SQLite DB. The running worker stops at once through the stop path (it
checkpoints), is never restarted, and its file is filed as cancelled; the next job then trains. A
paused job is filed at once."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from management.db import ModelDB
from tests.e2e_helpers import DaemonProc, cli, make_home, wait_for, write_jsonl
from trainbox.atomic import read_json
from trainbox.home import Home
from trainbox.jobspec import WorkerResult
from trainbox.spool import job_id_of
from trainbox.states import Priority
from trainbox.status import DAEMON_STATUS, TRAINING_STATUS, pid_alive

pytestmark = pytest.mark.e2e


def _error(home: Home, job_id: int) -> dict[str, Any] | None:
    files = list(home.failed.glob(f"{job_id:06d}__*.error.json"))
    return json.loads(files[0].read_text()) if files else None


def _daemon(home: Home) -> dict[str, Any]:
    """The daemon's status file, read directly: polling through the CLI would start a Python per poll."""
    return read_json(home.status / DAEMON_STATUS) or {}


def _training(home: Home, job_id: int) -> int:
    """The step the worker of ``job_id`` reports (0 before it does)."""
    status = read_json(home.status / TRAINING_STATUS) or {}
    return int(status.get("step", 0)) if status.get("job_id") == job_id and status.get("phase") == "training" else 0


def _job_id(folder: Path, name: str) -> int | None:
    """The id of job ``name`` if its file is in ``folder`` (spool names start with the id)."""
    found = list(folder.glob(f"*__{name}"))
    return job_id_of(found[0].name) if found else None


def test_cancel_training_then_paused_job(tmp_path: Path, embedded: Path) -> None:
    home = make_home(tmp_path / "home", embedded, max_steps=400)
    daemon = DaemonProc(home, env={"TRAINBOX_TEST_STEP_SLEEP": "0.05"})
    db: ModelDB | None = None
    try:
        rows = [{"text": f"a fox runs in the wood {i % 7}"} for i in range(60)]
        write_jsonl(home.inbox / "high" / "first.jsonl", rows)
        first = wait_for(lambda: _job_id(home.processing, "first.jsonl"), 60, "the first job dispatched")
        wait_for(lambda: _training(home, first) >= 3, 120, "the first job training")
        write_jsonl(
            home.inbox / "low" / "second.jsonl", [{"text": f"a cat naps on the mat {i % 5}"} for i in range(60)]
        )
        second = wait_for(lambda: _job_id(home.waiting(Priority.LOW), "second.jsonl"), 30, "the second job waiting")
        worker_pid = _daemon(home)["worker_pid"]

        cli(home, "cancel", str(first))
        error = wait_for(lambda: _error(home, first), 60, "the first job filed as cancelled")
        assert error["class"] == "cancelled"
        # the request lands while it trains, or during the evaluation or the checkpoint every 10 steps
        reason = r"cancelled while (?:training|evaluating|checkpointing) at step (\d+), by a control request"
        m = re.fullmatch(reason, error["reason"])
        assert m is not None, error["reason"]
        step = int(m[1])
        assert step >= 3 and not pid_alive(worker_pid)
        result = WorkerResult.load(home.run_dir(first))  # it stopped through the stop path: checkpointed
        assert result is not None and result.step == step
        kept = Path(error["evidence"]["checkpoint"])
        assert kept.name == f"step-{step:08d}" and (kept / "COMPLETE").is_file()
        db = ModelDB(home.db_url)
        job = db.job(first)
        assert job is not None and job.state == "cancelled" and job.finished_at is not None
        (run,) = db.runs(first)  # closed, and never restarted
        assert run.ended_at is not None and run.outcome == "cancelled" and run.end_step == step

        wait_for(lambda: _training(home, second) >= 1, 120, "the next job training")
        assert len(db.runs(first)) == 1 and _job_id(home.processing, "first.jsonl") is None

        cli(home, "pause")
        wait_for(lambda: _daemon(home).get("state") == "paused", 60, "the daemon paused")
        paused_step = db.runs(second)[-1].end_step
        cli(home, "cancel", str(second))
        error = wait_for(lambda: _error(home, second), 30, "the paused job filed as cancelled")
        assert error["class"] == "cancelled"
        assert error["reason"] == f"cancelled while paused at step {paused_step}, by a control request"
        # the daemon writes the error file, then the row (daemon/jobs.py cancel_idle): the row within a tick
        wait_for(lambda: db.job(second).state == "cancelled", 10, "the paused job's row cancelled")  # type: ignore[union-attr]
        wait_for(lambda: not list(home.control.glob("*.json")), 10, "every control request applied")
        assert not list(home.processing.iterdir()) and _daemon(home).get("worker_pid") is None
        messages = [e.message for e in db.events(kind="control") if e.job_id == first]
        # the same phases as the reason above: under load the request may be read while it evaluates
        stopping = rf"cancel job {first}: stopping its worker \((?:training|evaluating|checkpointing)\)"
        assert re.match(stopping, messages[0]), messages[0]
    finally:
        if db is not None:
            db.close()
        assert daemon.stop() == 0, daemon.log_text()
