"""An existing home from the release before fleets (issue 18's acceptance): its SQLite DB at Alembic revision
0003 (what that release's migrations made), a finished job, its promoted model version and the
``models/current`` pointer. A real daemon started on it upgrades the DB in place to the newest revision,
keeps the job and the version (both now in lineage ``main``), and the next dropped file continues that
version: its job starts from version 1, and its version is version 1's child in the same chain."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import sqlalchemy as sa
from alembic import command

from management import migrate
from management.db import ModelDB
from tests.e2e_helpers import DaemonProc, make_home, wait_for, write_jsonl
from trainbox.home import Home
from trainbox.spool import spool_name

RELEASE = "0003"  # the revision the release before lineages, leases and hosts left every DB at


def _release_home(root: Path, embedded: Path) -> Home:
    """The home as that release left it, built with its own migrations and its tables' own columns."""
    home = make_home(root, embedded, max_steps=10)
    engine = sa.create_engine(home.db_url)
    with engine.connect() as conn:
        command.upgrade(migrate.alembic_config(conn), RELEASE)
        conn.commit()
    old = sa.MetaData()
    old.reflect(engine)
    assert "leases" not in old.tables and "lineage" not in old.tables["jobs"].c  # the release's schema
    version_dir = home.models / "v0001"
    shutil.copytree(embedded, version_dir)
    os.symlink("v0001", home.models / "current")
    done = home.done / spool_name(1, "first.jsonl")
    write_jsonl(done, [{"text": f"the old job's line {i}"} for i in range(20)])
    rows = {
        "jobs": dict(id=1, name="first.jsonl", spool_name=done.name, sha256="ab", priority="normal", state="done",
            admitted_at=1.0, finished_at=2.0, data_format="text", n_records=20, settings={}, init_model="",
            attempts=1),
        "runs": dict(id=1, job_id=1, attempt=1, started_at=1.5, ended_at=2.0, start_step=0, end_step=10,
            init_model="", exit_status="exit code 0", exit_code=0, outcome="completed"),
        "model_versions": dict(id=1, path=str(version_dir), job_id=1, base_model="embedded", data_sha256="ab",
            steps=10, created_at=2.0, kind="full", adapter_of="", val_loss=5.0),
        "promotions": dict(id=1, version_id=1, action="gate", reason="first version", time=2.0),
    }  # fmt: skip
    with engine.begin() as conn:
        for name, row in rows.items():
            table = old.tables[name]
            conn.execute(table.insert(), [{k: v for k, v in row.items() if k in table.c}])
    engine.dispose()
    return home


def test_a_release_home_upgrades_in_place_and_its_next_job_continues_its_model(tmp_path: Path, embedded: Path) -> None:
    home = _release_home(tmp_path / "home", embedded)
    daemon = DaemonProc(home)
    db: ModelDB | None = None
    try:
        write_jsonl(home.inbox / "second.jsonl", [{"text": f"a new line about foxes {i % 7}"} for i in range(40)])
        wait_for(lambda: list(home.done.glob("*second.jsonl")), 180, "the new job done")
        db = ModelDB(home.db_url)
        with db.engine.connect() as conn:
            assert migrate.current(conn) == migrate.head()  # upgraded in place, once
        old = db.job(1)
        assert old is not None and (old.name, old.state, old.lineage, old.n_records) == (
            "first.jsonl",
            "done",
            "main",
            20,
        )
        assert [r.outcome for r in db.runs(1)] == ["completed"]
        first = db.version(1)
        assert first is not None and (first.path, first.lineage, first.job_id) == (
            str(home.models / "v0001"),
            "main",
            1,
        )
        [new] = [j for j in db.jobs() if j.name == "second.jsonl"]
        assert new.id == 2 and new.state == "done" and new.lineage == "main"
        assert new.init_version == 1  # it continued the release's current model
        second = db.version_of_job(2)
        assert second is not None and second.parent_id == 1 and second.lineage == "main"
        assert [v.id for v in db.versions(lineage="main")] == [1, 2]  # one chain
        assert db.gates(second.id)  # gated against the release's version
    finally:
        if db is not None:
            db.close()
        assert daemon.stop() == 0, daemon.log_text()
