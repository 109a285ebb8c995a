"""A full disk pauses the job and intake cleanly, and both resume when space returns.

On a real small filesystem (a tmpfs, when the tests run as root and may mount one) the disk is
really full; elsewhere the worker's test-only fault hook makes one save see no free space.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from management.db import ModelDB
from tests.e2e_helpers import DaemonProc, make_home, metrics, wait_for, write_jsonl

pytestmark = pytest.mark.e2e


@contextlib.contextmanager
def small_filesystem(path: Path, size_mb: int) -> Iterator[bool]:
    """Mount a tmpfs of ``size_mb`` at ``path``; yields False where mounting is not allowed."""
    path.mkdir(parents=True)
    mounted = (
        os.geteuid() == 0
        and shutil.which("mount") is not None
        and subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)]).returncode == 0
    )
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(path: Path, leave_bytes: int) -> Path:
    """A ballast file that leaves about ``leave_bytes`` free on the filesystem of ``path``."""
    ballast = path / "ballast.bin"
    size = max(0, shutil.disk_usage(path).free - leave_bytes)
    with open(ballast, "wb", buffering=0) as f:
        chunk = b"\0" * (1 << 20)
        try:
            while size > 0:
                n = min(size, len(chunk))
                f.write(chunk[:n])
                f.flush()
                size -= n
        except OSError:  # someone else wrote meanwhile: the disk is as full as it gets
            pass
    return ballast


def test_disk_full_pauses_then_resumes(tmp_path: Path, embedded: Path) -> None:
    with small_filesystem(tmp_path / "fs", 96) as real:
        root = tmp_path / "fs" / "home"
        home = make_home(root, embedded, max_steps=20, extra="disk_margin_mb = 1\n")  # into [training]
        text = home.config_file.read_text().replace("[daemon]\n", "[daemon]\ndisk_resume_free_bytes = 1\n", 1)
        home.config_file.write_text(text)
        env = {} if real else {"TRAINBOX_TEST_FAULT": "diskfull@10x1"}
        daemon = DaemonProc(home, env=env)
        try:
            wait_for(lambda: daemon.status()["daemon"]["state"] == "idle", 60, "daemon idle")
            ballast = _fill(root, leave_bytes=4 << 20) if real else None  # a checkpoint (8 MB) will not fit
            write_jsonl(home.inbox / "first.jsonl", [{"text": f"a small cat naps {i % 6}"} for i in range(60)])
            wait_for(lambda: daemon.status()["daemon"]["state"] == "disk_full", 90, "daemon state disk_full")
            db = ModelDB(home.db_url)
            job = db.jobs()[0]
            assert db.job(job.id).state == "paused"  # type: ignore[union-attr]
            run = db.runs(job.id)[0]
            assert run.outcome == "interrupted"
            assert not list((home.run_dir(job.id) / "checkpoints").glob(".tmp*")), "a partial checkpoint"
            # intake waits too: a new file stays in the inbox while the disk is full
            write_jsonl(home.inbox / "second.jsonl", [{"text": f"a big dog runs {i % 4}"} for i in range(40)])
            wait_for(lambda: daemon.status()["daemon"]["state"] == "disk_full", 5, "still disk_full")
            if ballast is not None:
                assert (home.inbox / "second.jsonl").exists()
                ballast.unlink()  # space comes back
            wait_for(lambda: len(list(home.done.glob("*.jsonl"))) == 2, 180, "both jobs done after space returned")
            steps = [m["step"] for m in metrics(home.run_dir(job.id)) if m["kind"] == "train"]
            assert steps == list(range(1, 21))
            events = [e.kind for e in db.events()]
            assert "job_disk_full" in events and "disk_ok" in events
            db.close()
        finally:
            assert daemon.stop() == 0, daemon.log_text()
