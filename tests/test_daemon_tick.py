"""The daemon's queue decisions, driven through ``Daemon.tick(now)`` in this process with stub
children (``tests/daemon_stubs.py``, through the ``worker_command`` / ``evaluate_entry`` seams):
priority order, retry with back-off, pause and resume, cancel, and the eval gate as a child the tick
reaps while it keeps serving controls and admissions. No torch, no training: each test takes about a
second."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from daemon.gate import GATE_PENDING
from daemon.main import STATUS_REFRESH_S, Daemon
from management.db import ModelDB
from management.versions import current_id
from tests.daemon_stubs import daemon_factory, tick_until
from trainbox import control
from trainbox.config import Settings
from trainbox.home import Home
from trainbox.states import EXIT_LOCKED, DaemonState, JobState

FAST = {"settle_seconds": 0.05, "rescan_interval": 0.05, "retry_backoff": 30.0, "poll_interval": 0.05}


def _settings(**models: object) -> Settings:
    return Settings.model_validate({"daemon": FAST, "models": models})


@pytest.fixture
def home(tmp_path: Path) -> Home:
    return Home(tmp_path / "home").ensure()


@pytest.fixture(params=["sqlite", "postgresql"])
def daemon_db_url(request: pytest.FixtureRequest) -> str:
    """Here every tick test runs on each backend (the daemon's whole use of the DB); the modules that import
    ``make_daemon`` get tests/conftest.py's, the home's SQLite file."""
    if request.param == "sqlite":
        return ""
    return str(request.getfixturevalue("postgres_server").create_database())


@pytest.fixture
def make_daemon(home: Home, daemon_db_url: str) -> Iterator[Callable[..., Daemon]]:
    yield from daemon_factory(home, _settings(), daemon_db_url)
    if daemon_db_url:  # [db] url reached everything: no SQLite file was made, the workers were told the same URL
        assert not home.db_file.exists()
        specs = [json.loads(p.read_text()) for p in home.runs.glob("*/job.json")]
        assert all(spec["db_url"] == daemon_db_url for spec in specs)


def drop(home: Home, name: str, folder: str = "") -> None:
    target = home.inbox / folder / name if folder else home.inbox / name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps({"text": f"an example for {name} {folder}"}) + "\n")


def plan(home: Home, steps: dict[str, list[str]]) -> None:
    (home.root / "stub-plan.json").write_text(json.dumps(steps))


def starts(home: Home) -> list[str]:
    path = home.root / "stub-starts.txt"
    return path.read_text().splitlines() if path.exists() else []


def state_of(db: ModelDB, name: str) -> str | None:
    job = next((j for j in db.jobs() if j.name == name), None)
    return job.state if job else None


def test_priority_order_and_pause_resume(home: Home, make_daemon: Callable[..., Daemon]) -> None:
    control.submit(home.control, control.Action.PAUSE)
    for name, folder in (("a.jsonl", "low"), ("b.jsonl", "normal"), ("c.jsonl", "high")):
        drop(home, name, folder)
    d = make_daemon()
    assert d.db is not None
    tick_until(d, lambda: sum(1 for j in d.db.jobs() if j.state == JobState.QUEUED) == 3, "three queued")  # type: ignore[union-attr]
    assert d.paused and d.state() == DaemonState.PAUSED and starts(home) == []
    control.submit(home.control, control.Action.RESUME)
    tick_until(d, lambda: len(list(home.done.glob("*.jsonl"))) == 3, "three done")
    assert starts(home) == ["c.jsonl complete", "b.jsonl complete", "a.jsonl complete"]


def test_pause_stops_the_worker_and_resume_restarts_its_job(home: Home, make_daemon: Callable[..., Daemon]) -> None:
    plan(home, {"a.jsonl": ["wait", "complete"]})
    drop(home, "a.jsonl")
    d = make_daemon()
    assert d.db is not None
    tick_until(d, lambda: d.worker is not None and starts(home), "the worker")
    control.submit(home.control, control.Action.PAUSE)
    tick_until(d, lambda: d.worker is None, "the worker to stop")
    assert state_of(d.db, "a.jsonl") == JobState.PAUSED and len(d.spool.processing()) == 1
    for _ in range(5):
        d.tick(time.time())
    assert len(starts(home)) == 1  # paused: nothing dispatched
    control.submit(home.control, control.Action.RESUME)
    tick_until(d, lambda: state_of(d.db, "a.jsonl") == JobState.DONE, "done")  # type: ignore[arg-type]
    assert starts(home) == ["a.jsonl wait", "a.jsonl complete"]


def test_a_crash_is_retried_after_its_back_off(home: Home, make_daemon: Callable[..., Daemon]) -> None:
    plan(home, {"a.jsonl": ["crash", "complete"]})
    drop(home, "a.jsonl")
    d = make_daemon()
    assert d.db is not None
    tick_until(d, lambda: state_of(d.db, "a.jsonl") == JobState.QUEUED and starts(home), "the crash reaped")  # type: ignore[arg-type]
    job = d.db.jobs()[0]
    assert job.attempts == 1 and job.retry_at is not None and job.failure_class == "crash"
    run = d.db.runs(job.id)[0]
    assert (run.exit_code, run.exit_signal, run.exit_status) == (1, None, "exit code 1 (failed)")
    assert run.host == d.settings.fleet.host  # which daemon of the fleet ran it (issue 18)
    for _ in range(5):  # before its back-off ends: not dispatched
        d.tick(time.time())
    assert len(starts(home)) == 1
    d.tick(job.retry_at + 0.01)  # the tick's clock is its argument
    tick_until(d, lambda: state_of(d.db, "a.jsonl") == JobState.DONE, "done after the retry")  # type: ignore[arg-type]
    assert starts(home) == ["a.jsonl crash", "a.jsonl complete"]


def test_cancel_the_running_and_a_waiting_job(home: Home, make_daemon: Callable[..., Daemon]) -> None:
    plan(home, {"a.jsonl": ["wait"]})
    drop(home, "a.jsonl", "high")
    drop(home, "b.jsonl", "low")
    d = make_daemon()
    assert d.db is not None
    tick_until(d, lambda: starts(home) and state_of(d.db, "b.jsonl") == JobState.QUEUED, "a running")  # type: ignore[arg-type]
    ids = {j.name: j.id for j in d.db.jobs()}
    control.submit(home.control, control.Action.CANCEL, ids["b.jsonl"])
    control.submit(home.control, control.Action.CANCEL, ids["a.jsonl"])
    cancelled = JobState.CANCELLED
    tick_until(d, lambda: state_of(d.db, "a.jsonl") == cancelled == state_of(d.db, "b.jsonl"), "both cancelled")  # type: ignore[arg-type]
    assert starts(home) == ["a.jsonl wait"] and len(list(home.failed.glob("*.error.json"))) == 2
    assert control.pending(home.control) == []


def test_a_slow_gate_runs_as_a_child_while_the_tick_serves_controls_and_drops(
    home: Home, make_daemon: Callable[..., Daemon]
) -> None:
    (home.root / "frozen.jsonl").write_text('{"text": "frozen"}\n')
    d = make_daemon(_settings(eval_file="frozen.jsonl"))
    assert d.db is not None
    drop(home, "first.jsonl")
    tick_until(d, lambda: current_id(home) == 1, "v1 current (nothing to beat: no child)")
    (home.root / "stub-gate-hold").touch()  # the next gate's evaluation runs until this goes
    drop(home, "second.jsonl")
    tick_until(d, lambda: d.gates.child is not None, "the gate child")
    assert len(list(home.done.glob("*.jsonl"))) == 1  # filed once its version is gated, not before
    assert [p.name for p in home.processing.glob("*.jsonl")] == ["000002__second.jsonl"]
    assert state_of(d.db, "second.jsonl") == JobState.RUNNING  # type: ignore[arg-type]
    assert not d.db.gates(2) and (home.run_dir(2) / GATE_PENDING).exists()
    control.submit(home.control, control.Action.CANCEL, 2)  # its training is over: refused, not lost
    control.submit(home.control, control.Action.PAUSE)
    drop(home, "third.jsonl")
    tick_until(d, lambda: d.paused and state_of(d.db, "third.jsonl") == JobState.QUEUED, "pause and admission")  # type: ignore[arg-type]
    assert d.gates.child is not None and d.gates.served.answer() is None  # still evaluating
    control.submit(home.control, control.Action.RESUME)
    for _ in range(5):
        d.tick(time.time())
    assert not d.paused and d.worker is None and len(starts(home)) == 2  # no dispatch during the gate
    (home.root / "stub-gate-hold").unlink()
    tick_until(d, lambda: d.db.gates(2), "the gate reaped")  # type: ignore[union-attr]
    assert d.db.gates(2)[0].promoted and current_id(home) == 2
    assert not (home.run_dir(2) / GATE_PENDING).exists()
    assert state_of(d.db, "second.jsonl") == JobState.DONE and len(list(home.done.glob("*.jsonl"))) == 2  # type: ignore[arg-type]
    assert any("is being gated" in e.message for e in d.db.events(kind="control"))
    tick_until(d, lambda: state_of(d.db, "third.jsonl") == JobState.DONE, "the next job")  # type: ignore[arg-type]
    assert d.db.job(3).init_version == 2  # type: ignore[union-attr]  # started from the gate's choice


def test_an_interrupted_gate_runs_again_after_a_restart(home: Home, make_daemon: Callable[..., Daemon]) -> None:
    (home.root / "frozen.jsonl").write_text('{"text": "frozen"}\n')
    settings = _settings(eval_file="frozen.jsonl")
    d = make_daemon(settings)
    assert d.db is not None
    drop(home, "first.jsonl")
    tick_until(d, lambda: current_id(home) == 1, "v1 current")
    (home.root / "stub-gate-hold").touch()
    drop(home, "second.jsonl")
    tick_until(d, lambda: d.gates.child is not None, "the gate child")
    popen = d.gates.served.popen
    assert popen is not None
    assert json.loads((home.run_dir(2) / GATE_PENDING).read_text())["pid"] == popen.pid
    d.shutdown()
    assert popen.poll() is not None and (home.run_dir(2) / GATE_PENDING).exists()
    (home.root / "stub-gate-hold").unlink()
    again = make_daemon(settings)
    assert again.db is not None
    assert (home.processing / "000002__second.jsonl").exists()  # not filed before its gate decides
    tick_until(again, lambda: again.db.gates(2), "the gate run again")  # type: ignore[union-attr]
    assert current_id(home) == 2 and len(again.db.gates()) == 2
    assert (home.done / "000002__second.jsonl").exists() and not again.spool.processing()


def test_a_gate_past_eval_timeout_is_killed_and_the_version_kept_unpromoted(
    home: Home, make_daemon: Callable[..., Daemon]
) -> None:
    (home.root / "frozen.jsonl").write_text('{"text": "frozen"}\n')
    d = make_daemon(_settings(eval_file="frozen.jsonl", eval_timeout=0.5))
    assert d.db is not None
    drop(home, "first.jsonl")
    tick_until(d, lambda: current_id(home) == 1, "v1 current")
    (home.root / "stub-gate-hold").touch()  # never released: the evaluation overruns its limit
    drop(home, "second.jsonl")
    tick_until(d, lambda: d.db.gates(2), "the overdue gate judged")  # type: ignore[union-attr]
    gate = d.db.gates(2)[0]
    assert not gate.promoted and "eval_timeout" in gate.reason and current_id(home) == 1
    assert not (home.run_dir(2) / GATE_PENDING).exists() and d.gates.child is None


def signals(home: Home) -> list[str]:
    path = home.root / "stub-signals.txt"
    return path.read_text().splitlines() if path.exists() else []


def test_a_warm_stop_sends_one_sigterm_however_often_it_is_asked(
    home: Home, make_daemon: Callable[..., Daemon]
) -> None:
    """A stop signal (asked again on every tick), a pause and a cancel while the worker checkpoints for
    0.5 s: one SIGTERM, and its run ends "exit code 75", not "killed by signal 15"."""
    plan(home, {"a.jsonl": ["linger"]})
    drop(home, "a.jsonl")
    d = make_daemon()
    assert d.db is not None
    tick_until(d, lambda: d.worker is not None and starts(home), "the worker")
    control.submit(home.control, control.Action.PAUSE)
    d._on_signal(signal.SIGTERM, None)  # as the handler does: counted, acted on by the ticks
    tick_until(d, lambda: signals(home), "the SIGTERM")
    control.submit(home.control, control.Action.CANCEL, d.worker.job_id)  # type: ignore[union-attr]
    tick_until(d, lambda: d.finished, "the worker's exit and the daemon's stop")
    assert signals(home) == ["a.jsonl SIGTERM"]
    run = d.db.runs(1)[0]
    assert (run.exit_code, run.exit_signal, run.exit_status) == (75, None, "exit code 75 (interrupted)")
    assert state_of(d.db, "a.jsonl") == JobState.CANCELLED


def test_a_worker_locked_out_of_its_folder_waits_for_the_holder_without_an_attempt(
    home: Home, make_daemon: Callable[..., Daemon]
) -> None:
    """Another process (started as a worker of that run folder) holds the job's run folder: the stub exits
    EXIT_LOCKED having written nothing; the daemon records no attempt, sends the holder one SIGTERM, and
    starts the job again once the lock is free."""
    from tests.test_run_lock import end, holding

    d = make_daemon()
    assert d.db is not None
    run_dir = home.run_dir(1)
    run_dir.mkdir(parents=True)
    holder = holding(run_dir)
    try:
        drop(home, "a.jsonl")
        tick_until(d, lambda: state_of(d.db, "a.jsonl") == JobState.DONE, "done once the holder is gone")  # type: ignore[arg-type]
        assert holder.wait(timeout=30) == 0  # it got SIGTERM (its exit 0), not SIGKILL
    finally:
        end(holder)
    runs = d.db.runs(1)
    assert [(r.outcome, r.exit_code) for r in runs] == [("locked", EXIT_LOCKED), ("completed", 0)]
    assert d.db.job(1).attempts == 0 and starts(home) == ["a.jsonl complete"]  # type: ignore[union-attr]
    assert [e.kind for e in d.db.events(job_id=1) if e.kind.startswith("run_lock")] == ["run_lock_free"]


def test_the_wait_between_ticks_ends_when_the_worker_exits_and_waits_on_it_once(
    home: Home, make_daemon: Callable[..., Daemon]
) -> None:
    """The loop's wait ends when a child the tick reaps exits, long before a 60 s poll interval; a child
    the next tick did not reap (a tick that failed) does not end the wait again, so the loop never spins."""
    plan(home, {"a.jsonl": ["wait"]})
    drop(home, "a.jsonl")
    d = make_daemon()
    tick_until(d, lambda: d.worker is not None and starts(home), "the worker")
    assert d.worker is not None
    d.settings.daemon.poll_interval = 60.0
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)  # as ``run`` makes it
    try:
        d.worker.popen.send_signal(signal.SIGTERM)  # the stub exits at once, unreaped
        t0 = time.monotonic()
        d.wait(wake_r)
        assert time.monotonic() - t0 < 30.0 and d.woken == {d.worker.pid}
        d.settings.daemon.poll_interval = 0.3
        t0 = time.monotonic()
        d.wait(wake_r)  # not reaped: this wait is the interval's
        assert time.monotonic() - t0 >= 0.3
    finally:
        os.close(wake_r)
        os.close(wake_w)
    tick_until(d, lambda: d.worker is None, "the reap")


def test_the_wait_ends_when_the_kept_gate_child_answers(home: Home, make_daemon: Callable[..., Daemon]) -> None:
    (home.root / "frozen.jsonl").write_text('{"text": "frozen"}\n')
    d = make_daemon(_settings(eval_file="frozen.jsonl"))
    drop(home, "first.jsonl")
    tick_until(d, lambda: current_id(home) == 1, "v1 current")
    (home.root / "stub-gate-hold").touch()
    drop(home, "second.jsonl")
    tick_until(d, lambda: d.gates.child is not None, "the gate evaluating")
    d.settings.daemon.poll_interval = 60.0
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    try:
        (home.root / "stub-gate-hold").unlink()  # the kept child answers now
        t0 = time.monotonic()
        d.wait(wake_r)
        assert time.monotonic() - t0 < 30.0
    finally:
        os.close(wake_r)
        os.close(wake_w)
    d.tick(time.time())
    assert d.gates.child is None and d.db is not None and d.db.gates(2)  # the answer was there to read


def test_an_unchanged_status_is_rewritten_every_refresh_and_a_change_at_once(
    home: Home, make_daemon: Callable[..., Daemon]
) -> None:
    d = make_daemon()
    path = home.status / "daemon.json"
    now = time.time()
    d.tick(now)
    written = json.loads(path.read_text())["heartbeat"]
    d.tick(now + 0.5)
    assert json.loads(path.read_text())["heartbeat"] == written  # nothing changed: no write
    d.tick(now + STATUS_REFRESH_S + 0.1)
    assert json.loads(path.read_text())["heartbeat"] == now + STATUS_REFRESH_S + 0.1
    control.submit(home.control, control.Action.PAUSE)
    d.tick(now + STATUS_REFRESH_S + 0.2)
    status = json.loads(path.read_text())
    assert status["state"] == DaemonState.PAUSED and status["heartbeat"] == now + STATUS_REFRESH_S + 0.2
