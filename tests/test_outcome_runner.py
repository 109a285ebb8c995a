"""The daemon's reaping wired to the decision, with real processes, real signals, a real SQLite DB and a
real spool (no daemon loop, no torch): a job whose workers the watchdog kills as hung is retried from
its checkpoint, then filed as ``hang`` with every kill as evidence; a job in processing/ that no worker
runs is cancelled at once."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from daemon.jobs import JobRunner
from daemon.outcome import JobVerdict
from daemon.spool import move
from daemon.worker_process import WorkerProcess
from management.db import Job, ModelDB, Run
from trainbox.config import Settings
from trainbox.control import Action
from trainbox.home import Home
from trainbox.markers import KILL_HISTORY, write_kill_marker
from trainbox.spool import Spool
from trainbox.states import JobState, Priority
from trainbox.status import TRAINING_STATUS, TrainingStatus, write_status

JOB = 4


def _setup(tmp_path: Path) -> tuple[Home, ModelDB, JobRunner]:
    home = Home(tmp_path / "home").ensure()
    spool = Spool(home)
    spool.ensure()
    db = ModelDB(home.db_url)
    with db.session() as s:
        s.add(Job(id=JOB, name="big.jsonl", state=JobState.RUNNING.value, priority="normal"))
    (home.processing / f"{JOB:06d}__big.jsonl").write_text('{"text": "x"}\n')
    home.run_dir(JOB).mkdir(parents=True)
    return home, db, JobRunner(home, spool, db, Settings())


def _hung_worker(home: Home, db: ModelDB, kill_time: float) -> tuple[WorkerProcess, int]:
    """A real process the watchdog 'kills as hung': marker written first, then SIGKILL, as it does."""
    popen = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    with db.session() as s:
        s.add(Run(job_id=JOB, attempt=len(db.runs(JOB)) + 1, pid=popen.pid))
    status = TrainingStatus(job_id=JOB, phase="loading", pid=popen.pid, heartbeat=kill_time - 130)
    write_status(home.status / TRAINING_STATUS, status)
    evidence = {"pid": popen.pid, "job_id": JOB, "phase": "loading", "step": None, "time": kill_time}
    write_kill_marker(home.run_dir(JOB), {**evidence, "heartbeat_age_s": 130.0, "limit_s": 120.0})
    popen.send_signal(signal.SIGKILL)
    rc = popen.wait(10)
    return WorkerProcess(JOB, home.run_dir(JOB), popen, time.time()), rc


def test_watchdog_kills_are_retried_then_filed_as_hang(tmp_path: Path) -> None:
    home, db, runner = _setup(tmp_path)
    max_retries = runner.settings.daemon.max_retries
    for attempt in range(max_retries + 1):
        worker, rc = _hung_worker(home, db, 1000.0 + attempt)
        decision = runner.finish(worker, rc, stop_was_requested=False)
        job = db.job(JOB)
        assert job is not None and job.attempts == attempt + 1 and job.failure_class == "hang"
        if attempt < max_retries:  # back to its queue, resumed from its checkpoint after the back-off
            assert decision.verdict == JobVerdict.RETRY and job.state == JobState.QUEUED.value
            (waiting,) = home.waiting(Priority.NORMAL).glob("*.jsonl")
            move(waiting, home.processing)  # what dispatch does
    assert decision.verdict == JobVerdict.FAILED
    assert db.job(JOB).state == JobState.FAILED.value  # type: ignore[union-attr]
    assert not list(home.processing.iterdir()) and not list(home.waiting(Priority.NORMAL).iterdir())
    error = json.loads((home.failed / f"{JOB:06d}__big.jsonl.error.json").read_text())
    assert error["class"] == "hang" and "hung in loading" in error["reason"]
    assert error["evidence"]["phase"] == "loading" and error["evidence"]["heartbeat_age_s"] == 130.0
    assert [k["time"] for k in error["evidence"]["kills"]] == [1000.0 + a for a in range(max_retries + 1)]
    assert error["exit_status"] == "killed by signal 9 (SIGKILL)"
    assert len(json.loads((home.run_dir(JOB) / KILL_HISTORY).read_text())) == max_retries + 1
    assert all(r.ended_at is not None for r in db.runs(JOB))
    db.close()


def test_a_death_while_loading_names_the_phase(tmp_path: Path) -> None:
    home, db, runner = _setup(tmp_path)
    popen = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    write_status(home.status / TRAINING_STATUS, TrainingStatus(job_id=JOB, phase="loading", pid=popen.pid))
    popen.send_signal(signal.SIGKILL)
    rc = popen.wait(10)
    decision = runner.finish(WorkerProcess(JOB, home.run_dir(JOB), popen, time.time()), rc, stop_was_requested=False)
    assert decision.verdict == JobVerdict.RETRY and "while loading" in decision.reason  # no marker: not a hang
    assert decision.evidence["phase"] == "loading"
    db.close()


def test_cancel_a_paused_job_files_it_at_once(tmp_path: Path) -> None:
    home, db, runner = _setup(tmp_path)
    with db.session() as s:
        row = s.get(Job, JOB)
        assert row is not None
        row.state = JobState.PAUSED.value
        s.add(Run(job_id=JOB, attempt=1, pid=1, end_step=12, ended_at=time.time(), outcome="interrupted"))
        s.add(Run(job_id=JOB, attempt=2, pid=2))  # left open by a daemon that died
    done = home.run_dir(JOB) / "checkpoints" / "step-00000012"
    done.mkdir(parents=True)
    (done / "COMPLETE").write_text("")
    assert runner.change_waiting(JOB, Action.CANCEL, None) == "cancelled"
    error = json.loads((home.failed / f"{JOB:06d}__big.jsonl.error.json").read_text())
    assert error["class"] == "cancelled"
    assert error["reason"] == "cancelled while paused at step 12, by a control request"
    assert error["evidence"]["checkpoint"] == str(done) and done.is_dir()  # kept
    job = db.job(JOB)
    assert job is not None and job.state == JobState.CANCELLED.value and job.finished_at is not None
    assert all(r.ended_at is not None for r in db.runs(JOB)) and db.runs(JOB)[1].outcome == "cancelled"
    assert not list(home.processing.iterdir())
    db.close()
