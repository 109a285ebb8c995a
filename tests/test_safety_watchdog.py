"""The watchdog with real processes: a hung worker is killed within its phase's limit and its job
resumes; a daemon killed with -9 is restarted and the queue continues; an idle daemon is left alone.
Plus the pure parts: phase limits, and an idle daemon with a stale training.json from an old job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from management.db import ModelDB
from safety.watchdog import PhaseClock, Watchdog
from tests.e2e_helpers import DaemonProc, cli, make_home, metrics, wait_for, write_jsonl
from trainbox.config import Settings, WatchdogConfig
from trainbox.home import Home
from trainbox.markers import KILL_HISTORY, KILL_MARKER, kills_of, read_kill_marker, write_kill_marker
from trainbox.processes import is_worker_pid
from trainbox.states import DaemonState
from trainbox.status import DAEMON_STATUS, TRAINING_STATUS, DaemonStatus, TrainingStatus, write_status

# Loading is not what these tests hang, and a kill counts as an attempt: a worker's imports alone can
# take 20 s on a busy 2-core machine, so the loading limit stays well above that.
WATCHDOG_CONFIG = """
retry_backoff = 0

[watchdog]
interval = 0.2
restart_backoff = 0.5
startup_grace = 30
kill_grace = 2
hang_factor = 3
loading_floor = 60
loading_ceiling = 60
training_floor = 2
training_ceiling = 8
evaluating_floor = 2
evaluating_ceiling = 10
checkpointing_floor = 2
checkpointing_ceiling = 10
"""


class WatchdogProc:
    def __init__(self, home: Home) -> None:
        self.log = open(home.root / "watchdog-test.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "watchdog", "--home", str(home.root)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(30)
        self.log.close()
        return rc


def _home(tmp_path: Path, embedded: Path, max_steps: int) -> Home:
    home = make_home(tmp_path / "home", embedded, max_steps=max_steps)
    text = home.config_file.read_text()
    home.config_file.write_text(
        text.replace("[daemon]\n", "[daemon]\n" + WATCHDOG_CONFIG.split("\n[watchdog]")[0], 1)
        + "\n[watchdog]"
        + WATCHDOG_CONFIG.split("\n[watchdog]")[1]
    )
    return home


def _events(home: Home, kind: str) -> list[dict]:
    db = ModelDB(home.db_url)
    try:
        rows = db.events(kind=kind)
        return [{**(e.data or {}), "time": e.time, "message": e.message, "job_id": e.job_id} for e in rows]
    finally:
        db.close()


def _daemon_status(home: Home) -> dict:
    return json.loads((home.status / DAEMON_STATUS).read_text())


def test_phase_clock_limits() -> None:
    cfg = WatchdogConfig(hang_factor=3, training_floor=1, training_ceiling=4, loading_floor=5, loading_ceiling=60)
    clock = PhaseClock(cfg)
    assert clock.limit("loading") == 60  # nothing measured: the ceiling
    for t in (100.0, 100.5, 101.0, 101.7):
        clock.observe(7, "training", t)
    assert clock.longest["training"] == pytest.approx(0.7)
    assert clock.limit("training") == pytest.approx(2.1)
    clock.observe(7, "evaluating", 102.0)  # the interval before the phase change belongs to training
    clock.observe(7, "training", 130.0)  # a 28 s evaluation
    assert clock.longest["evaluating"] == pytest.approx(28.0)
    clock.observe(8, "loading", 500.0)  # a new worker: no interval across processes
    assert "loading" not in clock.longest
    clock.observe(8, "training", 504.0)
    assert clock.limit("loading") == 12  # 3 x 4 s
    clock.observe(8, "training", 506.0)  # 2 s: within the 2.1 s limit, so learned
    assert clock.limit("training") == 4  # 3 x 2 s capped at the ceiling


def test_kill_history_keeps_every_kill_of_a_job(tmp_path: Path) -> None:
    """The marker speaks for one pid; the history keeps each kill, so a job failed as hung shows them all."""
    write_kill_marker(tmp_path, {"pid": 10, "time": 1.0, "phase": "loading"})
    write_kill_marker(tmp_path, {"pid": 11, "time": 2.0, "phase": "training"})
    assert [k["pid"] for k in kills_of(tmp_path, 11)] == [10, 11]
    assert kills_of(tmp_path, 12) == []  # not killed by the watchdog: no hang, whatever the history says
    (tmp_path / KILL_HISTORY).unlink()  # a marker from a watchdog that kept no history still counts
    assert kills_of(tmp_path, 11) == [{"pid": 11, "time": 2.0, "phase": "training"}]
    (tmp_path / KILL_HISTORY).write_text("{not json")
    assert [k["pid"] for k in kills_of(tmp_path, 11)] == [11]
    assert (tmp_path / KILL_MARKER).exists()


def test_idle_daemon_with_stale_training_file_is_not_judged(tmp_path: Path) -> None:
    home = Home(tmp_path / "home").ensure()
    now = time.time()
    write_status(home.status / DAEMON_STATUS, DaemonStatus(state=DaemonState.IDLE, pid=os.getpid(), heartbeat=now))
    old = TrainingStatus(job_id=3, phase="training", pid=os.getpid(), heartbeat=now - 86_400)
    write_status(home.status / TRAINING_STATUS, old)
    settings = Settings(watchdog=WatchdogConfig(training_floor=1, training_ceiling=1))
    wd = Watchdog(home, settings)
    for k in range(50):
        wd.loop(now + k * 0.1)
    for minute in range(24 * 60):  # a simulated idle day: the daemon ticks, no worker, nothing to judge
        t = now + 10 + minute * 60.0
        write_status(home.status / DAEMON_STATUS, DaemonStatus(state=DaemonState.IDLE, pid=os.getpid(), heartbeat=t))
        wd.loop(t)
    assert wd.interventions == 0 and wd.worker_kill is None
    assert not home.db_file.exists()  # nothing recorded, not even a DB created
    wd.shutdown()


@pytest.mark.e2e
def test_hung_worker_is_killed_within_its_phase_limit_and_resumes(tmp_path: Path, embedded: Path) -> None:
    home = _home(tmp_path, embedded, max_steps=40)
    daemon = DaemonProc(home, env={"TRAINBOX_TEST_STEP_SLEEP": "0.05"})
    watchdog = WatchdogProc(home)
    stopped: int | None = None
    try:
        write_jsonl(home.inbox / "job.jsonl", [{"text": f"a hen walks to the barn {i % 9}"} for i in range(60)])
        wait_for(lambda: (daemon.status()["current_job"] or {}).get("step", 0) >= 13, 120, "training past step 13")
        pid = _daemon_status(home)["worker_pid"]
        os.kill(pid, signal.SIGSTOP)  # a real hang: alive, no heartbeats
        stopped = pid
        stopped_at = time.time()
        hung = wait_for(lambda: _events(home, "watchdog_worker_hung"), 30, "hang detected")[0]
        assert hung["pid"] == pid and hung["phase"] in ("training", "evaluating", "checkpointing")
        assert hung["heartbeat_age_s"] >= hung["limit_s"] and hung["limit_s"] <= 10
        assert hung["time"] - stopped_at <= hung["limit_s"] + 2.0  # detected within its limit (+ poll slack)
        killed = wait_for(lambda: _events(home, "watchdog_worker_killed"), 30, "SIGKILL after the grace")[0]
        assert killed["time"] - hung["time"] < 2 + 1.5
        job_id = hung["job_id"]
        assert read_kill_marker(home.run_dir(job_id), pid) is not None
        wait_for(lambda: len(list(home.done.glob("*.jsonl"))) == 1, 120, "job done after resume")
        db = ModelDB(home.db_url)
        runs = db.runs(job_id)
        db.close()
        assert len(runs) == 2 and runs[1].end_step == 40
        steps = [m["step"] for m in metrics(home.run_dir(job_id)) if m["kind"] == "train"]
        assert steps == list(range(1, 41))  # resumed from its last checkpoint: nothing repeated or missing
        report = wait_for(lambda: _events(home, "crash_report"), 20, "crash report")[0]
        assert report["failure_class"] == "hang" and report["detail"] == "killed_by_watchdog"
        saved = json.loads((home.run_dir(job_id) / "crash-report.json").read_text())
        assert saved["failure_class"] == "hang" and saved["detail"] == "killed_by_watchdog"
        stopped = None
    finally:
        watchdog_rc = watchdog.stop()
        if stopped is not None and is_worker_pid(stopped):  # never leave a stopped worker behind a failure
            os.kill(stopped, signal.SIGKILL)
        assert daemon.stop() == 0, daemon.log_text()
        assert watchdog_rc == 0


@pytest.mark.e2e
def test_killed_daemon_is_restarted_and_idle_daemon_left_alone(tmp_path: Path, embedded: Path) -> None:
    home = _home(tmp_path, embedded, max_steps=5)
    daemon = DaemonProc(home)
    watchdog = WatchdogProc(home)
    try:
        wait_for(lambda: daemon.status()["daemon"]["state"] == "idle", 30, "daemon idle")
        old_pid = daemon.proc.pid
        os.killpg(old_pid, signal.SIGKILL)
        daemon.proc.wait(10)
        restarted = wait_for(lambda: _events(home, "watchdog_daemon_restarted"), 30, "restart")[0]
        assert restarted["liveness"] == "down" and restarted["pid"] == old_pid
        wait_for(lambda: daemon.status()["daemon"]["running"], 60, "new daemon up")  # the same home's status
        new_pid = _daemon_status(home)["pid"]
        assert new_pid == restarted["new_pid"] != old_pid
        write_jsonl(home.inbox / "after.jsonl", [{"text": f"the queue goes on {i}"} for i in range(30)])
        wait_for(lambda: len(list(home.done.glob("*.jsonl"))) == 1, 120, "job done by the restarted daemon")
        # idle for many times the training limit: no intervention
        before = len(_events(home, "watchdog_daemon_restarted")) + len(_events(home, "watchdog_worker_hung"))
        time.sleep(6)
        after = len(_events(home, "watchdog_daemon_restarted")) + len(_events(home, "watchdog_worker_hung"))
        assert after == before == 1
        assert _daemon_status(home)["pid"] == new_pid
        cli(home, "stop")  # stopped on purpose: not restarted
        wait_for(lambda: _daemon_status(home)["state"] == "stopped", 30, "daemon stopped")
        time.sleep(1.5)
        assert len(_events(home, "watchdog_daemon_restarted")) == 1
    finally:
        daemon.log.close()
        assert watchdog.stop() == 0
        pid = _daemon_status(home).get("pid")
        if pid and _daemon_status(home)["state"] != "stopped":
            os.kill(pid, signal.SIGTERM)


@pytest.mark.e2e
def test_a_job_that_hangs_every_time_fails_as_hang(tmp_path: Path, embedded: Path) -> None:
    """Each watchdog kill is an attempt: with max_retries = 1 the second kill files the job in failed/
    with class hang and both kills as evidence, instead of resuming it forever. The workers hang while
    loading (killed at the 2 s limit, during their imports or in the injected hang, whichever comes)."""
    home = make_home(tmp_path / "home", embedded, max_steps=5)
    text = home.config_file.read_text().replace("[daemon]\n", "[daemon]\nmax_retries = 1\nretry_backoff = 0\n", 1)
    home.config_file.write_text(
        text + "\n[watchdog]\ninterval = 0.2\nkill_grace = 1\nloading_floor = 1\nloading_ceiling = 2\n"
    )
    daemon = DaemonProc(home, env={"TRAINBOX_TEST_FAULT": "hang@loading"})
    watchdog = WatchdogProc(home)
    try:
        write_jsonl(home.inbox / "stuck.jsonl", [{"text": f"it never loads {i}"} for i in range(20)])
        error_file = wait_for(lambda: next(home.failed.glob("*.error.json"), None), 120, "the job filed as failed")
        error = json.loads(error_file.read_text())
        assert error["class"] == "hang" and "hung in loading" in error["reason"], error
        assert "gave up after 2 attempts" in error["reason"] and "killed as hung 2 times" in error["reason"]
        kills = error["evidence"]["kills"]
        assert len(kills) == 2 and kills[0]["time"] < kills[1]["time"]
        assert all(k["phase"] == "loading" and k["heartbeat_age_s"] > k["limit_s"] for k in kills), kills
        db = ModelDB(home.db_url)
        job = db.jobs()[0]
        assert job.state == "failed" and job.failure_class == "hang" and job.attempts == 2
        assert len(db.runs(job.id)) == 2  # retried once from its checkpoint (none yet), then no more
        db.close()
        time.sleep(1.0)
        assert not list(home.processing.iterdir()) and _daemon_status(home)["worker_pid"] is None
    finally:
        watchdog_rc = watchdog.stop()
        assert daemon.stop() == 0, daemon.log_text()
        assert watchdog_rc == 0
