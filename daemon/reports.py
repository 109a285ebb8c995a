"""Job reports as children of the daemon, started and reaped in its tick like the eval gate.

When a job ends for good (done after its gate, failed, cancelled) ``JobRunner`` asks for its report:
``request`` writes ``runs/job-N/report-pending.json`` before the job's file is filed, and
``Reports.tick`` starts ``python -m management.job_report N --home H`` (output in
``runs/job-N/report.log``), one at a time, and reaps it in a later tick. Whatever the child's exit,
the request is then deleted: a failed report is a ``report_failed`` event naming its log, never a
change to the job's outcome, and is not retried in a loop (``trainbox report N`` writes it again).
A daemon that stops or dies with a request on disk writes that report at its next start: the
requests are listed once at start-up and then kept in memory, so the tick never lists ``runs/``.
Reports never hold up dispatch: the next job trains while the last one's report is drawn. Nor do they slow
it: the child runs at the lowest CPU priority (``REPORT_NICE``), so where every core trains (a fleet of one
daemon per core, a busy CPU job) reports are drawn in the gaps and may finish after their jobs are filed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from management.db import ModelDB
from management.job_report import DB_URL_ENV, REPORT_LOG, REPORT_PENDING
from trainbox.atomic import atomic_write_json
from trainbox.home import Home
from trainbox.jobspec import JOB_SPEC
from trainbox.processes import describe_exit, kill_group, spawn_logged

log = logging.getLogger("trainbox.daemon")

REPORT_TIMEOUT_S = 600.0  # a report of any run draws in seconds; past this the child is stuck
QUIET_ENV = {"MPLBACKEND": "Agg", "TQDM_DISABLE": "1"}
REPORT_NICE = 19  # drawing a report is worth less than any training: it yields every core to the workers


def request(home: Home, job_id: int, reports: Reports | None) -> None:
    """A job ends for good: ask for its report before its file is filed, so a daemon killed in between
    still writes it at its next start. Only a job that got as far as a job.json has anything to report."""
    run_dir = home.run_dir(job_id)
    if not (run_dir / JOB_SPEC).is_file():
        return
    atomic_write_json(run_dir / REPORT_PENDING, {"job_id": job_id})
    if reports is not None:
        reports.add(job_id)


@dataclass
class ReportChild:
    job_id: int
    run_dir: Path
    popen: subprocess.Popen[bytes]
    started_at: float


class Reports:
    """Pending report requests and the one child drawing a report. ``program`` replaces
    ``python -m management.job_report`` (tests)."""

    def __init__(self, home: Home, db: ModelDB, program: list[str] | None = None, db_url: str = "") -> None:
        self.home, self.db = home, db
        self.db_url = db_url  # the daemon's DB, handed to the child in its environment (never on its argv)
        self.program = program or [sys.executable, "-m", "management.job_report"]
        self.child: ReportChild | None = None
        self.pending: list[int] = self._scan()

    def _scan(self) -> list[int]:
        found = []
        for path in self.home.runs.glob(f"job-*/{REPORT_PENDING}"):
            name = path.parent.name[4:]
            if name.isdigit():
                found.append(int(name))
        return sorted(found)

    def add(self, job_id: int) -> None:
        """A request was just written (``request``): draw it after those before it."""
        if job_id not in self.pending and (self.child is None or self.child.job_id != job_id):
            self.pending.append(job_id)

    def tick(self, now: float) -> None:
        if self.child is not None:
            self._check(self.child, now)
        if self.child is None and self.pending:
            self._start(self.pending.pop(0), now)

    def _start(self, job_id: int, now: float) -> None:
        run_dir = self.home.run_dir(job_id)
        argv = [*self.program, str(job_id), "--home", str(self.home.root)]
        try:
            env = {DB_URL_ENV: self.db_url} if self.db_url else None
            popen = spawn_logged(argv, run_dir / REPORT_LOG, env=env, label="report", defaults=QUIET_ENV)
        except OSError as e:  # boundary: a report that cannot start is reported, the daemon goes on
            self._failed(job_id, run_dir, f"could not start: {e}")
            return
        with contextlib.suppress(OSError):  # gone already, or not permitted: it only runs at normal priority
            # right after the exec, before its imports start any thread (Linux: threads inherit the nice value)
            os.setpriority(os.PRIO_PROCESS, popen.pid, REPORT_NICE)
        self.child = ReportChild(job_id, run_dir, popen, now)

    def _check(self, child: ReportChild, now: float) -> None:
        rc = child.popen.poll()
        if rc is None:
            if now - child.started_at <= REPORT_TIMEOUT_S:
                return
            self._kill(child)
            self.child = None
            self._failed(child.job_id, child.run_dir, f"took longer than {REPORT_TIMEOUT_S:.0f} s: killed")
            return
        self.child = None
        if rc == 0:
            (child.run_dir / REPORT_PENDING).unlink(missing_ok=True)
            log.info("job %d: report written", child.job_id)
        else:
            self._failed(child.job_id, child.run_dir, describe_exit(rc))

    def _failed(self, job_id: int, run_dir: Path, why: str) -> None:
        (run_dir / REPORT_PENDING).unlink(missing_ok=True)
        message = f"job report not written ({why}): see {run_dir / REPORT_LOG}; `trainbox report {job_id}` retries"
        log.warning("job %d: %s", job_id, message)
        self.db.event("report_failed", message, job_id)

    @staticmethod
    def _kill(child: ReportChild) -> None:
        kill_group(child.popen)

    def stop(self) -> None:
        """The daemon stops: the child is killed, its request stays for the next daemon."""
        child, self.child = self.child, None
        if child is not None:
            self._kill(child)
