"""The watchdog's crash scan: every run the daemon recorded as ended abnormally gets a crash report
(``safety/crash.py``) and a ``crash_report`` event, once; the host's OOM-kill counter is sampled when
a worker is first seen alive and again once it is seen gone, so a report can say whether the kernel's
OOM killer killed something while it ran (and a SIGKILL nobody in trainbox sent, when it did not, is
recorded as a deliberate kill).

The run's end comes from the integers the daemon stored (``Run.exit_code``, ``Run.exit_signal``);
the readable ``exit_status`` text is for display only.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from management.db import ModelDB, Run
from safety import crash
from trainbox import oom_counter
from trainbox.home import Home
from trainbox.processes import returncode_of
from trainbox.states import JobState

KEEP_ENDED = 256  # ended workers whose OOM counts are kept for their crash reports
EventSink = Callable[..., None]  # (kind, message, job_id, data, count=...)


class CrashScanner:
    def __init__(self, home: Home, db_ready: Callable[[], bool], db: Callable[[], ModelDB], event: EventSink) -> None:
        self.home = home
        self._db_ready, self._db, self._event = db_ready, db, event
        # per worker pid: its OOM counter file and count when first seen alive, and the count once seen gone
        self.oom_baseline: dict[int, tuple[Path, int | None]] = {}
        self.oom_at_end: dict[int, int | None] = {}
        self.analysed_runs: set[int] | None = None  # loaded with the DB

    def watch(self, pid: int) -> None:
        """A live worker seen: remember its OOM-kill counter (its cgroup's, found while it lives) once."""
        if pid not in self.oom_baseline:
            counter = oom_counter.oom_counter_file(pid)
            self.oom_baseline[pid] = (counter, oom_counter.oom_kill_count(counter))

    def observe(self, live: int | None) -> None:
        """The worker alive now (None: none): each worker seen before and gone since gets its counter read
        at once, so an OOM kill elsewhere after its death is not blamed on it."""
        for pid, (counter, _start) in self.oom_baseline.items():
            if pid != live and pid not in self.oom_at_end:
                self.oom_at_end[pid] = oom_counter.oom_kill_count(counter)
        if live and live in self.oom_at_end:  # a pid seen gone is alive again: another worker reuses it
            del self.oom_baseline[live], self.oom_at_end[live]
        while len(self.oom_at_end) > KEEP_ENDED:  # the oldest ended workers' runs were reported long ago
            oldest = next(iter(self.oom_at_end))
            del self.oom_at_end[oldest], self.oom_baseline[oldest]
        if live:
            self.watch(live)

    def oom_kills(self, pid: int | None) -> int | None:
        """The OOM kills while worker ``pid`` ran; None when not measured (the watchdog did not see it
        start, or the counter is unreadable): a kill is then not called deliberate."""
        if pid is None or pid not in self.oom_baseline:
            return None
        counter, start = self.oom_baseline[pid]
        end = self.oom_at_end[pid] if pid in self.oom_at_end else oom_counter.oom_kill_count(counter)
        return end - start if (start is not None and end is not None) else None

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
        oom = run.oom_kills if run.oom_kills is not None else self.oom_kills(run.pid)
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
