"""At daemon start: the job rows set from where their files are (issue 14, D5).

A job's file moves by one rename and its row by a second write; a daemon killed between the two
leaves them disagreeing (a file in ``failed/`` whose row says running forever). The folder is the
truth, so the row follows the file: in ``done/`` -> done, in ``failed/`` -> failed (or cancelled, as
its error file says), in a waiting folder -> queued at that priority, in ``processing/`` -> paused
(resumed first), except a trained job there: it waits for its version's gate (``daemon/gate.py``).
A run a finished job left open is closed from its ``result.json``.

``plan`` is pure (plain values in, the fixes out) so every case is unit-tested without a home;
``reconcile_spool`` gathers the values, applies each fix and records it as a ``spool_reconciled``
DB event. Runs after the start-up recovery of admissions and of trained jobs in processing/.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from daemon.admission import write_error
from management.db import Job, ModelDB, Run
from trainbox.atomic import read_json
from trainbox.home import Home
from trainbox.jobspec import RESULT, WorkerResult
from trainbox.spool import Spool
from trainbox.spool_states import DONE, FAILED, PROCESSING, WAITING, agrees, places
from trainbox.states import JobState

log = logging.getLogger("trainbox.daemon")
EVENT = "spool_reconciled"


@dataclass(frozen=True)
class JobFacts:
    """What start-up knows of one job: its row's state and priority (None: no row), the folders its file
    is in, whether its model version exists, and the class its error file names (in failed/ only)."""

    job_id: int
    state: str | None
    places: tuple[str, ...]
    has_version: bool = False
    priority: str | None = None
    error_class: str | None = None


@dataclass(frozen=True)
class Fix:
    """The row of ``job_id`` becomes ``state`` (and ``priority`` when set), because its file is in
    ``place``; ``close_run``: a finished job's last run is closed if it was left open."""

    job_id: int
    state: JobState
    was: str
    place: str
    priority: str | None = None
    close_run: bool = False

    @property
    def message(self) -> str:
        at = f" at priority {self.priority}" if self.priority and self.state == JobState.QUEUED else ""
        return f"row said {self.was}, file is in {self.place}/: row set to {self.state.value}{at}"


def plan(facts: list[JobFacts]) -> list[Fix]:
    """The row fixes that make every row agree with its file. A job without a row, in admitting/ (the
    admission recovery's), or in two places (``trainbox health`` reports it; no guess here) is left."""
    return [fix for fact in facts if (fix := _fix(fact)) is not None]


def _fix(f: JobFacts) -> Fix | None:
    if f.state is None or f.state == "admitting" or len(f.places) != 1:
        return None
    place = f.places[0]
    if place in WAITING:
        if f.state == JobState.QUEUED and f.priority == place:
            return None
        return Fix(f.job_id, JobState.QUEUED, f.state, place, priority=place)
    if agrees(f.state, place, f.has_version):
        return None
    if place == DONE:
        return Fix(f.job_id, JobState.DONE, f.state, place, close_run=True)
    if place == FAILED:
        state = JobState.CANCELLED if f.error_class == JobState.CANCELLED.value else JobState.FAILED
        return Fix(f.job_id, state, f.state, place, close_run=True)
    if place == PROCESSING and not f.has_version:  # a trained one waits for its gate: left alone
        return Fix(f.job_id, JobState.PAUSED, f.state, place)
    return None


# --- gathering and applying ----------------------------------------------------------------------


def gather(home: Home, db: ModelDB) -> list[JobFacts]:
    """The facts of every job with a row; error files are read only where a row may need one."""
    where = places(home)
    versions = {v.job_id for v in db.versions() if v.job_id is not None}
    spool = Spool(home)
    facts = []
    for job in db.jobs():
        job_places = tuple(where.get(job.id, ()))
        error_class = None
        if job_places == (FAILED,) and job.state not in (JobState.FAILED, JobState.REJECTED, JobState.CANCELLED):
            error_class = _error(spool, job.id).get("class")
        facts.append(JobFacts(job.id, job.state, job_places, job.id in versions, job.priority, error_class))
    return facts


def reconcile_spool(home: Home, db: ModelDB) -> list[Fix]:
    """Plan and apply; each fix is a DB event. Returns what was fixed (for the log)."""
    fixes = plan(gather(home, db))
    for fix in fixes:
        apply(home, db, fix)
        log.warning("job %d: %s", fix.job_id, fix.message)
    return fixes


def apply(home: Home, db: ModelDB, fix: Fix) -> None:
    spool = Spool(home)
    data_file = spool.find_job(fix.job_id, [home.done if fix.place == DONE else home.failed])
    at = _moved_at(data_file) if fix.close_run else time.time()
    error: dict[str, Any] = {}
    if fix.place == FAILED and data_file is not None:
        error = _error(spool, fix.job_id) or _write_missing_error(home, data_file, fix.job_id)
        at = float(error.get("time") or at)
    with db.session() as s:
        row = s.get(Job, fix.job_id)
        if row is None:
            return
        row.state = fix.state.value
        if fix.priority:
            row.priority = fix.priority
        if fix.state in (JobState.DONE, JobState.FAILED, JobState.CANCELLED):
            row.finished_at = row.finished_at or at
            row.retry_at = None
        else:
            row.finished_at = None
        if error:
            row.error = str(error.get("reason") or row.error or "")
            if fix.state == JobState.FAILED:
                row.failure_class = str(error.get("class") or row.failure_class or "crash")
        if fix.close_run:
            _close_last_run(s, fix, home.run_dir(fix.job_id), at, str(error.get("exit_status") or ""))
    db.event(EVENT, f"job {fix.job_id}: {fix.message}", fix.job_id, was=fix.was, place=fix.place, state=fix.state.value)


def _close_last_run(s: Session, fix: Fix, run_dir: Path, at: float, exit_status: str) -> None:
    """The last run, if a crash left it open, closed from what its worker wrote."""
    run = s.query(Run).filter(Run.job_id == fix.job_id).order_by(Run.id.desc()).first()
    if run is None or run.ended_at is not None:
        return
    try:
        result = WorkerResult.load(run_dir)
    except (OSError, ValueError):  # unreadable: the run still closes, without its numbers
        result = None
    try:
        run.ended_at = os.stat(run_dir / RESULT).st_mtime if result is not None else at
    except OSError:
        run.ended_at = at
    if fix.state == JobState.CANCELLED:
        run.outcome = JobState.CANCELLED.value
    elif result is not None:
        run.outcome = result.outcome.value
    else:
        run.outcome = "completed" if fix.state == JobState.DONE else "crashed"
    run.end_step = result.step if result is not None else run.end_step
    run.exit_status = exit_status or "unknown exit (closed at daemon start from the spool)"


def _moved_at(path: Path | None) -> float:
    """When the file was renamed into its folder: a rename changes the inode's ctime, not its mtime."""
    try:
        return os.stat(path).st_ctime if path is not None else time.time()
    except OSError:
        return time.time()


def _error(spool: Spool, job_id: int) -> dict[str, Any]:
    data_file = spool.find_job(job_id, [spool.home.failed])
    if data_file is None:
        return {}
    try:
        data = read_json(data_file.with_name(data_file.name + ".error.json"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_missing_error(home: Home, data_file: Path, job_id: int) -> dict[str, Any]:
    """A daemon killed between the move and the error file: every entry of failed/ says why, so one is
    written from the worker's result (its class and message), or says that nothing is known."""
    try:
        result = WorkerResult.load(home.run_dir(job_id))
    except (OSError, ValueError):
        result = None
    kind = (result.failure_class if result is not None else None) or "crash"
    reason = (result.message if result is not None else "") or "the worker's result is missing"
    reason = f"{reason} (filed by a daemon that stopped before writing why; recovered at the next start)"
    path = write_error(data_file, job_id, kind, reason)
    data = read_json(path)
    return data if isinstance(data, dict) else {}
