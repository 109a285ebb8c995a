"""``trainbox status --watch`` and ``trainbox logs [JOB] [-f]`` (issue 19): a bounded live display from a
home as a training daemon leaves it, Ctrl-C ending a real watching process cleanly, and following a worker
log while it grows until its job is no longer the daemon's current one."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from typer.testing import CliRunner

from cli.logs import follow, latest_job
from cli.main import app
from tests.e2e_helpers import wait_for
from tests.monitoring_helpers import FAKE_JOB, populate, write_daemon_status, write_training_status
from trainbox.home import Home

REPO = Path(__file__).resolve().parent.parent


def _home(tmp_path: Path) -> Home:
    home = Home(tmp_path / "home")
    populate(home)
    write_daemon_status(home)
    write_training_status(home, step=120, total_steps=300, loss=1.2345, eta_s=75.0)
    return home


def test_status_watch_shows_step_loss_eta_and_queue(tmp_path: Path) -> None:
    home = _home(tmp_path)
    r = CliRunner().invoke(app, ["status", "--watch", "--count", "2", "--interval", "0.1", "--home", str(home.root)])
    assert r.exit_code == 0, r.output
    out = r.output
    assert f"job {FAKE_JOB} current.jsonl: training" in out
    assert "120/300" in out and "1.2345" in out and "1m15s" in out  # step, loss, ETA
    assert "high" in out and "next: " in out and "Ctrl-C to quit" in out


def test_status_watch_ends_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    home = _home(tmp_path)
    env = {**os.environ, "FORCE_COLOR": "1", "COLUMNS": "120", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "status", "--watch", "--interval", "0.2", "--home", str(home.root)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        # as at a terminal: SIGINT's default action, even when this test runs in a background job whose
        # shell ignores SIGINT (inherited: Python then installs no KeyboardInterrupt and Ctrl-C never lands)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    stdout = proc.stdout
    assert stdout is not None
    seen = bytearray()

    def read() -> None:
        for chunk in iter(lambda: stdout.read1(4096), b""):
            seen.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        wait_for(lambda: b"Ctrl-C to quit" in seen, 30, "the first frame")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(5)
    assert b"Traceback" not in seen and b"120/300" in seen


def test_logs_prints_the_latest_job_log_made_safe(tmp_path: Path) -> None:
    home = Home(tmp_path / "home").ensure()
    for job, text in ((2, "old\n"), (11, "--- worker start\nstep 1 loss 2.0 \x1b[2J\u202e\n")):
        home.run_dir(job).mkdir(parents=True)
        (home.run_dir(job) / "worker.log").write_text(text)
    assert latest_job(home) == 11
    r = CliRunner().invoke(app, ["logs", "--home", str(home.root)])  # no daemon runs: the latest job
    assert r.exit_code == 0
    assert r.output == "--- worker start\nstep 1 loss 2.0 \\u001b[2J\\u202e\n"  # escapes shown, not obeyed
    assert CliRunner().invoke(app, ["logs", "2", "--home", str(home.root)]).output == "old\n"
    missing = CliRunner().invoke(app, ["logs", "7", "--home", str(home.root)])
    assert missing.exit_code == 1 and "job 7 has no worker log" in missing.output


def test_follow_prints_what_is_appended_until_the_job_ends(tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    log.write_text("line 1\n")
    out = io.StringIO()
    running = threading.Event()
    running.set()
    follower = threading.Thread(target=follow, args=(log, running.is_set, out))
    follower.start()
    try:
        wait_for(lambda: out.getvalue() == "line 1\n", 10, "the log so far")
        with open(log, "a") as f:
            f.write("line 2\n")
        wait_for(lambda: out.getvalue() == "line 1\nline 2\n", 10, "the appended line")
        with open(log, "a") as f:
            f.write("last line\n")
        running.clear()  # the job ended: the rest is printed, then follow returns
        follower.join(10)
        assert not follower.is_alive()
    finally:
        running.clear()
    assert out.getvalue() == "line 1\nline 2\nlast line\n"
