"""Job reports, drawn by one child of the daemon that it keeps while requests come, started and reaped in its tick.

When a job ends for good (done after its gate, failed, cancelled) ``JobRunner`` asks for its report:
``request`` writes ``runs/job-N/report-pending.json`` before the job's file is filed, and ``Reports.tick``
hands the job id to the report child (``python -m management.report_server --home H``, output in
``runs/job-N/report.log``), one request at a time, and reads its answer in a later tick. Whatever the
answer, the request is then deleted: a failed report is a ``report_failed`` event naming its log, never a
change to the job's outcome, and is not retried in a loop (``trainbox report N`` writes it again).
A daemon that stops or dies with a request on disk writes that report at its next start: the requests are
listed once at start-up and then kept in memory, so the tick never lists ``runs/``.

The child is kept, not started per report: its imports cost about a second of CPU per report, three times
the drawing (management/report_server.py says why that matters). It is started at the first request, ended
(its stdin closed) after ``REPORT_IDLE_S`` without one or after ``REPORTS_PER_CHILD`` reports (whatever a
long-lived child leaks stays bounded), and killed when a report takes longer than ``REPORT_TIMEOUT_S`` or
the daemon stops; a child that dies fails the report in hand, and the next request starts another.
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
from dataclasses import dataclass, field
from pathlib import Path

from management.db import ModelDB
from management.job_report import DB_URL_ENV, REPORT_LOG, REPORT_PENDING
from management.report_server import parse_answer
from trainbox.atomic import atomic_write_json
from trainbox.home import Home
from trainbox.jobspec import JOB_SPEC
from trainbox.processes import child_env, describe_exit, kill_group

log = logging.getLogger("trainbox.daemon")

REPORT_TIMEOUT_S = 600.0  # a report of any run draws in seconds; past this the child is stuck
REPORT_IDLE_S = 120.0  # no request for this long: the child ends (its memory back; the next one starts again)
REPORTS_PER_CHILD = 100  # then a fresh child: whatever a long-lived one leaks stays bounded
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
    """The report child and what the daemon has of it: its answers arrive on ``popen.stdout``, read
    without blocking into ``buffer``."""

    popen: subprocess.Popen[bytes]
    last_used: float
    served: int = 0
    buffer: bytes = b""

    def send(self, job_id: int) -> bool:
        """Hand it a request; False if it is gone (its stdin closed under us)."""
        assert self.popen.stdin is not None
        try:
            self.popen.stdin.write(f"{job_id}\n".encode())
            self.popen.stdin.flush()
        except OSError:  # BrokenPipeError: it died; the caller sees it at its next poll
            return False
        return True

    def answers(self) -> list[str]:
        """Whole lines it has written so far, never waiting for more."""
        assert self.popen.stdout is not None
        try:
            chunk = os.read(self.popen.stdout.fileno(), 65536)
        except BlockingIOError:
            return []
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        return [line.decode("utf-8", errors="replace") for line in lines]

    def close(self) -> None:
        """End it gently: it finishes nothing (it has no request) and exits at the end of its stdin."""
        with contextlib.suppress(OSError):
            if self.popen.stdin is not None:
                self.popen.stdin.close()

    def kill(self) -> None:
        kill_group(self.popen)


@dataclass
class InHand:
    job_id: int
    run_dir: Path
    started_at: float


@dataclass
class Reports:
    """Pending report requests, the one being drawn and the child drawing it. ``program`` replaces
    ``python -m management.report_server`` (tests): it must serve the same protocol."""

    home: Home
    db: ModelDB
    program: list[str] | None = None
    db_url: str = ""  # the daemon's DB, handed to the child in its environment (never on its argv)
    child: ReportChild | None = None
    current: InHand | None = None
    pending: list[int] = field(default_factory=list)
    retired: list[subprocess.Popen[bytes]] = field(default_factory=list)  # closed children, reaped once they exit

    def __post_init__(self) -> None:
        self.program = self.program or [sys.executable, "-m", "management.report_server"]
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
        self.retired = [p for p in self.retired if p.poll() is None]
        if self.current is not None:
            self._check(self.current, now)
        if self.current is None and self.pending:
            self._start(self.pending.pop(0), now)
        child = self.child
        if self.current is None and child is not None and self._spent(child, now):
            child.close()
            self.retired.append(child.popen)
            self.child = None

    @staticmethod
    def _spent(child: ReportChild, now: float) -> bool:
        return child.served >= REPORTS_PER_CHILD or now - child.last_used > REPORT_IDLE_S

    def _spawn(self, now: float) -> ReportChild:
        assert self.program is not None
        env = {DB_URL_ENV: self.db_url} if self.db_url else None
        popen = subprocess.Popen(
            [*self.program, "--home", str(self.home.root)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,  # its answers; its stderr is ours (the daemon's log) between requests
            start_new_session=True,
            env=child_env(env, QUIET_ENV),
        )
        assert popen.stdout is not None
        os.set_blocking(popen.stdout.fileno(), False)
        with contextlib.suppress(OSError):  # gone already, or not permitted: it only runs at normal priority
            # right after the exec, before its imports start any thread (Linux: threads inherit the nice value)
            os.setpriority(os.PRIO_PROCESS, popen.pid, REPORT_NICE)
        return ReportChild(popen, now)

    def _start(self, job_id: int, now: float) -> None:
        run_dir = self.home.run_dir(job_id)
        child = self.child
        if child is None or child.popen.poll() is not None:
            try:
                child = self.child = self._spawn(now)
            except OSError as e:  # boundary: a report that cannot start is reported, the daemon goes on
                self._failed(job_id, run_dir, f"could not start: {e}")
                return
        child.send(job_id)  # a child that died meanwhile fails this request at the next tick
        child.last_used = now
        self.current = InHand(job_id, run_dir, now)

    def _check(self, req: InHand, now: float) -> None:
        child = self.child
        assert child is not None
        rc = child.popen.poll()  # first: whatever it answered before exiting is in the pipe when read below
        for line in child.answers():
            parsed = parse_answer(line)
            if parsed is None or parsed[0] != req.job_id:
                log.warning("report child: unexpected answer %r", line[:200])
                continue
            self._done(req, parsed[1], now)
            return
        if rc is not None:
            self.child = None
            self._done(req, f"the report child exited ({describe_exit(rc)}); the daemon's log has its output", now)
        elif now - req.started_at > REPORT_TIMEOUT_S:
            child.kill()
            self.child = None
            self._done(req, f"took longer than {REPORT_TIMEOUT_S:.0f} s: killed", now)

    def _done(self, req: InHand, failure: str | None, now: float) -> None:
        self.current = None
        if self.child is not None:
            self.child.served += 1
            self.child.last_used = now
        if failure is None:
            (req.run_dir / REPORT_PENDING).unlink(missing_ok=True)
            log.info("job %d: report written", req.job_id)
        else:
            self._failed(req.job_id, req.run_dir, failure)

    def _failed(self, job_id: int, run_dir: Path, why: str) -> None:
        (run_dir / REPORT_PENDING).unlink(missing_ok=True)
        message = f"job report not written ({why}): see {run_dir / REPORT_LOG}; `trainbox report {job_id}` retries"
        log.warning("job %d: %s", job_id, message)
        self.db.event("report_failed", message, job_id)

    def stop(self) -> None:
        """The daemon stops: the child is killed (its report in hand stays requested, for the next daemon)."""
        child, self.child, self.current = self.child, None, None
        if child is not None:
            child.kill()
        for popen in self.retired:
            kill_group(popen, wait=1.0)
        self.retired = []
