"""A SIGKILL neither the daemon nor the watchdog sent (issue 14): killed from outside trainbox, recorded
as a deliberate kill when the kernel's OOM killer is ruled out by its counter ("unknown" when the
counter could not be read), and ``trainbox health`` reports a deliberate kill as information, not as a
warning for 24 h. Pure cases, then one real ``kill -9`` of a stub worker through the crash scan."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from daemon.main import Daemon
from daemon.outcome import JobVerdict, decide
from management.db import Job, ModelDB, Run
from safety import crash
from safety.checkup import Level, check_crashes
from safety.crash import CrashReport, write_report
from safety.crash_scan import CrashScanner
from tests.daemon_stubs import tick_until
from tests.test_daemon_tick import drop, home, make_daemon, plan  # noqa: F401
from trainbox import oom_counter
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


def _report(h: Home, job_id: int, detail: str, now: float) -> None:
    run_dir = h.run_dir(job_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    report = CrashReport(FailureClass.KILLED, f"killed ({detail})", "fix", "killed by signal 9", detail=detail)
    report.job_id, report.time = job_id, now
    write_report(run_dir, report)


def test_health_reports_a_deliberate_kill_as_information(tmp_path: Path) -> None:
    h = Home(tmp_path / "h").ensure()
    now = time.time()
    _report(h, 1, DELIBERATE_KILL, now - 60)
    check = check_crashes(h, now)
    assert check.level == Level.OK and DELIBERATE_KILL in check.detail
    _report(h, 2, EXTERNAL_KILL, now - 30)  # the OOM killer not ruled out: still a warning
    check = check_crashes(h, now)
    assert check.level == Level.WARNING and "job 2" in check.detail and "1 of them" in check.detail
    _report(h, 3, DELIBERATE_KILL, now - 10)  # a later deliberate kill does not hide it
    assert check_crashes(h, now).level == Level.WARNING and "job 2" in check_crashes(h, now).detail


def test_a_real_kill_9_of_a_worker_is_recorded_as_killed_from_outside(tmp_path: Path) -> None:
    h = Home(tmp_path / "h").ensure()
    db = ModelDB(h.db_url)
    events: list[dict[str, Any]] = []
    scanner = CrashScanner(h, lambda: True, lambda: db, lambda kind, message, job_id, data, count: events.append(data))
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "core.worker"])
    try:
        scanner.observe(worker.pid)  # the watchdog sees it alive: its OOM counter noted
        counter_readable = oom_counter.oom_kill_count(scanner.oom_baseline[worker.pid][0]) is not None
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
    assert crash.read_report(h.run_dir(1))["detail"] == expected  # type: ignore[index]
    level = check_crashes(h, time.time()).level
    assert level == (Level.OK if counter_readable else Level.WARNING)


def test_the_daemon_measures_the_oom_counter_so_a_kill_it_did_not_send_is_deliberate_without_a_watchdog(
    home: Home,  # noqa: F811
    make_daemon: Callable[..., Daemon],  # noqa: F811
) -> None:
    """No watchdog saw the worker: the daemon's own reading (at the run's row and at reaping) rules the
    OOM killer in or out, and the crash scan's report uses it (issue 14: aimed kills during a chaos run
    with no watchdog were left "unknown")."""
    counter_readable = oom_counter.oom_kill_count() is not None
    plan(home, {"a.jsonl": ["sigkill", "complete"]})
    drop(home, "a.jsonl")
    d = make_daemon()
    assert d.db is not None
    tick_until(d, lambda: any(r.ended_at for r in d.db.runs(1)), "the killed run reaped")  # type: ignore[union-attr]
    killed = d.db.runs(1)[0]
    assert (killed.exit_signal, killed.outcome) == (signal.SIGKILL, "crashed")
    assert killed.oom_count_at_start is not None or not counter_readable
    assert killed.oom_kills == (0 if counter_readable else None)
    events: list[dict[str, Any]] = []
    scanner = CrashScanner(home, lambda: True, lambda: d.db, lambda kind, m, job_id, data, count: events.append(data))  # type: ignore[arg-type,return-value]
    scanner.scan(time.time())
    assert [e["run_id"] for e in events] == [killed.id]
    assert events[0]["detail"] == (DELIBERATE_KILL if counter_readable else EXTERNAL_KILL)
