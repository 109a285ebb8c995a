"""What a starting daemon does about the runs a killed predecessor left (issue 14, D1, D6, D8), driven
in-process with the stub worker (``tests/daemon_stubs.py``): a daemon "killed" between starting a worker
and recording its pid is simulated by a crash point that raises, and the Daemon object is dropped without
its shutdown, as SIGKILL would; the next one must stop that live worker before it starts another, close
every run left open (so crash reports follow), and sweep the temp folders of interrupted saves."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from daemon import jobs
from daemon.main import Daemon
from daemon.startup_runs import NEVER_RAN, NOT_A_CHILD, closing
from daemon.worker_process import STOPPED_BY_SIGTERM, Stopped
from management.db import Job, ModelDB, Run
from safety.crash_scan import CrashScanner
from tests.test_daemon_tick import drop, home, make_daemon, plan, starts, state_of, tick_until  # noqa: F401
from tests.test_run_lock import end, holding
from trainbox import oom_counter, run_temp
from trainbox.home import Home
from trainbox.jobspec import WorkerResult
from trainbox.states import JobState, WorkerOutcome

GONE_PID = 2**22 + 7  # above Linux's largest pid_max: never a live process


class DaemonKilled(Exception):
    """Raised at a crash point: the daemon 'dies' there (its object is dropped, nothing cleaned up)."""


def die_at(monkeypatch: pytest.MonkeyPatch, point: str) -> None:
    def crash_point(name: str) -> None:
        if name == point:
            raise DaemonKilled(name)

    monkeypatch.setattr(jobs, "crash_point", crash_point)


def dies_while_starting(d: Daemon) -> None:
    """Ticks until the armed crash point 'kills' the daemon during a spawn (bounded)."""
    with pytest.raises(DaemonKilled):
        tick_until(d, lambda: False, "the armed crash point", timeout=15)


def wait_for(cond: Callable[[], object], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_a_daemon_killed_between_popen_and_the_pid_record(
    home: Home,  # noqa: F811
    make_daemon: Callable[..., Daemon],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The next daemon finds the worker nobody recorded (by its run folder's lock), stops it (it
    checkpoints: exit 75), closes its run with its own result, and only then starts a new one."""
    plan(home, {"a.jsonl": ["wait", "complete"]})
    drop(home, "a.jsonl")
    first = make_daemon()
    die_at(monkeypatch, "spawn.after_popen")
    dies_while_starting(first)
    monkeypatch.undo()
    wait_for(lambda: starts(home) == ["a.jsonl wait"], "the unrecorded worker to run")
    db = ModelDB(home.db_url)
    [run] = db.runs(1)
    assert run.pid is None and run.ended_at is None
    orphan = next(p for p in psutil.process_iter(["cmdline"]) if str(home.run_dir(1)) in (p.info["cmdline"] or []))
    again = make_daemon()
    assert again.db is not None
    assert not orphan.is_running() or orphan.status() == psutil.STATUS_ZOMBIE
    [stopped] = again.db.events(kind="orphan_stopped")
    assert stopped.data == {"pid": orphan.pid, "found_by": "lock"}
    [run] = again.db.runs(1)
    assert (run.pid, run.outcome, run.end_step) == (orphan.pid, "interrupted", 1)
    assert run.ended_at is not None and run.exit_status.startswith("stopped after SIGTERM")  # type: ignore[union-attr]
    tick_until(again, lambda: state_of(again.db, "a.jsonl") == JobState.DONE, "the job done")  # type: ignore[arg-type]
    first_run, second_run = again.db.runs(1)
    assert starts(home) == ["a.jsonl wait", "a.jsonl complete"] and second_run.outcome == "completed"
    assert second_run.started_at >= first_run.ended_at  # type: ignore[operator]
    db.close()


def test_a_daemon_killed_before_popen_leaves_a_run_that_never_started(
    home: Home,  # noqa: F811
    make_daemon: Callable[..., Daemon],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    drop(home, "a.jsonl")
    first = make_daemon()
    die_at(monkeypatch, "spawn.before_popen")
    dies_while_starting(first)
    monkeypatch.undo()
    again = make_daemon()
    assert again.db is not None
    [run] = again.db.runs(1)
    assert (run.pid, run.outcome, run.exit_status) == (None, "not_started", NEVER_RAN)
    assert not again.db.events(kind="orphan_stopped") and starts(home) == []
    tick_until(again, lambda: state_of(again.db, "a.jsonl") == JobState.DONE, "the job done")  # type: ignore[arg-type]
    assert starts(home) == ["a.jsonl complete"]


def seed_open_runs(home: Home) -> None:  # noqa: F811
    """Three jobs whose runs a killed daemon left open: job 1's worker wrote its result (interrupted at
    step 5), job 2's died without one (SIGKILL while the daemon was down), job 3's row never got a worker."""
    db = ModelDB(home.db_url)
    with db.session() as s:
        for job_id in (1, 2, 3):
            s.add(Job(id=job_id, name=f"j{job_id}.jsonl", state=JobState.RUNNING.value))
            s.flush()
            pid = None if job_id == 3 else GONE_PID + job_id
            s.add(Run(job_id=job_id, attempt=1, pid=pid, oom_count_at_start=oom_counter.oom_kill_count()))
    db.close()
    for job_id in (1, 2, 3):
        home.run_dir(job_id).mkdir(parents=True)
    WorkerResult(outcome=WorkerOutcome.INTERRUPTED, step=5).save(home.run_dir(1))


def test_runs_left_open_are_closed_at_start_and_the_crashed_one_gets_a_crash_report(
    home: Home,  # noqa: F811
    make_daemon: Callable[..., Daemon],  # noqa: F811
) -> None:
    seed_open_runs(home)
    d = make_daemon()
    assert d.db is not None
    runs = {r.job_id: r for job_id in (1, 2, 3) for r in d.db.runs(job_id)}
    assert all(r.ended_at is not None for r in runs.values())
    assert [(runs[j].outcome, runs[j].exit_status) for j in (1, 2, 3)] == [
        ("interrupted", NOT_A_CHILD),
        ("crashed", NOT_A_CHILD),
        ("not_started", NEVER_RAN),
    ]
    assert runs[1].end_step == 5 and len(d.db.events(kind="run_closed")) == 3
    # the crashed one's OOM kills: the counter's move since its row (none here, when the counter is readable)
    assert runs[2].oom_kills == (0 if oom_counter.oom_kill_count() is not None else None)
    assert runs[1].oom_kills is None and runs[3].oom_kills is None
    reported: list[tuple[Any, ...]] = []
    scanner = CrashScanner(home, lambda: True, lambda: d.db, lambda *a, **k: reported.append(a))  # type: ignore[arg-type,return-value]
    scanner.scan(time.time())
    assert [(kind, job_id, data["run_id"]) for kind, _m, job_id, data in reported] == [("crash_report", 2, runs[2].id)]
    assert (home.run_dir(2) / "crash-report.json").exists()


def test_closing_is_decided_from_the_evidence_there_is() -> None:
    done = WorkerResult(outcome=WorkerOutcome.COMPLETED, step=9)
    assert closing(11, done, None, ran=True).outcome == "completed"
    killed = closing(None, None, (12, Stopped("killed after the stop timeout", signal.SIGKILL)), ran=True)
    assert (killed.outcome, killed.pid, killed.exit_signal) == ("crashed", 12, signal.SIGKILL)
    assert killed.exit_status == f"killed after the stop timeout at the next daemon's start; exit status {NOT_A_CHILD}"
    stopped = closing(14, None, (14, Stopped(STOPPED_BY_SIGTERM)), ran=True)  # exited when this daemon asked
    assert (stopped.outcome, stopped.exit_signal) == ("interrupted", None)
    assert closing(None, None, None, ran=True).outcome == "crashed"  # its lock was taken: it ran
    assert closing(None, None, None, ran=False).outcome == "not_started"
    gone = closing(13, None, None, ran=True)  # its pid recorded, dead before the daemon came back
    assert (gone.outcome, gone.exit_status, gone.exit_signal) == ("crashed", NOT_A_CHILD, None)


def make_leftovers(run_dir: Path) -> dict[str, Path]:
    """A run folder after kills during saves: what must go and what must stay."""
    ckpts = run_dir / "checkpoints"

    def folder(path: Path, *files: str) -> Path:
        path.mkdir(parents=True)
        for name in files:
            (path / name).write_text(name)
        return path

    return {
        "final_tmp": folder(run_dir / ".tmp-final-ab12cd34", "model.safetensors"),
        "old_final": folder(run_dir / ".tmp-old-final-ef56gh78" / "final", "model.safetensors").parent,
        "final": folder(run_dir / "final", "model.safetensors"),
        "partial": folder(ckpts / ".tmp-step-00000008-ij90kl12", "model.safetensors"),
        "deleted": folder(ckpts / ".tmp-deleted-step-00000002", run_temp.COMPLETE),
        "moved_aside": folder(ckpts / ".tmp-old-step-00000012-mn34op56" / "step-00000012", run_temp.COMPLETE).parent,
        "complete": folder(ckpts / "step-00000004", run_temp.COMPLETE),
    }


def test_temp_folders_of_interrupted_saves_are_swept_never_a_complete_checkpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "job-000001"
    left = make_leftovers(run_dir)
    (run_dir / ".tmp-not-a-folder").write_text("not ours")
    (run_dir / ".tmp-link").symlink_to(left["complete"], target_is_directory=True)
    found = {(x.path.name, x.action) for x in run_temp.sweep_run(run_dir)}
    names = ["final_tmp", "old_final", "partial", "deleted", "moved_aside"]
    assert found == {(left[n].name, "restored" if n == "moved_aside" else "removed") for n in names}
    assert not any(left[n].exists() for n in names)
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "step-00000012" / run_temp.COMPLETE).is_file()  # the only copy of step 12, back
    assert (left["complete"] / run_temp.COMPLETE).is_file() and (left["final"] / "model.safetensors").is_file()
    assert (run_dir / ".tmp-not-a-folder").is_file() and (run_dir / ".tmp-link").is_symlink()
    assert run_temp.sweep_run(run_dir) == []


def test_temp_folders_are_swept_at_start_except_where_a_live_process_holds_the_lock(
    home: Home,  # noqa: F811
    make_daemon: Callable[..., Daemon],  # noqa: F811
) -> None:
    """Job 1's leftovers go (an event each); job 2's folder is held by a process that is no worker of
    it (its argv does not name the folder): it is neither signalled nor swept, and the daemon says so."""
    seed_open_runs(home)
    left = make_leftovers(home.run_dir(1))
    kept = home.run_dir(2) / ".tmp-final-qr78st90"
    kept.mkdir()
    stranger = holding(home.run_dir(2), as_worker=False)
    try:
        d = make_daemon()
        assert d.db is not None
        assert stranger.poll() is None and kept.is_dir()
        [foreign] = d.db.events(kind="run_lock_foreign")
        assert foreign.job_id == 2 and foreign.data == {"pid": stranger.pid}
    finally:
        end(stranger)
    assert not left["final_tmp"].exists() and not left["partial"].exists()
    assert (home.run_dir(1) / "checkpoints" / "step-00000012").is_dir() and left["complete"].is_dir()
    removed, restored = d.db.events(kind="temp_removed"), d.db.events(kind="checkpoint_restored")
    assert len(removed) == 4 and len(restored) == 1 and {e.job_id for e in removed + restored} == {1}
    assert os.path.isdir(home.run_dir(2))
