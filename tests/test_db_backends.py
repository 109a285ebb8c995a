"""The model DB on SQLite and PostgreSQL: migrations agree with the models, old homes upgrade in place and keep
their rows, two processes opening a new DB at once migrate it once, the queries behave the same on both."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from management import migrate
from management.db import (
    Base,
    Checkpoint,
    Job,
    ModelDB,
    Promotion,
    Run,
    VersionGate,
    display_url,
    schema_ready,
)
from management.schema_version import newest_revision
from trainbox.config import Settings
from trainbox.home import Home
from trainbox.states import JobState

REPO = Path(__file__).resolve().parents[1]

# What each older trainbox lacked against the baseline (from `git log -p management/db.py`): its tables
# and columns were created by that version's create_all, the missing ones added later.
OLD_SCHEMAS: dict[str, tuple[set[str], dict[str, set[str]]]] = {
    "c4fa583 (the first)": (
        {"promotions", "version_gates"},
        {
            "jobs": {"attempts", "retry_at", "failure_class"},
            "runs": {"exit_code", "exit_signal", "oom_count_at_start", "oom_kills"},
            "model_versions": {"kind", "adapter_of"},
        },
    ),
    "764f75a (before the OOM counter)": (set(), {"runs": {"oom_count_at_start", "oom_kills"}}),
}


def _baseline() -> ModuleType:
    path = REPO / "management/migrations/versions/0001_baseline.py"
    spec = importlib.util.spec_from_file_location("baseline_0001", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _old_metadata(version: str) -> sa.MetaData:
    """The schema an older trainbox made: the frozen baseline tables minus what that version lacked."""
    no_tables, no_columns = OLD_SCHEMAS[version]
    old = sa.MetaData()
    for table in _baseline().meta.sorted_tables:
        if table.name in no_tables:
            continue
        drop = no_columns.get(table.name, set())
        columns = [c._copy() for c in table.columns if c.name not in drop]
        sa.Table(table.name, old, *columns)
    return old


def _revision(engine: sa.Engine) -> str | None:
    with engine.connect() as conn:
        return migrate.current(conn)


def test_the_models_and_the_migrations_agree(any_db_url: str) -> None:
    """Fails when a model changes without a revision (or a revision without the model)."""
    db = ModelDB(any_db_url)
    try:
        with db.engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": migrate.compare_type})
            assert compare_metadata(context, Base.metadata) == []
        assert _revision(db.engine) == migrate.head()
    finally:
        db.close()


@pytest.mark.parametrize("version", sorted(OLD_SCHEMAS))
def test_an_old_homes_db_upgrades_in_place_and_keeps_its_rows(any_db_url: str, version: str) -> None:
    engine = sa.create_engine(any_db_url)
    old = _old_metadata(version)
    old.create_all(engine)
    rows = {
        "jobs": dict(id=7, name="old.jsonl", spool_name="000007__old.jsonl", sha256="ab", priority="high",
            state="done", admitted_at=1.5, data_format="chat", n_records=3, settings={"epochs": 1}, init_model="",
            attempts=2),
        "runs": dict(id=1, job_id=7, attempt=1, started_at=2.0, start_step=0, init_model="", exit_status="exit code 0",
            exit_code=0),
        "model_versions": dict(id=1, path="/h/models/v0001", job_id=7, base_model="tiny", data_sha256="ab", steps=5,
            created_at=3.0, kind="full", adapter_of=""),
    }  # fmt: skip
    with engine.begin() as conn:
        for name, row in rows.items():
            table = old.tables[name]
            conn.execute(table.insert(), [{k: v for k, v in row.items() if k in table.c}])
    if engine.dialect.name == "postgresql":  # explicit ids leave the sequence behind, as in a real old home
        with engine.begin() as conn:
            conn.execute(sa.text("SELECT setval('jobs_id_seq', 7)"))
    engine.dispose()

    db = ModelDB(any_db_url)
    try:
        assert _revision(db.engine) == migrate.head()
        job = db.job(7)
        assert job is not None and (job.name, job.state, job.settings, job.n_records) == (
            "old.jsonl",
            "done",
            {"epochs": 1},
            3,
        )
        had = {c for t in old.tables.values() for c in (f"{t.name}.{col.name}" for col in t.columns)}
        assert job.attempts == (2 if "jobs.attempts" in had else None)  # added by the upgrade: old rows have none
        run = db.runs(7)[0]
        assert (run.exit_status, run.exit_code, run.oom_kills) == (
            "exit code 0",
            0 if "runs.exit_code" in had else None,
            None,
        )
        version_row = db.version(1)
        assert version_row is not None and (version_row.path, version_row.kind, version_row.adapter_of) == (
            "/h/models/v0001",
            "full",
            "",
        )
        with db.session() as s:  # the new columns and tables take writes
            s.add(Promotion(version_id=1, action="gate"))
            s.add(VersionGate(version_id=1, promoted=True, reason="first"))
            s.get(Run, 1).oom_kills = 0  # type: ignore[union-attr]
            s.add(Job(name="new.jsonl", attempts=1))
        assert db.promoted_ids() == [1] and [g.reason for g in db.gates(1)] == ["first"]
        assert [j.id for j in db.jobs()] == [7, 8]  # ids go on after the old rows
    finally:
        db.close()


def test_two_processes_opening_a_new_db_at_once_migrate_it_once(any_db_url: str, tmp_path: Path) -> None:
    go = tmp_path / "go"
    opener = (
        "import sys, time, pathlib\n"
        "from management.db import ModelDB\n"
        "go = pathlib.Path(sys.argv[2]); deadline = time.monotonic() + 30\n"
        "while not go.exists() and time.monotonic() < deadline: time.sleep(0.005)\n"
        "ModelDB(sys.argv[1]).close()\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", opener, any_db_url, str(go)], cwd=REPO, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    # both import while the go file is missing; written, it releases them together
    go.write_text("")
    errors = [p.communicate(timeout=60)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    engine = sa.create_engine(any_db_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all() == [migrate.head()]
    finally:
        engine.dispose()


def test_queries_behave_the_same_on_both_backends(any_db_url: str) -> None:
    """The ModelDB queries the processes use, on the types PostgreSQL is strict about."""
    db = ModelDB(any_db_url)
    try:
        assert db.latest_version() is None and db.versions() == [] and db.promoted_ids() == []
        with db.session() as s:
            a = Job(name="A.jsonl", sha256="x", state=JobState.QUEUED.value, settings={"lr": 0.5, "n": [1, 2]})
            b = Job(name="a.jsonl", sha256="x", state=JobState.DONE.value)
            s.add_all([a, b])
        assert db.job_with_sha("x", [JobState.DONE]).name == "a.jsonl"  # type: ignore[union-attr]
        assert [j.name for j in db.jobs([JobState.QUEUED])] == ["A.jsonl"]
        assert db.job(a.id).settings == {"lr": 0.5, "n": [1, 2]}  # type: ignore[union-attr]
        pending = db.add_pending_version(job_id=a.id, base_model="tiny", steps=3, train_loss=1.25)
        assert db.latest_version() is None and [v.id for v in db.versions(pending=True)] == [pending]
        db.set_version_path(pending, "/h/models/v0001")
        assert db.latest_version().id == pending  # type: ignore[union-attr]
        assert db.version_of_job(a.id).train_loss == 1.25  # type: ignore[union-attr]
        with db.session() as s:
            s.add(Checkpoint(job_id=a.id, step=10, path="/c10", size_bytes=5 * 2**30))  # past 32 bits
            s.add(Run(job_id=a.id, pid=2**22, started_at=time.time()))
        db.mark_checkpoints_deleted(a.id, 99.5)
        assert [(c.size_bytes, c.deleted_at) for c in db.checkpoints(a.id)] == [(5 * 2**30, 99.5)]
        db.event("done", "finished", job_id=a.id, loss=0.25, why="ünïcode")
        assert [(e.kind, e.data) for e in db.events(job_id=a.id, kind="done")] == [
            ("done", {"loss": 0.25, "why": "ünïcode"})
        ]
        extra = db.add_pending_version(job_id=b.id)
        db.drop_pending_version(extra)
        assert [v.id for v in db.versions(pending=True)] == [pending]
        assert schema_ready(any_db_url)
    finally:
        db.close()


def test_the_newest_revision_read_from_file_names_is_alembics_head() -> None:
    assert newest_revision() == migrate.head()


def test_schema_ready_is_false_before_the_first_opener(tmp_path: Path) -> None:
    assert not schema_ready(f"sqlite:///{tmp_path / 'trainbox.db'}")
    assert not (tmp_path / "trainbox.db").exists()  # looking did not create it


def test_the_configured_url_wins_and_a_password_is_never_shown(tmp_path: Path) -> None:
    home = Home(tmp_path)
    assert Settings().db.url_for(home.db_url) == f"sqlite:///{tmp_path / 'trainbox.db'}"  # the default, as before
    url = "postgresql+psycopg://trainbox:s3cr3t@db.example/trainbox"
    assert Settings.model_validate({"db": {"url": url}}).db.url_for(home.db_url) == url
    shown = display_url(url)
    assert "s3cr3t" not in shown and "trainbox@db.example" in shown.replace(":***", "")


def test_health_reads_a_server_db_and_never_shows_its_password(postgres_server: Any, tmp_path: Path) -> None:
    from safety.checkup import Level, check_db, check_spool_db

    home = Home(tmp_path).ensure()
    url = postgres_server.create_database()
    db = ModelDB(url)
    try:
        with db.session() as s:
            s.add(Job(name="a.jsonl", state=JobState.QUEUED.value))  # queued, but its file is nowhere
    finally:
        db.close()
    ok = check_db(home, url)
    assert ok.level == Level.OK and f"revision {migrate.head()}" in ok.detail
    spool = check_spool_db(home, url)
    assert spool.level == Level.WARNING and "job(s) [1]" in spool.detail
    wrong = url.replace("postgres@", "postgres:s3cr3t@").replace("/t", "/missing_t", 1)
    down = check_db(home, wrong)
    assert down.level == Level.CRITICAL and "missing_t" in down.detail and "s3cr3t" not in down.detail
    assert not home.db_file.exists()


def test_the_api_shows_a_jobs_db_url_masked(tmp_path: Path) -> None:
    from monitoring.views import _spec

    (tmp_path / "job.json").write_text('{"job_id": 1, "db_url": "postgresql+psycopg://tb:s3cr3t@db/tb"}')
    spec = _spec(tmp_path)
    assert spec is not None and spec["job_id"] == 1 and "s3cr3t" not in spec["db_url"] and "@db/tb" in spec["db_url"]


def test_the_status_servers_paging_queries_on_both_backends(any_db_url: str) -> None:
    from monitoring import queries

    db = ModelDB(any_db_url)
    try:
        assert queries.last_event_id(db) == 0 and queries.job_counts(db) == {}
        with db.session() as s:
            s.add_all([Job(name=f"j{i}.jsonl", state="done" if i % 2 else "queued") for i in range(1, 6)])
        for i in range(1, 8):
            db.event("bulk", f"event {i}", job_id=1 if i <= 3 else None)
        assert [e.message for e in queries.events(db, None, 3)] == ["event 5", "event 6", "event 7"]
        assert [e.id for e in queries.events(db, 2, 2)] == [3, 4]
        assert [e.id for e in queries.events(db, None, 10, job_id=1, before_id=3)] == [1, 2]
        assert queries.event_exists(db, None, above=6) and not queries.event_exists(db, 1, above=3)
        assert queries.last_event_id(db) == 7 and queries.job_counts(db) == {"done": 3, "queued": 2}
        assert [j.id for j in queries.jobs(db, "done", 2)] == [5, 3]
        assert [j.id for j in queries.jobs(db, None, 10, before=3)] == [2, 1]
        version = db.add_pending_version(job_id=2)
        assert sorted(queries.jobs_by_id(db, [1, 2, 9])) == [1, 2]
        assert queries.versions_by_job(db, [2, 3])[2].id == version
    finally:
        db.close()


def test_a_db_migrated_by_a_newer_trainbox_is_refused_with_the_reason(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'trainbox.db'}"
    ModelDB(url).close()
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    with pytest.raises(migrate.SchemaTooNew, match=r"revision 9999.*upgrade this one"):
        ModelDB(url)


def test_the_workers_writes_on_both_backends(any_db_url: str) -> None:
    """What a worker writes through job.json's ``db_url`` (core/jobdb.py): checkpoint rows, their deletion, events."""
    from core.jobdb import JobDB

    db = ModelDB(any_db_url)
    with db.session() as s:
        job = Job(name="a.jsonl")
        s.add(job)
    worker = JobDB(any_db_url, job.id)
    try:
        worker.checkpoint_saved(10, Path("/r/c10"), {"train_loss": 1.5, "size_bytes": 3 * 2**31})
        worker.checkpoint_saved(20, Path("/r/c20"), {"val_loss": 1.25})
        worker.checkpoints_deleted([Path("/r/c10")])
        worker.event("checkpoint", "saved", step=20)
    finally:
        worker.close()
    try:
        rows = [(c.step, c.size_bytes, c.train_loss, c.val_loss, c.deleted_at is None) for c in db.checkpoints(job.id)]
        assert rows == [(10, 3 * 2**31, 1.5, None, False), (20, 0, None, 1.25, True)]
        assert [(e.kind, e.data) for e in db.events(job_id=job.id)] == [("checkpoint", {"step": 20})]
    finally:
        db.close()
