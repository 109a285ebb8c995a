"""Job reports through the daemon's tick (stub worker, the real report child) and ``trainbox report N``:
every ended job gets ``runs/job-N/report.md`` and a copy beside its file in the spool; a report that
fails is an event, never a change of outcome; a request a stopped daemon left is written at the next
start; the CLI writes a missing report. ``report_on_a_recorded_run`` draws the plots of a hand-built run."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from daemon import served_child
from daemon.main import Daemon
from daemon.reports import REPORT_NICE
from management.db import Job, ModelDB, Run
from management.job_report import REPORT, REPORT_PENDING, generate
from tests.daemon_stubs import EVALUATE_ENTRY, daemon_factory, tick_until, worker_command
from trainbox.config import Settings, TrainingConfig
from trainbox.home import Home
from trainbox.jobspec import JobSpec

FAST = {"settle_seconds": 0.05, "rescan_interval": 0.05, "poll_interval": 0.05}
SETTINGS = Settings.model_validate({"daemon": FAST})


@pytest.fixture
def home(tmp_path: Path) -> Home:
    return Home(tmp_path / "home").ensure()


@pytest.fixture
def make_daemon(home: Home) -> Iterator[Callable[..., Daemon]]:
    yield from daemon_factory(home, SETTINGS)


def drop(home: Home, name: str) -> None:
    (home.inbox / name).write_text(json.dumps({"text": f"an example for {name}"}) + "\n")


def job_id(db: ModelDB, name: str) -> int:
    return next(j.id for j in db.jobs() if j.name == name)


def reported(home: Home, job: int) -> bool:
    run_dir = home.run_dir(job)
    return (run_dir / REPORT).is_file() and not (run_dir / REPORT_PENDING).exists()


def drawn_by(home: Home, job: int) -> str:
    """The pid of the report child that last drew the job's report (its log's last start line)."""
    return re.findall(r"kept child pid (\d+)", (home.run_dir(job) / "report.log").read_text())[-1]


def test_done_and_failed_jobs_get_reports_beside_their_files(home: Home, make_daemon: Callable[..., Daemon]) -> None:
    (home.root / "stub-plan.json").write_text(json.dumps({"b.jsonl": ["crash"]}))
    drop(home, "a.jsonl")
    drop(home, "b.jsonl")
    d = make_daemon(Settings.model_validate({"daemon": {**FAST, "max_retries": 0}}))
    assert d.db is not None
    db = d.db
    tick_until(d, lambda: len(db.jobs()) == 2 and all(reported(home, j.id) for j in db.jobs()), "two reports", 40)
    a, b = job_id(db, "a.jsonl"), job_id(db, "b.jsonl")
    done_copy = next(home.done.glob("*a.jsonl.report.md")).read_text()
    assert done_copy.startswith(f"# Job {a}: a.jsonl") and "**Outcome: done**" in done_copy
    assert "produced: version 1, promoted to current" in done_copy
    failed_copy = next(home.failed.glob("*b.jsonl.report.md")).read_text()
    assert "**Outcome: failed**" in failed_copy and failed_copy == (home.run_dir(b) / REPORT).read_text()
    assert d.spool.counts()["done"] == 1 and d.spool.find_job(a) == next(home.done.glob("*__a.jsonl"))
    assert drawn_by(home, a) == drawn_by(home, b)  # one child drew both: its imports paid once


def test_an_idle_report_child_ends_and_the_next_request_starts_another(
    home: Home, make_daemon: Callable[..., Daemon], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(served_child, "IDLE_S", 0.0)
    d = make_daemon()
    drop(home, "a.jsonl")
    tick_until(d, lambda: len(d.db.jobs()) == 1 and reported(home, d.db.jobs()[0].id), "the first report", 40)
    tick_until(d, lambda: d.reports.child.popen is None and not d.reports.child.retired, "the idle child ended, reaped")
    drop(home, "b.jsonl")
    tick_until(d, lambda: len(d.db.jobs()) == 2 and all(reported(home, j.id) for j in d.db.jobs()), "report 2", 40)
    first, second = (drawn_by(home, j.id) for j in d.db.jobs())
    assert first != second


def test_a_report_child_that_dies_is_an_event_and_the_job_stays_done(home: Home) -> None:
    d = Daemon(home, SETTINGS, worker_command, EVALUATE_ENTRY, report_entry="tests.daemon_stubs:report_dies")
    d.start()
    try:
        assert d.db is not None
        drop(home, "a.jsonl")
        tick_until(d, lambda: d.db is not None and bool(d.db.events(kind="report_failed")), "report_failed event")
        (event,) = d.db.events(kind="report_failed")
        job = d.db.job(event.job_id or 0)
        assert job is not None and job.state == "done" and any(home.done.glob("*a.jsonl"))
        assert "exit code 3" in event.message and "trainbox report" in event.message
        assert not (home.run_dir(job.id) / REPORT_PENDING).exists()  # not retried in a loop
        assert d.reports.child.popen is None
    finally:
        d.shutdown()


def test_a_request_left_by_a_stopped_daemon_is_written_at_the_next_start(
    home: Home, make_daemon: Callable[..., Daemon]
) -> None:
    d = Daemon(home, SETTINGS, worker_command, EVALUATE_ENTRY, report_entry="tests.daemon_stubs:report_hangs")
    d.start()
    try:
        drop(home, "a.jsonl")
        tick_until(d, lambda: d.reports.current is not None, "the report child started")
        job = d.reports.current.job_id if d.reports.current else 0
        assert d.reports.child.pid is not None
        assert os.getpriority(os.PRIO_PROCESS, d.reports.child.pid) == REPORT_NICE  # yields to training
    finally:
        d.shutdown()  # kills the child; its request stays
    assert (home.run_dir(job) / REPORT_PENDING).exists() and not (home.run_dir(job) / REPORT).exists()
    d2 = make_daemon()
    tick_until(d2, lambda: reported(home, job), "the report at the next start", timeout=40)


def test_the_kept_child_answers_each_request_and_a_failing_one_fails_alone(home: Home) -> None:
    """The real kept child over its pipes, serving the real report: a report that raises is answered with
    rc 1, its traceback in that job's log, and the same child draws the next; a line that is no request is
    skipped; the end of its stdin ends it."""
    db = ModelDB(home.db_url)
    try:
        record_run(home, db, 1)
        record_run(home, db, 2)
    finally:
        db.close()
    (home.run_dir(2) / REPORT).mkdir()  # report.md cannot be written

    def req(job: int) -> str:
        argv = [str(job), "--home", str(home.root)]
        return json.dumps({"argv": argv, "log": str(home.run_dir(job) / "report.log"), "label": "report"}) + "\n"

    out = subprocess.run(
        [sys.executable, "-m", "trainbox.child_server", "management.job_report:main", "--home", str(home.root)],
        input=(req(1) + req(2) + "not a request\n" + req(1)).encode(),
        capture_output=True,
        env={**os.environ, "MPLBACKEND": "Agg"},
        timeout=120,
        check=True,
    )
    assert [json.loads(line)["rc"] for line in out.stdout.decode().splitlines()] == [0, 1, 0]
    log2 = (home.run_dir(2) / "report.log").read_text()
    assert "Traceback" in log2 and "IsADirectoryError" in log2
    assert (home.run_dir(1) / "report.log").read_text().count("--- report start") == 2
    assert (home.run_dir(1) / REPORT).is_file()
    assert "not a request" in out.stderr.decode()  # between requests its output is the daemon's


def test_cli_report_writes_a_missing_report(home: Home) -> None:
    db = ModelDB(home.db_url)
    try:
        record_run(home, db, 1)
        result = CliRunner().invoke(app, ["report", "1", "--home", str(home.root)])
        assert result.exit_code == 0, result.output
        assert result.stdout.startswith("# Job 1: tiny.jsonl") and "**overfitting**: epochs 6 -> 2" in result.stdout
        assert (home.run_dir(1) / REPORT).is_file() and (home.run_dir(1) / "loss.png").is_file()
        missing = CliRunner().invoke(app, ["report", "7", "--home", str(home.root)])
        assert missing.exit_code == 1 and "no job 7" in missing.output
    finally:
        db.close()


def record_run(home: Home, db: ModelDB, job: int, epochs: float = 6.0) -> None:
    """A finished run as the daemon and worker leave it: rows, job.json, metrics.jsonl (20 steps an
    epoch; validation loss at its best at step 40, epoch 2, then rising while training loss falls)."""
    t0 = time.time() - 200
    run_dir = home.run_dir(job)
    run_dir.mkdir(parents=True, exist_ok=True)
    with db.session() as s:
        s.add(Job(id=job, name="tiny.jsonl", state="done", n_records=40, started_at=t0, finished_at=t0 + 90))
        s.add(Run(job_id=job, attempt=1, started_at=t0, ended_at=t0 + 90, outcome="completed"))
    spec = JobSpec(
        job_id=job,
        job_name="tiny.jsonl",
        data_file="tiny.jsonl",
        run_dir=str(run_dir),
        embedded_model_dir="embedded",
        status_file="status.json",
        db_url=home.db_url,
        training=TrainingConfig(epochs=epochs),
    )
    spec.save()
    lines = []
    for step in range(1, 121):
        t = t0 + 5 + step * 0.5
        lines.append(
            {"kind": "train", "step": step, "loss": 3 * math.exp(-step / 30) + 0.05, "lr": 2e-3, "grad_norm": 1.0,
             "tokens_per_s": 900.0, "epoch": step / 20, "time": t}
        )  # fmt: skip
        if step % 10 == 0:
            val = 2.0 - step / 100 if step <= 40 else 1.6 + (step - 40) / 100
            lines.append({"kind": "eval", "step": step, "val_loss": val, "time": t + 0.2})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_report_on_a_recorded_run_draws_its_plots_and_diff(home: Home) -> None:
    db = ModelDB(home.db_url)
    try:
        record_run(home, db, 1, epochs=2.0)
        record_run(home, db, 2, epochs=6.0)
        text = generate(home, db, 2).read_text()
    finally:
        db.close()
    for png in ("loss.png", "lr.png", "grad_norm.png", "tokens_per_s.png"):
        assert (home.run_dir(2) / png).read_bytes().startswith(b"\x89PNG"), png
        assert f"]({png})" in text
    assert "| epochs | 2 | 6 |" in text and "Settings that differ from job 1 (tiny.jsonl)" in text
    assert "validation loss rose after step 40" in text and "## Where the time went" in text
