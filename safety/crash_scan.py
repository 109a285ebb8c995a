"""The watchdog's crash scan: every run the daemon recorded as ended abnormally gets a crash report
(``safety/crash.py``) and a ``crash_report`` event, once; the host's OOM-kill counter is sampled when
a worker is first seen, so a report can say whether the kernel killed something while it ran.

The run's end comes from the integers the daemon stored (``Run.exit_code``, ``Run.exit_signal``);
the readable ``exit_status`` text is for display only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from management.db import ModelDB, Run
from safety import crash
from trainbox.home import Home
from trainbox.processes import returncode_of
from trainbox.states import JobState

EventSink = Callable[..., None]  # (kind, message, job_id, data, count=...)


class CrashScanner:
    def __init__(self, home: Home, db_ready: Callable[[], bool], db: Callable[[], ModelDB], event: EventSink) -> None:
        self.home = home
        self._db_ready, self._db, self._event = db_ready, db, event
        self.oom_baseline: dict[int, int | None] = {}
        self.analysed_runs: set[int] | None = None  # loaded with the DB

    def watch(self, pid: int) -> None:
        """A live worker seen: remember the OOM-kill counter at its start (once)."""
        if pid not in self.oom_baseline:
            self.oom_baseline[pid] = crash.oom_kill_count()

    def _analysed(self, db: ModelDB) -> set[int]:
        done = set()
        for ev in db.events(kind="crash_report"):
            run_id = (ev.data or {}).get("run_id")
            if isinstance(run_id, int):
                done.add(run_id)
        return done

    def scan(self, now: float) -> None:
        if not self._db_ready():
            return
        db = self._db()
        if self.analysed_runs is None:
            self.analysed_runs = self._analysed(db)
        with db.session() as s:
            runs = list(
                s.query(Run).filter(Run.ended_at.is_not(None), Run.outcome.in_(["failed", "crashed"])).order_by(Run.id)
            )
        for run in runs:
            if run.id in self.analysed_runs:
                continue
            self.analysed_runs.add(run.id)
            self._report(db, run, now)

    def _report(self, db: ModelDB, run: Run, now: float) -> None:
        job = db.job(run.job_id)
        baseline = self.oom_baseline.get(run.pid or -1)
        current = crash.oom_kill_count()
        oom = current - baseline if (baseline is not None and current is not None) else None
        report = crash.analyse_run(
            self.home.run_dir(run.job_id),
            returncode_of(run.exit_code, run.exit_signal),
            job_id=run.job_id,
            run_id=run.id,
            attempt=run.attempt,
            host_oom_kills=oom,
            stop_requested=job is not None and job.state == JobState.PAUSED.value,
            worker_pid=run.pid,
            now=now,
        )
        data: dict[str, Any] = report.to_json()
        data.pop("log_tail", None)
        self._event(
            "crash_report",
            f"{report.label}: {report.summary} -> {report.action}",
            run.job_id,
            data,
            count=False,
        )
