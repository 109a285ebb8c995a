"""Spool names: order by name, no escape from the spool, no overwrite."""

from __future__ import annotations

from pathlib import Path

from daemon.spool import move
from trainbox.home import Home
from trainbox.spool import Spool, is_ignored, job_id_of, sanitize, spool_name
from trainbox.states import Priority


def test_sanitize_never_escapes() -> None:
    for evil in ("../../etc/passwd", "/abs/path.jsonl", "..\\..\\win.jsonl", "...", "", "a b$c.jsonl"):
        s = sanitize(evil)
        assert "/" not in s and "\\" not in s and not s.startswith(".") and s
    assert sanitize("a b$c.jsonl") == "a_b_c.jsonl"
    assert len(sanitize("x" * 500 + ".jsonl")) <= 120 and sanitize("x" * 500 + ".jsonl").endswith(".jsonl")


def test_spool_names_sort_in_admission_order() -> None:
    names = [spool_name(i, "z.jsonl") for i in (10, 2, 100)]
    assert sorted(names) == [spool_name(i, "z.jsonl") for i in (2, 10, 100)]
    assert job_id_of(spool_name(42, "a.jsonl")) == 42 and job_id_of("plain.jsonl") is None


def test_ignored_names() -> None:
    assert is_ignored(".hidden.jsonl") and is_ignored("x.jsonl.tmp") and is_ignored("x.part")
    assert not is_ignored("x.jsonl")


def test_move_never_overwrites(tmp_path: Path) -> None:
    a, b = tmp_path / "a" / "f.jsonl", tmp_path / "b" / "f.jsonl"
    for p, text in ((a, "one"), (b, "two")):
        p.parent.mkdir()
        p.write_text(text)
    moved = move(a, b.parent)
    assert moved.name == "f.1.jsonl" and moved.read_text() == "one" and b.read_text() == "two"


def test_waiting_order_priority_then_admission(tmp_path: Path) -> None:
    home = Home(tmp_path).ensure()
    for jid, prio in ((1, Priority.LOW), (2, Priority.NORMAL), (3, Priority.HIGH), (4, Priority.NORMAL)):
        (home.waiting(prio) / spool_name(jid, "x.jsonl")).write_text("{}")
    assert [w.job_id for w in Spool(home).waiting()] == [3, 2, 4, 1]
    assert Spool(home).counts()["normal"] == 2
