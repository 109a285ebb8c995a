"""Crash-safe version registration and one chain of versions, driven through ``Daemon.tick`` with the
stub worker and gate (``tests/daemon_stubs.py``): a daemon SIGKILLed at a registration crash point
(a real child process, killed by the real crash point) leaves one version after the restart; an old
home's suffixed folder is removed; a retried job is retrained from current; another branch is not
promoted by the gate. No torch: each test takes a few seconds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from daemon.main import Daemon
from management.db import ModelDB, ModelVersion, Promotion
from management.versions import CURRENT, current_id, promote, rollback
from tests.daemon_stubs import daemon_factory
from tests.test_daemon_tick import FAST, drop, plan, starts, state_of, tick_until
from trainbox.config import Settings
from trainbox.crashpoints import CRASH_ENV
from trainbox.home import Home
from trainbox.states import JobState

SETTINGS = Settings.model_validate({"daemon": FAST})

# a daemon in a child process, ticking until a crash point kills it (or its deadline passes)
CHILD = """
import sys, time
from pathlib import Path
from daemon.main import Daemon
from tests.daemon_stubs import EVALUATE_ENTRY, worker_command
from tests.test_daemon_tick import FAST
from trainbox.config import Settings
from trainbox.home import Home

d = Daemon(Home(Path(sys.argv[1])), Settings.model_validate({"daemon": FAST}), worker_command=worker_command,
           evaluate_entry=EVALUATE_ENTRY)
d.start()
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    d.tick(time.time())
    time.sleep(0.02)
d.shutdown()
"""


@pytest.fixture
def home(tmp_path: Path) -> Home:
    return Home(tmp_path / "home").ensure()


@pytest.fixture
def make_daemon(home: Home) -> Iterator[Callable[..., Daemon]]:
    yield from daemon_factory(home, SETTINGS)


def version_like(home: Home) -> list[str]:
    return sorted(p.name for p in home.models.iterdir() if p.name.startswith("v"))


def kill_daemon_at(home: Home, point: str) -> None:
    env = {**os.environ, CRASH_ENV: point, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(home.root)], env=env, capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]


@pytest.mark.parametrize("point", ["version.row_pending", "version.renamed"])
def test_a_daemon_killed_inside_a_registration_leaves_one_version_after_restart(
    home: Home, make_daemon: Callable[..., Daemon], point: str
) -> None:
    d = make_daemon()
    drop(home, "first.jsonl")
    tick_until(d, lambda: current_id(home) == 1, "v1 current")
    d.shutdown()
    drop(home, "second.jsonl")
    kill_daemon_at(home, point)
    db = ModelDB(home.db_url)
    pending = db.versions(pending=True)[-1]
    assert (pending.id, pending.path) == (2, "")  # the row first, pending
    assert (home.models / "v0002").is_dir() == (point == "version.renamed")
    db.close()

    again = make_daemon()
    assert again.db is not None
    v2 = again.db.version(2)
    assert v2 is not None and v2.path == str(home.models / "v0002") and v2.parent_id == 1
    assert again.db.events(kind="version_adopted" if point == "version.renamed" else "version_placed")
    tick_until(again, lambda: state_of(again.db, "second.jsonl") == JobState.DONE, "second filed")  # type: ignore[arg-type]
    assert [v.id for v in again.db.versions()] == [1, 2] and version_like(home) == ["v0001", "v0002"]
    assert current_id(home) == 2 and (home.models / CURRENT).resolve() == home.models / "v0002"
    assert starts(home) == ["first.jsonl complete", "second.jsonl complete"]  # not trained twice


def test_an_old_homes_suffixed_and_orphan_folders_are_removed_and_current_resolves(
    home: Home, make_daemon: Callable[..., Daemon]
) -> None:
    db = ModelDB(home.db_url)
    for name, vid in (("v0001", 1), ("v0002", None), ("v0002.1", 2), ("v0003.1", None)):
        folder = home.models / name
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"w")
        if vid is not None:
            with db.session() as s:
                s.add(ModelVersion(id=vid, path=str(folder), parent_id=vid - 1 or None))
                s.add(Promotion(version_id=vid, previous_id=vid - 1 or None, action="gate"))
    os.symlink("v0002.1", home.models / CURRENT)
    db.close()
    d = make_daemon()
    assert d.db is not None
    assert version_like(home) == ["v0001", "v0002.1"]  # v0002 (orphan) and v0003.1 (no row) gone from models/
    removed = {e.data["folder"] for e in d.db.events(kind="version_folder_set_aside")}
    assert removed == {"v0002", "v0003.1"} and len(list((home.models / ".orphaned").iterdir())) == 2
    assert current_id(home) == 2
    drop(home, "next.jsonl")
    tick_until(d, lambda: state_of(d.db, "next.jsonl") == JobState.DONE, "next done")  # type: ignore[arg-type]
    v3 = d.db.version(3)
    assert v3 is not None and v3.parent_id == 2 and v3.path == str(home.models / "v0003") and current_id(home) == 3


def test_a_job_retried_after_another_was_promoted_is_retrained_from_current(
    home: Home, make_daemon: Callable[..., Daemon]
) -> None:
    d = make_daemon()
    assert d.db is not None
    drop(home, "first.jsonl")
    tick_until(d, lambda: current_id(home) == 1, "v1 current")
    plan(home, {"retried.jsonl": ["crash", "complete"]})
    drop(home, "retried.jsonl", "high")
    tick_until(d, lambda: state_of(d.db, "retried.jsonl") == JobState.QUEUED and len(starts(home)) == 2, "the crash")  # type: ignore[arg-type]
    retried = next(j for j in d.db.jobs() if j.name == "retried.jsonl")
    assert retried.init_version == 1
    stale = home.run_dir(retried.id) / "checkpoints" / "step-00000001"
    stale.mkdir(parents=True)  # what a real worker would have resumed from
    (stale / "COMPLETE").touch()
    drop(home, "other.jsonl", "low")
    tick_until(d, lambda: current_id(home) == 2, "the other job's version promoted")
    assert retried.retry_at is not None
    d.tick(retried.retry_at + 0.01)
    tick_until(d, lambda: state_of(d.db, "retried.jsonl") == JobState.DONE, "the retried job done")  # type: ignore[arg-type]
    rebased = d.db.events(job_id=retried.id, kind="job_rebased")
    assert len(rebased) == 1 and (rebased[0].data["from_version"], rebased[0].data["to_version"]) == (1, 2)
    assert not (home.run_dir(retried.id) / "checkpoints").exists()
    assert json.loads((home.run_dir(retried.id) / "job.json").read_text())["init_model"] == str(home.models / "v0002")
    version = d.db.version_of_job(retried.id)
    assert version is not None and version.parent_id == 2 and d.db.job(retried.id).init_version == 2  # type: ignore[union-attr]
    assert current_id(home) == version.id == 3  # one chain: 1 -> 2 -> 3


def test_another_branch_is_not_promoted_by_the_gate_but_can_be_by_hand(
    home: Home, make_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text('{"model_type": "gpt2"}')
    (base / "model.safetensors").write_bytes(b"w")
    d = make_daemon()
    assert d.db is not None
    drop(home, "first.jsonl")
    tick_until(d, lambda: current_id(home) == 1, "v1 current")
    (home.inbox / "named.toml").write_text(f"model = {json.dumps(str(base))}\n")
    drop(home, "named.jsonl")
    tick_until(d, lambda: d.db.gates(2), "the named job's gate")  # type: ignore[union-attr]
    gate = d.db.gates(2)[0]
    assert not gate.promoted and current_id(home) == 1
    assert "version 2 was trained from no version" in gate.reason and "version 1 is current" in gate.reason
    assert promote(home, d.db, SETTINGS, 2).promoted and current_id(home) == 2  # a person may
    # a rollback while a gate evaluates: the verdict may not move current to the branch it left
    (home.root / "stub-gate-hold").touch()
    drop(home, "third.jsonl")
    tick_until(d, lambda: d.gates.child is not None, "the third job's gate evaluating")
    assert rollback(home, d.db).id == 1
    (home.root / "stub-gate-hold").unlink()
    tick_until(d, lambda: d.db.gates(3), "the third job's gate")  # type: ignore[union-attr]
    gate = d.db.gates(3)[0]
    assert not gate.promoted and "trained from version 2" in gate.reason and current_id(home) == 1
    assert [j.state for j in d.db.jobs()] == [JobState.DONE] * 3
