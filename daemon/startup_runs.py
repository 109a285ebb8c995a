"""What a starting daemon does about the runs its predecessor left (issue 14, D1, D6, D8), before any
worker of its own exists: stop the workers still alive (``daemon/orphans.py``), close every run row left
open, and sweep the leftovers of interrupted saves out of the run folders.

A run row without ``ended_at`` belonged to a worker the previous daemon never reaped. Left open it is
never a crash report, never counted, and reads as "running" forever. It is closed here with the
evidence there is: the outcome from the run's ``result.json`` when that file is the run's own; else
"interrupted" when this daemon stopped its worker with SIGTERM (trainbox's own stop, not the worker's
fault: a worker still importing dies of SIGTERM before it can write a result), "crashed" when it died
on its own or had to be killed (so the watchdog's crash scan, which reads closed runs whose outcome is
failed or crashed, writes its report), or "not_started" when nothing shows that a worker of that run
ever ran. The OOM kills while it ran are the counter's move since the run's row (an upper bound: the
worker's death is not timed). The exit
status is what stopping it showed, or that it is unknown (not our child: its exit status was its
parent's to read). ``exit_signal`` is SIGKILL when we had to kill it; otherwise both integers stay NULL.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from daemon.orphans import Orphan, job_of_run_dir, stop_orphans
from daemon.worker_process import STOPPED_BY_SIGTERM, Stopped
from management.db import ModelDB, Run
from trainbox import oom_counter, run_lock, run_temp
from trainbox.home import Home
from trainbox.jobspec import RESULT, WorkerResult
from trainbox.spool import Spool
from trainbox.states import WorkerOutcome

log = logging.getLogger("trainbox.daemon")
NOT_A_CHILD = "unknown: the worker was not a child of this daemon"
NEVER_RAN = "unknown: no worker of this run took the run folder's lock (the daemon stopped before starting it)"
RESULT_CLOCK_SLACK = 1.0  # seconds: a file system's clock may lag time.time() a little


@dataclass(frozen=True)
class Closing:
    """The end recorded for a run left open."""

    outcome: str
    exit_status: str
    exit_signal: int | None = None
    pid: int | None = None
    end_step: int | None = None


def closing(run_pid: int | None, result: WorkerResult | None, stop: tuple[int, Stopped] | None, ran: bool) -> Closing:
    """Pure: how to close a run from its pid (None: never recorded), its own result (None: it wrote
    none), how stopping its worker at start-up went (pid, how; None: none was found alive) and whether a
    worker of that run is known to have run (``ran``: a pid was recorded, or its lock was taken since)."""
    pid = run_pid or (stop[0] if stop is not None else None)
    if stop is not None:
        status = f"{stop[1].evidence} at the next daemon's start; exit status {NOT_A_CHILD}"
    elif pid is None and not ran:
        status = NEVER_RAN
    else:
        status = NOT_A_CHILD
    if result is not None:
        outcome = result.outcome.value
    elif pid is None and not ran:
        outcome = "not_started"
    elif stop is not None and stop[1].evidence == STOPPED_BY_SIGTERM:
        outcome = WorkerOutcome.INTERRUPTED.value
    else:
        outcome = "crashed"
    signal_ = stop[1].exit_signal if stop is not None else None
    return Closing(outcome, status, signal_, pid, result.step if result is not None else None)


def own_result(run_dir: Path, started_at: float) -> WorkerResult | None:
    """The run folder's ``result.json`` when it can be this run's: the daemon deletes it before each
    start, so only one written since the run's row (the caller checks the run is its job's newest)."""
    path = run_dir / RESULT
    try:
        if os.stat(path).st_mtime < started_at - RESULT_CLOCK_SLACK:
            return None
        return WorkerResult.load(run_dir)
    except (OSError, ValueError):
        return None  # none, or not readable: it says nothing


def _open(host: str | None) -> Any:
    """Run rows left open; in a fleet (``host``) only this host's: another host's are its own business
    (their pids are not processes here)."""
    q = select(Run).where(Run.ended_at.is_(None))
    return (q if host is None else q.where(Run.host == host)).order_by(Run.id)


def open_runs(db: ModelDB, host: str | None = None) -> list[Run]:
    with db.session() as s:
        return list(s.scalars(_open(host)))


def close_open_runs(
    home: Home, db: ModelDB, ended: list[tuple[Orphan, Stopped]], now: float, host: str | None = None
) -> list[int]:
    """Close every run row left open (see the module's docstring); returns their ids."""
    by_pid = {o.pid: (o.pid, how) for o, how in ended}
    by_job: dict[int, tuple[int, Stopped]] = {}
    for o, how in ended:
        by_job.setdefault(o.job_id, (o.pid, how))
    closed: list[tuple[Run, Closing]] = []
    with db.session() as s:
        newest = dict(s.execute(select(Run.job_id, func.max(Run.id)).group_by(Run.job_id)).all())
        for run in s.scalars(_open(host)):
            run_dir = home.run_dir(run.job_id)
            latest = newest.get(run.job_id) == run.id
            stop = by_pid.get(run.pid) if run.pid else (by_job.get(run.job_id) if latest else None)
            taken = run_lock.last_taken(run_dir) if latest else None
            ran = run.pid is not None or (taken is not None and taken >= run.started_at - RESULT_CLOCK_SLACK)
            result = own_result(run_dir, run.started_at) if latest else None
            c = closing(run.pid, result, stop, ran)
            run.ended_at, run.outcome, run.exit_status = now, c.outcome, c.exit_status
            run.exit_signal, run.pid = c.exit_signal, c.pid
            run.end_step = c.end_step if c.end_step is not None else run.end_step
            run.oom_kills = oom_counter.kills_since(run.oom_count_at_start) if c.outcome == "crashed" else None
            closed.append((run, c))
    for run, c in closed:
        message = f"run {run.id} (attempt {run.attempt}) left open by a previous daemon: {c.outcome}, {c.exit_status}"
        log.info("job %d: %s", run.job_id, message)
        db.event("run_closed", message, run.job_id, run_id=run.id, outcome=c.outcome, pid=c.pid)
    return [run.id for run, _ in closed]


def sweep_temp_folders(home: Home, db: ModelDB, jobs: set[int] | None = None) -> int:
    """Remove (or put back: a complete checkpoint) the temp folders of interrupted saves in every run
    folder whose lock is free, with a DB event each; returns how many were found. A folder whose lock
    a process still holds (one that could not be stopped) is left to it; ``jobs``: only those jobs' folders
    (a fleet's host sweeps what it ran, never a folder another host is writing)."""
    count = 0
    try:
        folders = sorted(p for p in home.runs.iterdir() if p.is_dir() and not p.is_symlink())
    except FileNotFoundError:
        return 0
    for run_dir in folders:
        if run_lock.holder(run_dir) is not None or (jobs is not None and job_of_run_dir(run_dir) not in jobs):
            continue
        for leftover in run_temp.sweep_run(run_dir):
            count += 1
            kind = "checkpoint_restored" if leftover.action == "restored" else "temp_removed"
            where = f" as {leftover.target.name}" if leftover.target is not None else ""
            name = leftover.path.relative_to(home.runs)
            message = f"leftover of an interrupted save {leftover.action}{where}: {name}"
            log.info(message)
            db.event(kind, message, job_of_run_dir(run_dir), path=str(leftover.path))
    return count


def recover_runs(home: Home, spool: Spool, db: ModelDB, stop_timeout: float, host: str | None = None) -> None:
    """The start-up sequence, in its one safe order: stop what still runs, then close the rows (their
    workers' ends are known now), then sweep (nothing writes in those folders any more). ``host``: a
    fleet's daemon, which recovers only the runs its host started."""
    runs = open_runs(db, host)
    ended = stop_orphans(home, spool, db, runs, stop_timeout, only_runs=host is not None)
    close_open_runs(home, db, ended, time.time(), host)
    sweep_temp_folders(home, db, None if host is None else {r.job_id for r in runs})
