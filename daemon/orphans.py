"""Workers this daemon did not start: found and stopped at start-up, waited out when one holds the
folder of the job the daemon wants to run (issue 14, D1).

A worker lives in its own session, so it outlives a daemon killed with -9. Its pid is in its run row,
unless the daemon died between committing the row and recording the pid (``JobRunner.start`` commits
the row first for that reason). A fresh daemon therefore looks three ways, for every job with an open
run or a file in ``processing/``: the run rows' pids, the holder of the run folder's lock
(``trainbox/run_lock.py``), and the process list (a worker still importing has not taken its lock
yet). Every pid is checked to be a process started for that run folder before it is signalled.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from daemon.worker_process import Stopped, run_processes, serves_run, stop_processes
from management.db import ModelDB, Run
from trainbox import run_lock
from trainbox.home import Home
from trainbox.processes import kill_tree
from trainbox.spool import Spool, job_id_of

log = logging.getLogger("trainbox.daemon")


@dataclass(frozen=True)
class Orphan:
    pid: int  # the process to stop: the worker, or the torchrun agent leading its group
    job_id: int
    found_by: str  # "run row", "lock", "process list"


def job_of_run_dir(run_dir: Path) -> int | None:
    """``runs/job-000042`` -> 42."""
    head, _, number = run_dir.name.partition("-")
    return int(number) if head == "job" and number.isdigit() else None


def lock_holder_pid(run_dir: Path) -> tuple[int | None, run_lock.LockHolder | None]:
    """The process to stop for a held run-folder lock (its group leader if that serves the run, else the
    holder itself), and the holder (None: the lock is free). None for a holder on another host (shared
    storage): its pids name processes there, and a local process that happens to have one is not it."""
    holder = run_lock.holder(run_dir)
    if holder is None:
        return None, None
    if not holder.here:
        return None, holder
    for pid in (holder.pgid, holder.pid):
        if serves_run(pid, run_dir):
            return pid, holder
    return None, holder


def find_orphans(
    home: Home, spool: Spool, open_runs: Iterable[Run], only_runs: bool = False
) -> tuple[list[Orphan], dict[int, int | None]]:
    """Live workers of this home's runs, each once, and the jobs whose run-folder lock is held by a
    process that is no worker of that run (job id -> its pid, if it wrote one): never signalled.
    ``only_runs``: a fleet's daemon looks at the jobs of ``open_runs`` (its host's) alone, never at a job
    in ``processing/`` that another host trains, nor at its processes when hosts share a machine."""
    found: dict[int, Orphan] = {}
    foreign: dict[int, int | None] = {}
    runs = list(open_runs)
    job_ids = {r.job_id for r in runs}
    if not only_runs:
        job_ids |= {j for j in (job_id_of(p.name) for p in spool.processing()) if j is not None}
    for run in runs:
        if run.pid and serves_run(run.pid, home.run_dir(run.job_id)):
            found.setdefault(run.pid, Orphan(run.pid, run.job_id, "run row"))
    for job_id in sorted(job_ids):
        pid, holder = lock_holder_pid(home.run_dir(job_id))
        if pid is not None:
            found.setdefault(pid, Orphan(pid, job_id, "lock"))
        elif holder is not None:
            foreign[job_id] = holder.pid
    for run_dir, pids in run_processes(home.runs).items():
        of_job = job_of_run_dir(run_dir)
        if of_job is None or (only_runs and of_job not in job_ids):
            continue
        for pid in pids:
            found.setdefault(pid, Orphan(pid, of_job, "process list"))
    return sorted(found.values(), key=lambda o: o.pid), foreign


def stop_orphans(
    home: Home, spool: Spool, db: ModelDB, open_runs: list[Run], timeout: float, only_runs: bool = False
) -> list[tuple[Orphan, Stopped]]:
    """Stop every worker a previous daemon left (SIGTERM: they checkpoint; SIGKILL after ``timeout``),
    all at once, before this daemon starts any; returns each with how it ended."""
    orphans, foreign = find_orphans(home, spool, open_runs, only_runs)
    for job_id, pid in foreign.items():
        message = f"run folder lock held by pid {pid or '?'}, which is no worker of this run: not stopped"
        log.warning("job %d: %s", job_id, message)
        db.event("run_lock_foreign", message, job_id, pid=pid)
    for o in orphans:
        log.warning("job %d: stopping worker pid %d of a previous daemon (found by %s)", o.job_id, o.pid, o.found_by)
    stopped = stop_processes([o.pid for o in orphans], timeout) if orphans else {}
    for o in orphans:
        end = stopped[o.pid]
        message = f"worker pid {o.pid} of a previous daemon (found by {o.found_by}): {end.evidence}"
        db.event("orphan_stopped", message, o.job_id, pid=o.pid, found_by=o.found_by)
    return [(o, stopped[o.pid]) for o in orphans]


@dataclass
class LockWait:
    """The job whose worker exited ``EXIT_LOCKED``: another process holds its run folder. No worker is
    dispatched while it does (a new one would only exit again, once a tick). A holder that serves that
    run folder gets one SIGTERM (it checkpoints) and, past the stop timeout, SIGKILL; any other holder
    is only waited for."""

    job_id: int
    run_dir: Path
    since: float
    signalled: int | None = None  # the pid sent SIGTERM
    killed: bool = False

    def holding(self, now: float, timeout: float) -> bool:
        """Whether the lock is still held (the daemon must not dispatch); signals the holder as above."""
        pid, holder = lock_holder_pid(self.run_dir)
        if holder is None:
            return False
        if pid is None:
            return True
        try:
            if self.signalled != pid:
                self.signalled, self.since, self.killed = pid, now, False
                os.kill(pid, signal.SIGTERM)
            elif not self.killed and now - self.since > timeout:
                self.killed = True
                kill_tree(pid)  # with torchrun's ranks, each in a session of its own
        except (ProcessLookupError, PermissionError):
            pass  # gone meanwhile (the next look says so), or not ours to signal
        return True
