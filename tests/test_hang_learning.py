"""Hang limits learn from healthy gaps only (issue 14, D10): the pure rule (a gap past the limit, a
stopped worker, no CPU progress), the gap follower, and a real worker-like process SIGSTOPped for a few
seconds under an in-process watchdog, whose saved limit must not rise. About 5 s in all."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from safety.phase_clock import PhaseClock, healthy_gap, learnable
from safety.watchdog import WATCHDOG_STATUS, Watchdog
from safety.worker_sample import GapWatch, Sample, sample
from trainbox.config import Settings, WatchdogConfig
from trainbox.home import Home
from trainbox.states import DaemonState
from trainbox.status import DAEMON_STATUS, DaemonStatus, write_status


def test_a_gap_is_healthy_unless_stopped_or_without_cpu_progress() -> None:
    assert healthy_gap(30.0, 25.0, stopped=False)
    assert not healthy_gap(30.0, 25.0, stopped=True)  # SIGSTOP/SIGTSTP seen during it
    assert not healthy_gap(30.0, 0.05, stopped=False)  # 0.2 % of the wall clock: stuck, not slow
    assert healthy_gap(30.0, 0.6, stopped=False)  # 2 %: blocked on slow I/O, but advancing
    assert healthy_gap(30.0, None, stopped=False)  # not measured: not held against it
    assert healthy_gap(1.0, 0.0, stopped=False)  # too short to judge by CPU ticks


def test_only_healthy_gaps_within_the_limit_are_learned() -> None:
    assert learnable(10.0, 60.0, healthy=True)
    assert not learnable(61.0, 60.0, healthy=True)  # past the limit: a hang, never the new normal
    assert not learnable(10.0, 60.0, healthy=False)
    cfg = WatchdogConfig(hang_factor=5, training_floor=60, training_ceiling=1800)
    clock = PhaseClock(cfg)
    for t in (0.0, 2.0, 4.0):
        clock.observe(7, "training", t)
    assert clock.limit("training") == 60  # 5 x 2 s, raised to the floor
    clock.observe(7, "training", 37.0, healthy=False)  # the chaos run's 33 s SIGSTOP
    assert clock.longest["training"] == pytest.approx(2.0) and clock.limit("training") == 60
    clock.observe(7, "training", 107.0)  # 70 s: past the 60 s limit, though nothing was seen wrong
    assert clock.limit("training") == 60 and clock.unlearned == [("training", 33.0), ("training", 70.0)]
    clock.observe(7, "training", 157.0)  # 50 s, healthy and within the limit: learned
    assert clock.limit("training") == 250


def test_the_gap_follower_judges_the_gap_a_new_heartbeat_ends() -> None:
    gaps = GapWatch()
    assert gaps.update(7, 100.0, Sample(1.0, False))  # first sight: no gap yet
    assert gaps.update(7, 100.0, Sample(1.5, True))  # stopped, mid-gap
    assert gaps.update(7, 100.0, Sample(1.5, False))  # continued
    assert not gaps.update(7, 110.0, Sample(2.0, False))  # the gap it ended had a stop in it
    assert gaps.update(7, 120.0, Sample(9.0, True))  # 7 s of CPU in 10 s; the stop seen now is the next gap's
    assert not gaps.update(7, 130.0, Sample(9.0, False))
    assert not gaps.update(7, 140.0, Sample(9.01, False))  # 10 ms of CPU in 10 s: no progress
    assert gaps.update(8, 5.0, Sample(0.0, False))  # another worker: starts afresh
    assert gaps.update(8, 15.0, Sample(None, False))  # CPU unreadable: not held against it


def test_sampling_a_real_process_sees_its_cpu_and_its_stop() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: sum(range(10000))"])
    try:
        deadline = time.monotonic() + 10
        while (sample(proc.pid).cpu_s or 0.0) < 0.05 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (sample(proc.pid).cpu_s or 0.0) >= 0.05
        os.kill(proc.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while not sample(proc.pid).stopped and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sample(proc.pid).stopped
        os.kill(proc.pid, signal.SIGCONT)
    finally:
        proc.kill()
        proc.wait(10)
    assert sample(proc.pid) == Sample(None, False)  # gone: nothing seen


# A worker-like process: "core.worker" in its argv (so the watchdog takes it for a worker), a heartbeat
# in status/training.json every 0.1 s of busy CPU, as a training loop's steps would write.
BEATING = """
import json, os, sys, time
path, tmp = sys.argv[1], sys.argv[1] + ".tmp"
deadline = time.time() + 60
while time.time() < deadline:
    start = time.time()
    while time.time() - start < 0.1:
        sum(range(1000))
    with open(tmp, "w") as f:
        f.write(json.dumps({"job_id": 1, "phase": "training", "pid": os.getpid(), "heartbeat": time.time()}))
    os.replace(tmp, path)
"""


def _loop_for(wd: Watchdog, home: Home, worker_pid: int, seconds: float) -> None:
    """Run the watchdog's loop in real time for ``seconds``, the daemon's heartbeat kept fresh."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        now = time.time()
        status = DaemonStatus(
            state=DaemonState.TRAINING, pid=os.getpid(), heartbeat=now, worker_pid=worker_pid, current_job=1
        )
        write_status(home.status / DAEMON_STATUS, status)
        wd.loop(now)
        time.sleep(0.05)


def test_a_worker_stopped_for_seconds_does_not_raise_the_saved_limit(tmp_path: Path) -> None:
    home = Home(tmp_path / "home").ensure()
    cfg = WatchdogConfig(interval=0.05, hang_factor=3, training_floor=5, training_ceiling=30, restart_daemon="never")
    wd = Watchdog(home, Settings(watchdog=cfg))
    status_file = str(home.status / "training.json")
    worker = subprocess.Popen([sys.executable, "-c", BEATING, status_file, "core.worker"])
    try:
        _loop_for(wd, home, worker.pid, 1.0)
        assert wd.clock.limit("training") == 5  # steady 0.1 s beats: the floor
        os.kill(worker.pid, signal.SIGSTOP)
        _loop_for(wd, home, worker.pid, 2.5)  # 3 x 2.5 s would be 7.5 s, above the floor
        os.kill(worker.pid, signal.SIGCONT)
        _loop_for(wd, home, worker.pid, 1.0)
        assert wd.worker_kill is None  # within the limit all along: not judged hung
    finally:
        worker.kill()
        worker.wait(10)
    assert any(phase == "training" and gap >= 2.0 for phase, gap in wd.clock.unlearned)  # the stop was seen
    saved = json.loads((home.status / WATCHDOG_STATUS).read_text())
    assert saved["longest_interval_s"]["training"] < 1.0 and saved["limits_s"]["training"] == 5
    assert Watchdog(home, Settings(watchdog=cfg)).clock.limit("training") == 5  # what a restart loads
    wd.shutdown()
