"""A SIGKILL neither the daemon nor the watchdog sent (issue 14): killed from outside trainbox, recorded
as a deliberate kill when the kernel's OOM killer is ruled out by its counter ("unknown" when the
counter could not be read), and ``trainbox health`` reports a deliberate kill as information, not as a
warning for 24 h. Pure cases, then one real ``kill -9`` of a stub worker through the crash scan."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from daemon.outcome import JobVerdict, decide
from management.db import Job, ModelDB, Run
from safety import crash
from safety.checkup import Level, check_crashes
from safety.crash import CrashReport, write_report
from safety.crash_scan import CrashScanner
from trainbox.home import Home
from trainbox.outcomes import DELIBERATE_KILL, EXTERNAL_KILL, RunEnd, classify_end
from trainbox.states import FailureClass


def test_a_sigkill_from_outside_is_deliberate_only_when_the_oom_killer_is_ruled_out() -> None:
    ruled_out = classify_end(RunEnd(-9, phase="training", host_oom_kills=0))
    assert (ruled_out.failure_class, ruled_out.detail) == (FailureClass.KILLED, DELIBERATE_KILL)
    assert "outside trainbox" in ruled_out.reason and ruled_out.evidence["oom_killer"] == "ruled out"
    unknown = classify_end(RunEnd(-9, phase="training"))
    assert (unknown.failure_class, unknown.detail) == (FailureClass.KILLED, EXTERNAL_KILL)
    assert "unknown" in unknown.reason and unknown.evidence["oom_killer"] == "unknown"
    oom = classify_end(RunEnd(-9, host_oom_kills=1))
    assert oom.detail == "host_oom" and oom.evidence["oom_killer"] == "yes"
    # kills that trainbox sent are never someone else's
    asked = classify_end(RunEnd(-9, stop_requested=True, host_oom_kills=0))
    assert asked.failure_class is None and asked.detail == "stopped_on_request"
    hung = classify_end(RunEnd(-9, kills=[{"pid": 5, "phase": "training"}], host_oom_kills=0))
    assert hung.detail == "killed_by_watchdog"
    # the class (and so the retry) does not depend on whether the counter was read
    assert classify_end(RunEnd(-15, host_oom_kills=0)).detail == ""  # SIGTERM: not this rule
    decision = decide(None, -9, False, False, attempts=0, max_retries=2)
    assert decision.verdict == JobVerdict.RETRY and decision.failure_class == FailureClass.KILLED


def _report(home: Home, job_id: int, detail: str, now: float) -> None:
    run_dir = home.run_dir(job_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    report = CrashReport(FailureClass.KILLED, f"killed ({detail})", "fix", "killed by signal 9", detail=detail)
    report.job_id, report.time = job_id, now
    write_report(run_dir, report)


def test_health_reports_a_deliberate_kill_as_information(tmp_path: Path) -> None:
    home = Home(tmp_path / "home").ensure()
    now = time.time()
    _report(home, 1, DELIBERATE_KILL, now - 60)
    check = check_crashes(home, now)
    assert check.level == Level.OK and DELIBERATE_KILL in check.detail
    _report(home, 2, EXTERNAL_KILL, now - 30)  # the OOM killer not ruled out: still a warning
    check = check_crashes(home, now)
    assert check.level == Level.WARNING and "job 2" in check.detail and "1 of them" in check.detail
    _report(home, 3, DELIBERATE_KILL, now - 10)  # a later deliberate kill does not hide it
    assert check_crashes(home, now).level == Level.WARNING and "job 2" in check_crashes(home, now).detail


def test_a_real_kill_9_of_a_worker_is_recorded_as_killed_from_outside(tmp_path: Path) -> None:
    home = Home(tmp_path / "home").ensure()
    db = ModelDB(home.db_url)
    events: list[dict[str, Any]] = []
    scanner = CrashScanner(
        home, lambda: True, lambda: db, lambda kind, message, job_id, data, count: events.append(data)
    )
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "core.worker"])
    try:
        scanner.observe(worker.pid)  # the watchdog sees it alive: its OOM counter noted
        counter_readable = crash.oom_kill_count(scanner.oom_baseline[worker.pid][0]) is not None
        worker.kill()  # a user's kill -9
        rc = worker.wait(10)
        scanner.observe(None)  # seen gone: the counter read again at once
        with db.session() as s:
            s.add(Job(id=1, name="a.jsonl", state="queued"))
            s.add(Run(job_id=1, pid=worker.pid, ended_at=time.time(), outcome="crashed", exit_signal=-rc))
        scanner.scan(time.time())
    finally:
        db.close()
    assert rc == -9 and len(events) == 1
    expected = DELIBERATE_KILL if counter_readable else EXTERNAL_KILL
    assert events[0]["detail"] == expected and events[0]["failure_class"] == "killed"
    assert crash.read_report(home.run_dir(1))["detail"] == expected  # type: ignore[index]
    level = check_crashes(home, time.time()).level
    assert level == (Level.OK if counter_readable else Level.WARNING)
