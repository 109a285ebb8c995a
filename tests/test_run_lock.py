"""One worker per run folder (issue 14, D1): the run folder's flock, taken by real processes.

A second process that wants the folder of a live holder exits at once with ``EXIT_LOCKED`` and writes
nothing; the kernel frees the lock when its holder dies, even by SIGKILL; the lock file is never
followed through a link; and ``core.worker`` takes the lock before it touches its run folder.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from trainbox import run_lock
from trainbox.states import EXIT_LOCKED

REPO = Path(__file__).resolve().parents[1]
# a process that takes a run folder's lock (the last argument) as a worker does, says so, and holds it
# until SIGTERM (then exits 0) or 60 s; the lock taken, it exits EXIT_LOCKED without writing anything
HOLDER = """
import signal, sys
from pathlib import Path
from trainbox import run_lock
from trainbox.states import EXIT_LOCKED
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
try:
    lock = run_lock.acquire(Path(sys.argv[-1]))
except run_lock.RunLockHeld as e:
    print(e, file=sys.stderr)
    sys.exit(EXIT_LOCKED)
print("locked", flush=True)
signal.sigtimedwait([signal.SIGTERM], 60)
"""


def start_holder(run_dir: Path, as_worker: bool = True) -> subprocess.Popen[str]:
    """A lock holder in its own session; ``as_worker``: its argv names the run folder as a worker's does
    (``--run-dir DIR``), so a daemon takes it for one of that run's workers."""
    argv = [sys.executable, "-c", HOLDER, *(["--run-dir"] if as_worker else []), str(run_dir)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    pipe = subprocess.PIPE
    return subprocess.Popen(argv, env=env, stdout=pipe, stderr=pipe, text=True, start_new_session=True)


def holding(run_dir: Path, as_worker: bool = True) -> subprocess.Popen[str]:
    """A holder that has taken the lock (its "locked" line read)."""
    proc = start_holder(run_dir, as_worker)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def end(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_a_second_worker_exits_at_once_with_the_lock_code_and_writes_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "job-000001"
    run_dir.mkdir()
    first = holding(run_dir)
    try:
        before = snapshot(run_dir)
        second = start_holder(run_dir)
        _out, err = second.communicate(timeout=30)
        assert second.returncode == EXIT_LOCKED and f"pid {first.pid}" in err
        assert snapshot(run_dir) == before  # not even the lock file's record changed
        holder = run_lock.holder(run_dir)
        assert holder is not None and (holder.pid, holder.pgid) == (first.pid, first.pid)
    finally:
        end(first)
    assert first.returncode == -signal.SIGKILL
    assert run_lock.holder(run_dir) is None  # the kernel let go with the process, SIGKILL or not
    taken = run_lock.acquire(run_dir)
    taken.release()


def test_the_lock_file_is_never_followed_through_a_link(tmp_path: Path) -> None:
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me\n")
    run_dir = tmp_path / "job-000001"
    run_dir.mkdir()
    (run_dir / run_lock.LOCK_NAME).symlink_to(outside)
    with pytest.raises(OSError):
        run_lock.acquire(run_dir)
    assert outside.read_text() == "keep me\n" and run_lock.holder(run_dir) is None
    (run_dir / run_lock.LOCK_NAME).unlink()
    linked = tmp_path / "linked"
    linked.symlink_to(run_dir, target_is_directory=True)
    with pytest.raises(OSError):
        run_lock.acquire(linked)


def test_core_worker_takes_the_lock_before_it_touches_the_run_folder(tmp_path: Path) -> None:
    """In this process (the import is the cost): the lock held by another open file, ``main`` returns
    the lock code and leaves the folder exactly as it was: no result, no status, no log, no metrics."""
    from core import worker

    run_dir = tmp_path / "job-000001"
    run_dir.mkdir()
    (run_dir / "job.json").write_text("{}")  # a spec it would fail on, had it read it
    held = run_lock.acquire(run_dir)
    try:
        before = snapshot(run_dir)
        assert worker.main(["--run-dir", str(run_dir)]) == EXIT_LOCKED
        assert snapshot(run_dir) == before
    finally:
        held.release()


def test_a_holder_on_another_host_is_never_signalled(tmp_path: Path) -> None:
    """On shared storage the lock holds across hosts, but its pids are the holder's host's: a daemon that
    finds it held by another host's worker waits, and signals nothing here, even a process of that pid."""
    from daemon.orphans import lock_holder_pid

    proc = holding(tmp_path)
    try:
        pid, holder = lock_holder_pid(tmp_path)
        assert pid == proc.pid and holder is not None and holder.here and holder.host == socket.gethostname()
        record = json.loads((tmp_path / run_lock.LOCK_NAME).read_text())
        (tmp_path / run_lock.LOCK_NAME).write_text(json.dumps({**record, "host": "another-host"}))  # its host's view
        pid, holder = lock_holder_pid(tmp_path)
        assert pid is None and holder is not None and not holder.here and holder.pid == proc.pid
    finally:
        end(proc)
