"""Admission with a real DB (SQLite and PostgreSQL) and real files: every dropped file ends in exactly one place."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from daemon.admission import Admission
from management.db import ModelDB
from trainbox.config import DaemonConfig
from trainbox.home import Home
from trainbox.spool import Spool
from trainbox.states import JobState, Priority


@pytest.fixture
def env(tmp_path: Path, any_db_url: str) -> tuple[Home, Admission, ModelDB]:
    """On each backend (tests/conftest.py ``any_db_url``): admission's queries are the daemon's busiest."""
    home = Home(tmp_path).ensure()
    spool = Spool(home)
    spool.ensure()
    db = ModelDB(any_db_url)
    yield home, Admission(home, spool, db, DaemonConfig()), db
    db.close()


def _write(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _everywhere(home: Home) -> list[str]:
    return sorted(
        p.relative_to(home.root).as_posix()
        for p in home.root.rglob("*")
        if p.is_file() and not p.name.startswith("trainbox.db")
    )


def test_valid_file_is_queued_by_folder_priority(env: tuple[Home, Admission, ModelDB]) -> None:
    home, adm, db = env
    src = _write(home.inbox / "high" / "my data.jsonl", [{"text": "hello"}, {"text": "world"}])
    result = adm.admit(src)
    assert result.state == JobState.QUEUED
    assert result.path == home.waiting(Priority.HIGH) / f"{result.job_id:06d}__my_data.jsonl"
    assert not src.exists()
    job = db.job(result.job_id)
    assert job is not None and job.state == "queued" and job.n_records == 2 and job.priority == "high"
    assert len(job.sha256) == 64


def test_invalid_file_fails_with_line_numbers(env: tuple[Home, Admission, ModelDB]) -> None:
    home, adm, db = env
    rows = [json.dumps({"text": f"t{i}"}) for i in range(14)]
    rows[6] = "{not json"
    rows[11] = json.dumps({"prompt": "p"})
    src = home.inbox / "bad.jsonl"
    src.write_text("\n".join(rows) + "\n")
    result = adm.admit(src)
    assert result.state == JobState.REJECTED and result.path.parent == home.failed
    err = json.loads(result.path.with_name(result.path.name + ".error.json").read_text())
    assert err["class"] == "bad_input"
    assert [(e["line"], e["field"]) for e in err["validation"]["errors"]] == [(7, ""), (12, "completion")]
    assert "line 7" in err["reason"] and "line 12" in err["reason"]
    assert db.job(result.job_id).state == "rejected"  # type: ignore[union-attr]


def test_duplicate_content_is_rejected_and_names_the_first(env: tuple[Home, Admission, ModelDB]) -> None:
    home, adm, _db = env
    first = adm.admit(_write(home.inbox / "a.jsonl", [{"text": "same"}]))
    second = adm.admit(_write(home.inbox / "copy-of-a.jsonl", [{"text": "same"}]))
    assert second.state == JobState.REJECTED
    assert f"duplicate of job {first.job_id}" in second.reason


def test_same_name_twice_never_overwrites(env: tuple[Home, Admission, ModelDB]) -> None:
    home, adm, _db = env
    a = adm.admit(_write(home.inbox / "data.jsonl", [{"text": "one"}]))
    b = adm.admit(_write(home.inbox / "data.jsonl", [{"text": "two"}]))
    assert a.path != b.path and a.path.read_text() != b.path.read_text()


def test_sidecar_sets_priority_and_settings(env: tuple[Home, Admission, ModelDB]) -> None:
    home, adm, db = env
    _write(home.inbox / "val.jsonl.src", [{"text": "v"}])  # not a candidate name; used as eval file
    (home.inbox / "job.toml").write_text('priority = "low"\nmax_steps = 7\neval_file = "val.jsonl.src"\n')
    result = adm.admit(_write(home.inbox / "job.jsonl", [{"text": "x"}]))
    assert result.state == JobState.QUEUED and result.path.parent == home.waiting(Priority.LOW)
    job = db.job(result.job_id)
    assert job is not None and job.settings == {"max_steps": 7}
    run_dir = home.run_dir(result.job_id)
    assert (run_dir / "sidecar.toml").exists() and (run_dir / "eval.jsonl").exists()
    assert not (home.inbox / "job.toml").exists()


def test_bad_sidecar_rejects_with_key(env: tuple[Home, Admission, ModelDB]) -> None:
    home, adm, _db = env
    (home.inbox / "j.json").write_text('{"learning_rat": 1}')
    result = adm.admit(_write(home.inbox / "j.jsonl", [{"text": "x"}]))
    assert result.state == JobState.REJECTED and "learning_rat" in result.reason
    assert (home.failed / (result.path.stem + ".json")).exists()  # the sidecar went with its file


def test_non_jsonl_file_is_rejected_not_lost(env: tuple[Home, Admission, ModelDB]) -> None:
    home, adm, _db = env
    src = home.inbox / "notes.txt"
    src.write_text("hello")
    result = adm.admit(src)
    assert result.state == JobState.REJECTED and result.path.read_text() == "hello"


def test_recover_finishes_an_interrupted_admission(env: tuple[Home, Admission, ModelDB]) -> None:
    home, adm, db = env
    staged = adm.spool.admitting / "000042__x.jsonl"
    _write(staged, [{"text": "x"}])
    assert adm.recover() == [] and adm.busy  # decided by the main loop's next admission slice
    results = adm.work([], budget_s=30)
    assert [r.job_id for r in results] == [42] and results[0].state == JobState.QUEUED
    assert not staged.exists() and db.job(42) is not None
    assert _everywhere(home) == ["queue/normal/000042__x.jsonl"]
