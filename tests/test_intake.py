"""Intake completeness: the pure tracker, then a real watchdog observer on a real folder."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from daemon.intake import InboxWatcher, Readiness, inbox_files, is_candidate


def wait_for(cond: Callable[[], bool], timeout: float = 10.0, every: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(every)
    return cond()


def test_closed_file_is_ready_after_a_short_quiet(tmp_path: Path) -> None:
    f = tmp_path / "a.jsonl"
    f.write_text("x")
    r = Readiness(settle_seconds=30)
    r.note(f, "created", 0.0)
    r.note(f, "opened", 0.0)
    r.note(f, "modified", 0.0)
    assert r.ready(1.0) == []  # still open
    r.note(f, "closed", 1.0)
    assert r.ready(1.05) == []
    assert r.ready(1.5) == [f]


def test_open_file_is_never_ready_even_when_settled(tmp_path: Path) -> None:
    f = tmp_path / "slow.jsonl"
    f.write_text("x")
    r = Readiness(settle_seconds=1)
    r.note(f, "opened", 0.0)
    assert r.ready(100.0) == []


def test_reader_open_close_does_not_block(tmp_path: Path) -> None:
    f = tmp_path / "b.jsonl"
    f.write_text("x")
    r = Readiness(settle_seconds=5)
    r.note(f, "moved_in", 0.0)
    r.note(f, "opened", 0.1)
    r.note(f, "closed_nowrite", 0.1)
    assert r.ready(0.5) == [f]


def test_scanned_file_needs_stable_size(tmp_path: Path) -> None:
    f = tmp_path / "c.jsonl"
    f.write_text("x")
    r = Readiness(settle_seconds=2)
    r.scan([f], 0.0)
    assert r.ready(0.0) == []
    f.write_text("xy")  # grows: the settle clock restarts at the next look
    assert r.ready(1.0) == []
    assert r.ready(2.5) == []
    assert r.ready(3.1) == [f]


def test_vanished_files_are_forgotten(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text("x")
    r = Readiness(settle_seconds=0)
    r.scan([f], 0.0)
    f.unlink()
    assert r.ready(10.0) == [] and len(r) == 0


def test_candidates_skip_temp_hidden_and_sidecars(tmp_path: Path) -> None:
    (tmp_path / "high").mkdir()
    for name in ("a.jsonl", "a.toml", ".x.jsonl", "y.jsonl.tmp", "z.part", "high/b.jsonl", "orphan.toml"):
        (tmp_path / name).write_text("{}")
    names = sorted(p.relative_to(tmp_path).as_posix() for p in inbox_files(tmp_path))
    assert names == ["a.jsonl", "high/b.jsonl"]
    assert not is_candidate(tmp_path / "orphan.toml")


def _watcher(inbox: Path, settle: float = 30.0) -> InboxWatcher:
    w = InboxWatcher(inbox, settle_seconds=settle, polling=False, clock=time.monotonic)
    w.start()
    return w


def test_real_observer_slow_writer_waits_for_close(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    w = _watcher(inbox, settle=0.5)  # a short settle: only the open handle can hold the file back
    try:
        f = inbox / "slow.jsonl"
        with open(f, "w") as out:
            for i in range(5):
                out.write(f'{{"text": "chunk {i}"}}\n')
                out.flush()
                time.sleep(0.3)
                assert f not in w.ready(), f"admitted while still open after chunk {i}"
            time.sleep(1.0)  # longer than the settle time, still open
            assert f not in w.ready()
        assert wait_for(lambda: f in w.ready(), 5)
    finally:
        w.stop()


def test_real_observer_copy_move_and_rename(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    (inbox / "high").mkdir(parents=True)
    outside = tmp_path / "elsewhere.jsonl"
    outside.write_text('{"text": "x"}\n')
    w = _watcher(inbox, settle=1.0)
    try:
        copied = inbox / "copied.jsonl"
        shutil.copyfile(outside, copied)  # written in place: closed event
        tmp = inbox / "renamed.jsonl.tmp"
        tmp.write_text('{"text": "y"}\n')
        renamed = inbox / "high" / "renamed.jsonl"
        os.rename(tmp, renamed)  # temp name then rename: moved event
        moved = inbox / "moved.jsonl"
        os.rename(outside, moved)  # moved in from the same filesystem: created only, settles
        assert wait_for(lambda: {copied, renamed, moved} <= set(w.ready()), 10)
        assert tmp not in w.ready()
    finally:
        w.stop()


def test_files_present_at_start_are_found(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    early = inbox / "early.jsonl"
    early.write_text('{"text": "x"}\n')
    w = _watcher(inbox, settle=0.3)
    try:
        assert wait_for(lambda: early in w.ready(), 5)
    finally:
        w.stop()
