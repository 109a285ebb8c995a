"""Rows set from where their files are (issue 14, D5): the pure planner case by case, a daemon restart
(driven through ``tick`` with stub workers) fixing rows a crash left behind their files, and ``trainbox
health`` naming the jobs whose row and file disagree. No torch: each test takes about a second."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from daemon.main import Daemon
from daemon.spool_reconcile import EVENT, Fix, JobFacts, plan
from management.db import Job, ModelDB, Run
from safety.checkup import Level, check_spool_db
from tests.daemon_stubs import daemon_factory, tick_until
from trainbox.config import Settings
from trainbox.crashpoints import CRASH_ENV
from trainbox.home import Home
from trainbox.spool_states import disagreement
from trainbox.states import JobState, Priority

FAST = {"settle_seconds": 0.05, "rescan_interval": 0.05, "poll_interval": 0.05, "max_retries": 0}


def _one(facts: JobFacts) -> Fix | None:
    fixes = plan([facts])
    assert len(fixes) <= 1
    return fixes[0] if fixes else None


@pytest.mark.parametrize("state", ["queued", "running", "paused"])
def test_an_unfinished_row_follows_its_file_into_done_or_failed(state: str) -> None:
    done = _one(JobFacts(1, state, ("done",), has_version=True))
    assert done is not None and done.state == JobState.DONE and done.close_run and done.was == state
    failed = _one(JobFacts(2, state, ("failed",), error_class="crash"))
    assert failed is not None and failed.state == JobState.FAILED and failed.close_run
    cancelled = _one(JobFacts(3, state, ("failed",), error_class="cancelled"))
    assert cancelled is not None and cancelled.state == JobState.CANCELLED
    unknown = _one(JobFacts(4, state, ("failed",)))  # no error file: failed, one is written
    assert unknown is not None and unknown.state == JobState.FAILED


@pytest.mark.parametrize("state", ["done", "failed", "cancelled", "rejected", "running", "paused"])
def test_a_file_waiting_in_a_queue_makes_its_row_queued_at_that_priority(state: str) -> None:
    fix = _one(JobFacts(5, state, ("high",), priority="normal"))
    assert fix is not None and (fix.state, fix.priority, fix.close_run) == (JobState.QUEUED, "high", False)
    assert "file is in high/" in fix.message


def test_a_queued_row_at_another_priority_takes_its_folder_s() -> None:
    fix = _one(JobFacts(6, "queued", ("low",), priority="high"))
    assert fix is not None and (fix.state, fix.priority) == (JobState.QUEUED, "low")
    assert _one(JobFacts(6, "queued", ("low",), priority="low")) is None


@pytest.mark.parametrize("state", ["done", "failed", "cancelled", "queued"])
def test_a_file_in_processing_pauses_its_row_unless_its_version_waits_for_its_gate(state: str) -> None:
    fix = _one(JobFacts(7, state, ("processing",)))
    assert fix is not None and fix.state == JobState.PAUSED and not fix.close_run
    assert _one(JobFacts(7, state, ("processing",), has_version=True)) is None


def test_rows_that_agree_or_cannot_be_judged_are_left_alone() -> None:
    left = [
        JobFacts(1, "done", ("done",)),
        JobFacts(2, "failed", ("failed",)),
        JobFacts(3, "rejected", ("failed",)),
        JobFacts(4, "cancelled", ("failed",)),
        JobFacts(5, "queued", ("normal",), priority="normal"),
        JobFacts(6, "running", ("processing",)),
        JobFacts(7, "paused", ("processing",)),
        JobFacts(8, "running", ("processing",), has_version=True),  # trained, its gate pending
        JobFacts(9, "done", ("processing",), has_version=True),  # filed row first, file next
        JobFacts(10, None, ("done",)),  # no row
        JobFacts(11, "admitting", ("admitting",)),  # the admission recovery's
        JobFacts(12, "running", ("processing", "done")),  # in two places: health reports it
        JobFacts(13, "done", ()),  # someone cleared done/
        JobFacts(14, "running", ()),  # no file: nothing to set the row from
    ]
    assert plan(left) == []


# --- a daemon restart fixes what a crash left -------------------------------------------------------


@pytest.fixture
def home(tmp_path: Path) -> Home:
    return Home(tmp_path / "home").ensure()


@pytest.fixture
def make_daemon(home: Home) -> Iterator[Callable[[], Daemon]]:
    yield from daemon_factory(home, Settings.model_validate({"daemon": FAST}))


def _drop(home: Home, name: str) -> None:
    (home.inbox / name).write_text(json.dumps({"text": f"an example for {name}"}) + "\n")


def _as_if_killed_before_the_row(db: ModelDB, job_id: int) -> None:
    """What a daemon killed at ``filing.moved`` leaves: the file filed, the row and its run still open."""
    with db.session() as s:
        row = s.get(Job, job_id)
        assert row is not None
        row.state, row.finished_at, row.error, row.failure_class = "running", None, None, None
        for run in s.query(Run).filter(Run.job_id == job_id):
            run.ended_at, run.outcome, run.exit_status, run.end_step = None, None, None, None


def test_a_restart_sets_rows_from_files_in_done_and_failed(home: Home, make_daemon: Callable[[], Daemon]) -> None:
    (home.root / "stub-plan.json").write_text(json.dumps({"b.jsonl": ["crash"], "c.jsonl": ["crash"]}))
    for name in ("a.jsonl", "b.jsonl", "c.jsonl"):
        _drop(home, name)
    d = make_daemon()
    db = d.db
    assert db is not None
    counts = d.spool.counts
    tick_until(d, lambda: (counts()["done"], counts()["failed"], d.worker) == (1, 2, None), "one done, two failed")
    ids = {j.name: j.id for j in db.jobs()}
    d.shutdown()
    for name in ids:
        _as_if_killed_before_the_row(db, ids[name])
    c_error = next(home.failed.glob(f"{ids['c.jsonl']:06d}__*.error.json"))
    c_error.unlink()  # killed before even the error file was written
    assert check_spool_db(home).level == Level.WARNING  # health sees it before any restart

    d2 = make_daemon()
    assert d2.db is not None
    jobs = {j.name: j for j in d2.db.jobs()}
    assert jobs["a.jsonl"].state == JobState.DONE and jobs["a.jsonl"].finished_at is not None
    assert jobs["b.jsonl"].state == JobState.FAILED and jobs["b.jsonl"].failure_class == "crash"
    assert "stub crash" in (jobs["b.jsonl"].error or "")
    assert jobs["c.jsonl"].state == JobState.FAILED and c_error.exists()  # rewritten from result.json
    assert json.loads(c_error.read_text())["class"] == "crash"
    runs = {name: d2.db.runs(job.id)[-1] for name, job in jobs.items()}
    assert runs["a.jsonl"].ended_at is not None and runs["a.jsonl"].outcome == "completed"
    assert runs["a.jsonl"].end_step == 3
    assert runs["b.jsonl"].ended_at is not None and runs["b.jsonl"].outcome == "failed"
    events = d2.db.events(kind=EVENT)
    assert sorted(e.job_id for e in events) == sorted(ids.values())
    assert all("file is in" in e.message for e in events)
    assert check_spool_db(home).level == Level.OK
    tick_until(d2, lambda: True, "a tick")  # nothing is dispatched again
    assert len((home.root / "stub-starts.txt").read_text().splitlines()) == 3


def test_health_names_the_jobs_whose_row_and_file_disagree(home: Home) -> None:
    db = ModelDB(home.db_url)
    try:
        for job_id, state, folder in (
            (1, "running", home.failed),
            (2, "done", home.done),
            (3, "done", home.waiting(Priority.NORMAL)),
        ):
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{job_id:06d}__x{job_id}.jsonl").write_text("{}\n")
            with db.session() as s:
                s.add(Job(id=job_id, name=f"x{job_id}.jsonl", state=state))
    finally:
        db.close()
    check = check_spool_db(home)
    assert check.level == Level.WARNING
    assert "job 1: row says running, file in failed/" in check.detail
    assert "job 3: row says done, file in normal/" in check.detail and "job 2" not in check.detail
    argv = [sys.executable, "-m", "cli", "health", "--json", "--home", str(home.root)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    checks = {c["name"]: c for c in json.loads(out.stdout)["checks"]}
    assert out.returncode >= 1 and checks["spool-db"]["level"] == "warning"
    assert "job(s) [1, 3] disagree" in checks["spool-db"]["detail"]


def test_health_judges_rows_against_files_by_the_same_rules() -> None:
    assert disagreement("running", ["failed"], False) == "row says running, file in failed/"
    assert disagreement("queued", [], False) == "row says queued, no file in the spool"
    assert disagreement("running", ["processing", "done"], False) == "file in processing and done"
    for agreeing in (
        ("done", [], False),  # someone cleared done/
        ("done", ["processing"], True),  # filed row first, its file next
        ("running", ["processing"], True),  # trained, its gate pending
        ("queued", ["admitting"], False),  # a batch's rows change before its renames
        ("admitting", ["admitting"], False),
        (None, ["done"], False),
        ("rejected", ["failed"], False),
    ):
        assert disagreement(*agreeing) == "", agreeing


# A daemon with stub children, run as its own process so the armed crash point can SIGKILL it.
STUB_DAEMON = """
import json, sys
from pathlib import Path
from daemon.main import Daemon
from tests.daemon_stubs import EVALUATE_ENTRY, worker_command
from trainbox.config import Settings
from trainbox.home import Home
settings = Settings.model_validate({"daemon": json.loads(sys.argv[2])})
Daemon(Home(Path(sys.argv[1])), settings, worker_command=worker_command, evaluate_entry=EVALUATE_ENTRY).run()
"""


def _killed_at_filing(home: Home) -> None:
    """Run a stub daemon armed at ``filing.moved`` until that point kills it (bounded)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), CRASH_ENV: "filing.moved"}
    argv = [sys.executable, "-c", STUB_DAEMON, str(home.root), json.dumps(FAST)]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


def test_daemons_killed_at_filing_moved_are_reconciled_at_restart(
    home: Home, make_daemon: Callable[[], Daemon]
) -> None:
    """The real crash point, both windows: a done job's row written, its file not yet moved; a failed
    job's file moved to failed/, neither its error file nor its row written."""
    (home.root / "stub-plan.json").write_text(json.dumps({"b.jsonl": ["crash"]}))
    _drop(home, "a.jsonl")
    _killed_at_filing(home)  # a: trained, gated, its row done, its file still in processing/
    assert len(list(home.processing.glob("*.jsonl"))) == 1
    d = make_daemon()
    assert d.db is not None and [j.state for j in d.db.jobs()] == [JobState.DONE]
    assert len(list(home.done.glob("*.jsonl"))) == 1 and check_spool_db(home).level == Level.OK
    tick_until(d, lambda: not d.gates.busy, "its gate's request dropped (the verdict was given)")
    d.shutdown()
    _drop(home, "b.jsonl")
    _killed_at_filing(home)  # b: crashed, no retries left, its file in failed/, its row running
    assert [p.name.endswith(".jsonl") for p in home.failed.iterdir()] == [True]  # no error file yet
    assert check_spool_db(home).level == Level.WARNING
    d = make_daemon()
    assert d.db is not None
    b = next(j for j in d.db.jobs() if j.name == "b.jsonl")
    assert (b.state, b.failure_class) == (JobState.FAILED, "crash") and "stub crash" in (b.error or "")
    assert d.spool.counts()["failed"] == 1 and check_spool_db(home).level == Level.OK
    assert [e.job_id for e in d.db.events(kind=EVENT)] == [b.id]
