"""Job reports, drawn by a child the daemon keeps while requests come, handed them and read in its tick.

When a job ends for good (done after its gate, failed, cancelled) ``JobRunner`` asks for its report:
``request`` writes ``runs/job-N/report-pending.json`` before the job's file is filed, and ``Reports.tick``
hands ``management.job_report``'s ``main`` the job to its kept child (``daemon/served_child.py``; output in
``runs/job-N/report.log``), one request at a time, and reads its answer in a later tick. Whatever the
answer, the request is then deleted: a failed report is a ``report_failed`` event naming its log, never a
change to the job's outcome, and is not retried in a loop (``trainbox report N`` writes it again).
A daemon that stops or dies with a request on disk writes that report at its next start: the requests are
listed once at start-up and then kept in memory, so the tick never lists ``runs/``.
Kept, not started per report: a fresh child paid about a second of imports per report, three times the
drawing (``trainbox/child_server.py``). Reports never hold up dispatch: the next job trains while the last
one's report is drawn. Nor do they slow it: the child runs at the lowest CPU priority (``REPORT_NICE``), so
where every core trains (a fleet of one daemon per core, a busy CPU job) reports are drawn in the gaps and
may finish after their jobs are filed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from daemon.served_child import ServedChild
from management.db import ModelDB
from management.job_report import DB_URL_ENV, REPORT_LOG, REPORT_PENDING
from trainbox.atomic import atomic_write_json
from trainbox.home import Home
from trainbox.jobspec import JOB_SPEC

log = logging.getLogger("trainbox.daemon")

REPORT_ENTRY = "management.job_report:main"
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
class InHand:
    job_id: int
    run_dir: Path
    started_at: float


@dataclass
class Reports:
    """Pending report requests, the one being drawn, and the kept child drawing them. ``entry`` replaces
    ``management.job_report:main`` (tests)."""

    home: Home
    db: ModelDB
    entry: str | None = None
    db_url: str = ""  # the daemon's DB, handed to the child in its environment (never on its argv)
    current: InHand | None = None
    pending: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        env = {DB_URL_ENV: self.db_url} if self.db_url else {}
        self.child = ServedChild(self.entry or REPORT_ENTRY, self.home.root, env, QUIET_ENV, REPORT_NICE)
        self.pending = self._scan()

    def _scan(self) -> list[int]:
        found = []
        for path in self.home.runs.glob(f"job-*/{REPORT_PENDING}"):
            name = path.parent.name[4:]
            if name.isdigit():
                found.append(int(name))
        return sorted(found)

    def add(self, job_id: int) -> None:
        """A request was just written (``request``): draw it after those before it."""
        if job_id not in self.pending and (self.current is None or self.current.job_id != job_id):
            self.pending.append(job_id)

    def tick(self, now: float) -> None:
        if self.current is not None:
            self._check(self.current, now)
        if self.current is None and self.pending:
            self._start(self.pending.pop(0), now)
        self.child.tick(now)

    def _start(self, job_id: int, now: float) -> None:
        run_dir = self.home.run_dir(job_id)
        argv = [str(job_id), "--home", str(self.home.root)]
        try:
            self.child.submit(argv, run_dir / REPORT_LOG, "report", now)
        except OSError as e:  # boundary: a report that cannot start is reported, the daemon goes on
            self._failed(job_id, run_dir, f"could not start: {e}")
            return
        self.current = InHand(job_id, run_dir, now)

    def _check(self, req: InHand, now: float) -> None:
        answer = self.child.answer()
        if answer is None:
            if now - req.started_at <= REPORT_TIMEOUT_S:
                return
            self.child.kill()
            why = f"took longer than {REPORT_TIMEOUT_S:.0f} s: killed"
        else:
            why = answer.why
        self.current = None
        if not why:
            (req.run_dir / REPORT_PENDING).unlink(missing_ok=True)
            log.info("job %d: report written", req.job_id)
        else:
            self._failed(req.job_id, req.run_dir, why)

    def _failed(self, job_id: int, run_dir: Path, why: str) -> None:
        (run_dir / REPORT_PENDING).unlink(missing_ok=True)
        message = f"job report not written ({why}): see {run_dir / REPORT_LOG}; `trainbox report {job_id}` retries"
        log.warning("job %d: %s", job_id, message)
        self.db.event("report_failed", message, job_id)

    def stop(self) -> None:
        """The daemon stops: the child is killed (its report in hand stays requested, for the next daemon)."""
        self.current = None
        self.child.kill()
