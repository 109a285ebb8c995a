"""The spine's promises, end to end: a real daemon process, a real watchdog observer on a real
inbox, real worker processes training the embedded tiny model, a real SQLite DB."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from management.db import ModelDB
from tests.e2e_helpers import DaemonProc, cli, make_home, metrics, wait_for, write_jsonl
from trainbox.data_stats import DataStats
from trainbox.home import Home
from trainbox.states import JobState

pytestmark = pytest.mark.e2e

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _queue_files(home: Home, folder: str) -> list[str]:
    return sorted(p.name for p in (home.queue / folder).glob("*.jsonl"))


def _db(home: Home) -> ModelDB:
    return ModelDB(home.db_url)


def test_three_formats_in_priority_order_chain_model_versions(tmp_path: Path, embedded: Path) -> None:
    home = make_home(tmp_path / "home", embedded, max_steps=30)
    cli(home, "pause")  # control works before the daemon runs: it starts paused
    daemon = DaemonProc(home)
    try:
        wait_for(lambda: daemon.status()["daemon"]["state"] == "paused", 30, "daemon to start paused")
        for name, prio in (("stories.jsonl", "low"), ("arithmetic.jsonl", "normal"), ("french_chat.jsonl", "high")):
            write_jsonl(home.inbox / prio / name, [json.loads(x) for x in (EXAMPLES / name).read_text().splitlines()])
        wait_for(
            lambda: (
                daemon.status()["queue"]["low"] + daemon.status()["queue"]["normal"] + daemon.status()["queue"]["high"]
                == 3
            ),
            30,
            "three admitted jobs",
        )
        assert daemon.status()["queue"]["processing"] == 0  # paused: nothing dispatched
        cli(home, "resume")
        wait_for(lambda: len(_queue_files(home, "done")) == 3, 240, "three jobs done")
        assert _queue_files(home, "failed") == [] and _queue_files(home, "processing") == []
        wait_for(lambda: len(list(home.done.glob("*.report.md"))) == 3, 60, "three job reports (issue 19)")
    finally:
        assert daemon.stop() == 0, daemon.log_text()

    db = _db(home)
    jobs = {j.name: j for j in db.jobs()}
    order = sorted(jobs.values(), key=lambda j: j.started_at or 0)
    assert [j.name for j in order] == ["french_chat.jsonl", "arithmetic.jsonl", "stories.jsonl"]
    versions = db.versions()
    assert [v.job_id for v in versions] == [j.id for j in order]
    assert [v.parent_id for v in versions] == [None, versions[0].id, versions[1].id]
    assert order[1].init_model == versions[0].path and order[2].init_model == versions[1].path
    for v in versions:
        assert Path(v.path, "config.json").exists() and v.val_loss is not None
    for job in order:
        evals = [m["val_loss"] for m in metrics(home.run_dir(job.id)) if m["kind"] == "eval"]
        assert len(evals) >= 2 and evals[-1] < evals[0], (job.name, evals)
        steps = [m["step"] for m in metrics(home.run_dir(job.id)) if m["kind"] == "train"]
        assert steps == list(range(1, 31))
    for job in order:  # issue 19: each job's report with its plots, and its copy beside the file in done/
        run_dir = home.run_dir(job.id)
        text = (run_dir / "report.md").read_text()
        assert text.startswith(f"# Job {job.id}: {job.name}") and "**Outcome: done**" in text and "## Diagnosis" in text
        for png in ("loss.png", "lr.png", "grad_norm.png", "tokens_per_s.png"):
            assert (run_dir / png).read_bytes().startswith(b"\x89PNG") and f"]({png})" in text, png
        (copy,) = home.done.glob(f"*__{job.name}.report.md")
        assert f"](../../runs/{run_dir.name}/loss.png)" in copy.read_text()
        stats = DataStats.load(run_dir)  # the worker's data counts and per-example losses
        assert stats is not None and stats.example_losses is not None
        assert stats.example_losses.scored == stats.train_examples > 0
    assert "Settings that differ" not in (home.run_dir(order[1].id) / "report.md").read_text()  # same settings
    db.close()
    out = cli(home, "models").stdout
    assert all(str(v.id) in out for v in versions)


def test_malformed_file_fails_with_lines_and_duplicate_is_not_trained(tmp_path: Path, embedded: Path) -> None:
    home = make_home(tmp_path / "home", embedded, max_steps=10)
    daemon = DaemonProc(home)
    try:
        rows = [json.dumps({"text": f"sentence number {i}"}) for i in range(20)]
        rows[6] = '{"text": "unterminated'
        rows[11] = json.dumps({"prompt": "where is the completion?"})
        (home.inbox / "broken.jsonl").write_text("\n".join(rows) + "\n")
        good = [{"text": f"the cat sat on mat {i}"} for i in range(40)]
        write_jsonl(home.inbox / "good.jsonl", good)
        wait_for(lambda: len(_queue_files(home, "done")) == 1, 120, "the good job done")
        write_jsonl(home.inbox / "good-again.jsonl", good)  # same content, other name
        wait_for(lambda: len(list(home.failed.glob("*.error.json"))) == 2, 60, "two rejections")
        assert daemon.alive()
        errors = {
            json.loads(p.read_text())["file"]: json.loads(p.read_text()) for p in home.failed.glob("*.error.json")
        }
        broken = next(e for f, e in errors.items() if f.endswith("broken.jsonl"))
        assert [(e["line"], e["field"]) for e in broken["validation"]["errors"]] == [(7, ""), (12, "completion")]
        assert "line 7" in broken["reason"] and "line 12" in broken["reason"]
        dup = next(e for f, e in errors.items() if f.endswith("good-again.jsonl"))
        db = _db(home)
        good_job = next(j for j in db.jobs() if j.name == "good.jsonl")
        assert dup["class"] == "duplicate" and f"duplicate of job {good_job.id}" in dup["reason"]
        assert len(db.versions()) == 1 and len(db.runs(good_job.id)) == 1
        db.close()
        assert "failed 2" in cli(home, "status").stdout
    finally:
        assert daemon.stop() == 0, daemon.log_text()


def test_slow_writer_is_not_admitted_before_complete(tmp_path: Path, embedded: Path) -> None:
    home = make_home(tmp_path / "home", embedded, max_steps=5)
    daemon = DaemonProc(home)
    try:
        wait_for(lambda: daemon.status()["daemon"]["state"] == "idle", 30, "daemon idle")
        path = home.inbox / "slow.jsonl"
        n_chunks = 8
        with open(path, "w") as f:
            for i in range(n_chunks):
                f.write("".join(json.dumps({"text": f"chunk {i} line {k}"}) + "\n" for k in range(5)))
                f.flush()
                time.sleep(0.5)  # 4 s in all: far longer than settle_seconds (1 s)
                assert path.exists(), f"taken from the inbox while still being written (chunk {i})"
        wait_for(lambda: not path.exists(), 30, "admission after close")
        db = _db(home)
        job = wait_for(lambda: next(iter(db.jobs([JobState.QUEUED, JobState.RUNNING, JobState.DONE])), None), 10, "job")
        assert job.n_records == 5 * n_chunks
        db.close()
    finally:
        assert daemon.stop() == 0, daemon.log_text()


def test_pause_resume_continues_at_the_paused_step(tmp_path: Path, embedded: Path) -> None:
    home = make_home(tmp_path / "home", embedded, max_steps=60)
    daemon = DaemonProc(home, env={"TRAINBOX_TEST_STEP_SLEEP": "0.05"})
    try:
        write_jsonl(home.inbox / "long.jsonl", [{"text": f"the dog runs in field {i % 7}"} for i in range(80)])
        wait_for(lambda: (daemon.status()["current_job"] or {}).get("step", 0) >= 12, 120, "training past step 12")
        cli(home, "pause")
        wait_for(lambda: daemon.status()["daemon"]["state"] == "paused", 60, "daemon paused")
        db = _db(home)
        job = db.jobs()[0]
        assert db.job(job.id).state == "paused"  # type: ignore[union-attr]
        paused_step = db.runs(job.id)[0].end_step
        assert paused_step is not None and 12 <= paused_step < 60
        assert _queue_files(home, "processing") and not _queue_files(home, "done")
        time.sleep(1.0)
        assert daemon.status()["daemon"]["state"] == "paused"  # stays paused: nothing dispatched
        cli(home, "resume")
        wait_for(lambda: len(_queue_files(home, "done")) == 1, 120, "job done after resume")
        runs = db.runs(job.id)
        assert len(runs) == 2 and runs[1].end_step == 60
        assert runs[0].start_step == 0 and runs[1].start_step == paused_step  # the run row says where it resumed
        steps = [m["step"] for m in metrics(home.run_dir(job.id)) if m["kind"] == "train"]
        assert steps == list(range(1, 61))  # continued at the paused step: nothing repeated or missing
        log = (home.run_dir(job.id) / "worker.log").read_text()
        assert f"step {paused_step}" in log
        assert db.job(job.id).state == "done"  # type: ignore[union-attr]
        db.close()
    finally:
        assert daemon.stop() == 0, daemon.log_text()


def test_stop_checkpoints_and_restart_resumes(tmp_path: Path, embedded: Path) -> None:
    home = make_home(tmp_path / "home", embedded, max_steps=40)
    daemon = DaemonProc(home, env={"TRAINBOX_TEST_STEP_SLEEP": "0.05"})
    write_jsonl(home.inbox / "job.jsonl", [{"text": f"a bird sings on hill {i % 5}"} for i in range(60)])
    wait_for(lambda: (daemon.status()["current_job"] or {}).get("step", 0) >= 5, 120, "training past step 5")
    cli(home, "stop")
    daemon.proc.wait(60)
    assert daemon.stop() == 0, daemon.log_text()
    assert _queue_files(home, "processing") and not _queue_files(home, "done")
    status = json.loads(cli(home, "status", "--json").stdout)
    assert status["daemon"]["running"] is False
    daemon = DaemonProc(home)
    try:
        wait_for(lambda: len(_queue_files(home, "done")) == 1, 120, "job done after restart")
        db = _db(home)
        job = db.jobs()[0]
        runs = db.runs(job.id)
        assert len(runs) == 2 and runs[0].end_step and runs[1].end_step == 40
        assert runs[1].start_step == runs[0].end_step  # resumed at the stop's checkpoint
        steps = [m["step"] for m in metrics(home.run_dir(job.id)) if m["kind"] == "train"]
        assert steps == list(range(1, 41))
        db.close()
    finally:
        assert daemon.stop() == 0, daemon.log_text()


def test_second_daemon_on_the_same_home_refuses(tmp_path: Path, embedded: Path) -> None:
    home = make_home(tmp_path / "home", embedded)
    daemon = DaemonProc(home)
    try:
        wait_for(lambda: daemon.status()["daemon"]["running"], 30, "first daemon running")
        second = cli(home, "daemon", check=False)
        assert second.returncode == 1
        assert f"pid {daemon.proc.pid}" in second.stdout + second.stderr
        assert daemon.alive()
    finally:
        assert daemon.stop() == 0, daemon.log_text()


def test_cancel_and_prioritize_waiting_jobs(tmp_path: Path, embedded: Path) -> None:
    home = make_home(tmp_path / "home", embedded)
    cli(home, "pause")
    daemon = DaemonProc(home)
    try:
        for i in range(3):
            write_jsonl(home.inbox / "low" / f"w{i}.jsonl", [{"text": f"waiting job {i} line {k}"} for k in range(9)])
        wait_for(lambda: daemon.status()["queue"]["low"] == 3, 30, "three waiting jobs")
        db = _db(home)
        ids = {j.name: j.id for j in db.jobs()}
        cli(home, "prioritize", str(ids["w2.jsonl"]), "high")
        cli(home, "cancel", str(ids["w1.jsonl"]))
        cli(home, "cancel", "999")  # unknown: refused, nothing moves
        wait_for(lambda: not daemon.status()["pending_controls"], 30, "control requests applied")
        assert _queue_files(home, "high") == [f"{ids['w2.jsonl']:06d}__w2.jsonl"]
        assert _queue_files(home, "low") == [f"{ids['w0.jsonl']:06d}__w0.jsonl"]
        err = json.loads((home.failed / f"{ids['w1.jsonl']:06d}__w1.jsonl.error.json").read_text())
        assert err["class"] == "cancelled"
        assert db.job(ids["w1.jsonl"]).state == "cancelled"  # type: ignore[union-attr]
        assert db.job(ids["w2.jsonl"]).priority == "high"  # type: ignore[union-attr]
        assert any("refused: job 999 is not waiting" in e.message for e in db.events(kind="control"))
        db.close()
    finally:
        assert daemon.stop() == 0, daemon.log_text()
