"""The model DB: SQLite (WAL, the default) or PostgreSQL (``[db] url``) through the SQLAlchemy 2 ORM.

Writers: the daemon (jobs, runs, model versions, events) and the worker (checkpoints, events).
The spool folders are the truth about where a job's file is; the DB is the record of what
happened to it. The schema is the models below plus the Alembic revisions that build it
(``management/migrations/``): a new column is a model change and a revision (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    create_engine,
    event,
    inspect,
    select,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.pool import NullPool

from management.schema_version import at_newest
from trainbox.lineage import MAIN
from trainbox.states import JobState


class Base(DeclarativeBase):
    pass


class Job(Base):
    """One dropped file, from admission (or rejection) to its end."""

    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String, doc="file name as dropped")
    spool_name: Mapped[str] = mapped_column(String, default="", doc="name inside queue/*")
    sha256: Mapped[str] = mapped_column(String, index=True, default="")
    priority: Mapped[str] = mapped_column(String, default="normal")
    state: Mapped[str] = mapped_column(String, index=True, default=JobState.QUEUED.value)
    admitted_at: Mapped[float] = mapped_column(Float, default=time.time)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    data_format: Mapped[str] = mapped_column(String, default="")
    n_records: Mapped[int] = mapped_column(Integer, default=0)
    settings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict, doc="sidecar overrides")
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    duplicate_of: Mapped[int | None] = mapped_column(Integer, nullable=True)
    init_version: Mapped[int | None] = mapped_column(Integer, nullable=True, doc="version it started from")
    init_model: Mapped[str] = mapped_column(String, default="", doc="model folder it started from")
    attempts: Mapped[int] = mapped_column(Integer, default=0, doc="failed attempts so far (not pauses)")
    retry_at: Mapped[float | None] = mapped_column(Float, nullable=True, doc="not dispatched before this time")
    failure_class: Mapped[str | None] = mapped_column(String, nullable=True)
    lineage: Mapped[str] = mapped_column(
        String, index=True, default=MAIN, server_default=MAIN, doc="the chain of versions it continues"
    )


class Run(Base):
    """One worker process for a job (a paused and resumed job has several)."""

    __tablename__ = "runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    started_at: Mapped[float] = mapped_column(Float, default=time.time)
    ended_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    outcome: Mapped[str | None] = mapped_column(String, nullable=True)
    exit_status: Mapped[str | None] = mapped_column(String, nullable=True)  # readable, for display
    exit_code: Mapped[int | None] = mapped_column(Integer, nullable=True)  # None when killed by a signal
    exit_signal: Mapped[int | None] = mapped_column(Integer, nullable=True)  # the signal that killed it
    start_step: Mapped[int] = mapped_column(Integer, default=0)
    end_step: Mapped[int | None] = mapped_column(Integer, nullable=True)
    init_model: Mapped[str] = mapped_column(String, default="")
    # the kernel's OOM-kill counter where the worker runs (``trainbox/oom_counter.py``): read when the
    # daemon records the run, and the kills counted while it ran once its end is known (None: unread)
    oom_count_at_start: Mapped[int | None] = mapped_column(Integer, nullable=True)
    oom_kills: Mapped[int | None] = mapped_column(Integer, nullable=True)
    host: Mapped[str | None] = mapped_column(String, nullable=True, doc="fleet.host of the daemon that ran it")
    # the generation of the lineage lease this run was started under (``management/leases.py``; None: no
    # fleet): two runs of one job on two hosts show which claim each was, and a resumed job's took it over
    lease_generation: Mapped[int | None] = mapped_column(Integer, nullable=True)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(String)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    train_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    val_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    deleted_at: Mapped[float | None] = mapped_column(Float, nullable=True)


PENDING_PATH = ""  # a version row whose folder is not in place yet (``management/registration.py``)


class ModelVersion(Base):
    """A trained model; ``models/current`` names the one the next job starts from (continual training).

    Registered in a crash-safe order (``management/registration.py``): the row first with ``path``
    empty (pending), then its folder ``models/v{id:04d}``, then ``path`` set (final). Only final rows
    are versions to readers; a pending one is settled by the daemon's start-up reconciliation."""

    __tablename__ = "model_versions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)  # the version number
    path: Mapped[str] = mapped_column(String, doc="its folder; empty while the registration is pending")
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"), nullable=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), nullable=True)
    base_model: Mapped[str] = mapped_column(String, default="")
    data_sha256: Mapped[str] = mapped_column(String, default="")
    train_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    val_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    steps: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    kind: Mapped[str] = mapped_column(
        String, default="full", server_default="full", doc="full: a whole model; adapter: a LoRA adapter"
    )
    adapter_of: Mapped[str] = mapped_column(
        String, default="", server_default="", doc="for an adapter: the model folder it applies to"
    )
    lineage: Mapped[str] = mapped_column(
        String, index=True, default=MAIN, server_default=MAIN, doc="its job's lineage (trainbox/lineage.py)"
    )


class Event(Base):
    __tablename__ = "events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    time: Mapped[float] = mapped_column(Float, default=time.time, index=True)
    job_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    kind: Mapped[str] = mapped_column(String)
    message: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class Promotion(Base):
    """Each change of ``models/current``: by the eval gate, ``models promote`` or ``models rollback``."""

    __tablename__ = "promotions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    time: Mapped[float] = mapped_column(Float, default=time.time)
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), index=True)
    previous_id: Mapped[int | None] = mapped_column(Integer, nullable=True, doc="current before this change")
    action: Mapped[str] = mapped_column(String, doc="gate, promote or rollback")
    reason: Mapped[str] = mapped_column(Text, default="")


class VersionGate(Base):
    """The eval gate's verdict on a version: scores, the version it was compared with, and why."""

    __tablename__ = "version_gates"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    time: Mapped[float] = mapped_column(Float, default=time.time)
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), index=True)
    promoted: Mapped[bool] = mapped_column(Boolean, default=False)
    reason: Mapped[str] = mapped_column(Text, default="")
    eval_set: Mapped[str] = mapped_column(String, default="", doc="frozen eval file, or the job's held-out set")
    new_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    current_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    current_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    tolerance: Mapped[float] = mapped_column(Float, default=0.0)


class MemorySet(Base):
    """A job's memory (issue 17): its validation examples (kind ``eval``, scored by every later gate) or a
    sample of its training examples (kind ``train``, replayed by later jobs), kept content-addressed as
    ``memory/<sha256>.jsonl`` (``management/memory.py``). One row per job and kind; a down-sample for the
    total cap replaces the row's sha."""

    __tablename__ = "memory_sets"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    kind: Mapped[str] = mapped_column(String, doc="eval or train")
    sha256: Mapped[str] = mapped_column(String, doc="of the file's bytes: memory/<sha256>.jsonl")
    n_examples: Mapped[int] = mapped_column(Integer, default=0)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    source_examples: Mapped[int] = mapped_column(Integer, default=0, doc="examples it was sampled from")
    seed: Mapped[int] = mapped_column(BigInteger, default=0, doc="the job's seed: the stored order")
    created_at: Mapped[float] = mapped_column(Float, default=time.time)


class MemoryScore(Base):
    """A version's loss on one job's memory set (the first ``n_examples`` of the set ``set_sha256``), as an
    eval gate scored it; stored so a later gate reuses it instead of scoring the current version again."""

    __tablename__ = "memory_scores"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), index=True)
    job_id: Mapped[int] = mapped_column(Integer, index=True, doc="the job whose memory set was scored")
    set_sha256: Mapped[str] = mapped_column(String)
    n_examples: Mapped[int] = mapped_column(Integer, default=0)
    loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    time: Mapped[float] = mapped_column(Float, default=time.time)


class Lease(Base):
    """A right held by one host for a time and renewed while it lasts (``management/leases.py``): a
    lineage's (``lineage:<name>``: the one job of that lineage that may run, train and be gated) or the
    fleet leader's. ``generation`` grows each time another holder takes it: the fencing token a host
    checks in the transaction that finishes its work, so one whose lease was taken cannot finish."""

    __tablename__ = "leases"
    name: Mapped[str] = mapped_column(String, primary_key=True)
    holder: Mapped[str] = mapped_column(String, default="", doc="the host holding it; empty: released")
    generation: Mapped[int] = mapped_column(Integer, default=0)
    expires_at: Mapped[float] = mapped_column(Float, default=0.0)
    acquired_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    job_id: Mapped[int | None] = mapped_column(Integer, nullable=True, doc="a lineage lease: the job it is for")


class Host(Base):
    """One daemon of a fleet (issue 18), by its ``fleet.host`` name: upserted at start, beaten every
    ``heartbeat_seconds``, marked stopped on a clean exit (``management/hosts.py``, ``daemon/host_beat.py``)."""

    __tablename__ = "hosts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String, unique=True)
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[float] = mapped_column(Float)
    heartbeat_at: Mapped[float] = mapped_column(Float)
    heartbeat_seconds: Mapped[float] = mapped_column(Float, doc="its promised beat: stale after 3 of them")
    state: Mapped[str] = mapped_column(String, doc="the daemon's state word, as in status/daemon.json")
    job_id: Mapped[int | None] = mapped_column(Integer, nullable=True, doc="the job it trains or holds paused")
    paused: Mapped[bool] = mapped_column(Boolean, default=False)
    version: Mapped[str] = mapped_column(String, default="", doc="its trainbox version")
    home: Mapped[str] = mapped_column(String, default="", doc="its home folder, for display")
    gpu: Mapped[str] = mapped_column(String, default="", doc="its GPUs in a few words; empty without")
    stopped_at: Mapped[float | None] = mapped_column(Float, nullable=True, doc="set on a clean exit")


class FleetControl(Base):
    """A pause, resume or stop for a fleet's daemons (``management/fleet_controls.py``): one host's (``host``)
    or every host's (``host`` empty), written by ``trainbox pause|resume|stop --host H | --fleet``."""

    __tablename__ = "fleet_controls"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    time: Mapped[float] = mapped_column(Float, default=time.time)
    action: Mapped[str] = mapped_column(String)
    host: Mapped[str] = mapped_column(String, default="", doc="the host it addresses; empty: every host")


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def make_engine(url: str) -> Engine:
    """An engine on a DB at the newest schema (``management/migrate.py``). SQLite gets WAL and a busy
    timeout (several processes write); PostgreSQL a pool that drops connections the server closed."""
    if make_url(url).get_backend_name() == "sqlite":
        engine = create_engine(url)
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5, pool_recycle=1800)
    if not at_newest(engine):
        from management.migrate import upgrade  # Alembic is loaded only when there is something to do

        try:
            upgrade(engine)
        except BaseException:
            engine.dispose()
            raise
    return engine


def display_url(url: str) -> str:
    """The URL as logs, status and the API may show it: any password masked."""
    return make_url(url).render_as_string(hide_password=True)


Guard = Callable[[Session], None]
# (db, guard, inside): the guard of this thread's (context's) transactions on db, and whether one is open
_GUARD: ContextVar[tuple[ModelDB, Guard, bool] | None] = ContextVar("trainbox_db_guard", default=None)


class ModelDB:
    """The handful of queries the processes need, so SQL lives in one module."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        guarded = _GUARD.get()
        check = guarded[1] if guarded is not None and guarded[0] is self and not guarded[2] else None
        token = _GUARD.set((self, check, True)) if check is not None else None  # one check per outermost one
        try:
            with self._sessions() as s, s.begin():
                if check is not None:
                    check(s)
                yield s
        finally:
            if token is not None:
                _GUARD.reset(token)

    @contextmanager
    def guarded(self, guard: Guard) -> Iterator[None]:
        """Every transaction this thread opens on this DB inside the block first runs ``guard`` in it, and
        commits nothing when it raises. A fleet's daemon files a job this way: each write of the filing
        (the run's end, the version, the gate, the job's state) checks in its own transaction that the
        job's lease is still this host's (``management/leases.py`` ``fence``), so a host cut off long
        enough for another to take the job over cannot record anything of it, however long it was
        stopped between two statements. Other threads (the host heartbeat) are not affected."""
        token = _GUARD.set((self, guard, False))
        try:
            yield
        finally:
            _GUARD.reset(token)

    def close(self) -> None:
        self.engine.dispose()

    def event(self, kind: str, message: str, job_id: int | None = None, **data: Any) -> None:
        with self.session() as s:
            s.add(Event(kind=kind, message=message, job_id=job_id, data=data))

    def job(self, job_id: int) -> Job | None:
        with self.session() as s:
            return s.get(Job, job_id)

    def run(self, run_id: int) -> Run | None:
        with self.session() as s:
            return s.get(Run, run_id)

    def jobs(self, states: list[JobState] | None = None) -> list[Job]:
        with self.session() as s:
            q = select(Job).order_by(Job.id)
            if states:
                q = q.where(Job.state.in_([st.value for st in states]))
            return list(s.scalars(q))

    def job_with_sha(self, sha256: str, states: list[JobState]) -> Job | None:
        with self.session() as s:
            q = select(Job).where(Job.sha256 == sha256, Job.state.in_([st.value for st in states])).order_by(Job.id)
            return s.scalars(q).first()

    def latest_version(self, lineage: str = MAIN) -> ModelVersion | None:
        """The lineage's newest final version (a pending registration is not a version yet)."""
        with self.session() as s:
            q = select(ModelVersion).where(ModelVersion.path != PENDING_PATH, ModelVersion.lineage == lineage)
            return s.scalars(q.order_by(ModelVersion.id.desc())).first()

    def versions(self, pending: bool = False, lineage: str | None = None) -> list[ModelVersion]:
        """Final versions, oldest first; ``pending``: with rows whose registration is not finished;
        ``lineage``: of that lineage only."""
        with self.session() as s:
            q = select(ModelVersion).order_by(ModelVersion.id)
            if not pending:
                q = q.where(ModelVersion.path != PENDING_PATH)
            if lineage is not None:
                q = q.where(ModelVersion.lineage == lineage)
            return list(s.scalars(q))

    def lineages(self) -> list[str]:
        """Every lineage a job or a version names, ``main`` first, then by name."""
        with self.session() as s:
            names = set(s.scalars(select(Job.lineage).distinct()))
            names |= set(s.scalars(select(ModelVersion.lineage).distinct()))
        return sorted(names | {MAIN}, key=lambda n: (n != MAIN, n))

    def version_of_job(self, job_id: int) -> ModelVersion | None:
        """The job's version, pending or final (a job registers at most one)."""
        with self.session() as s:
            return s.scalars(select(ModelVersion).where(ModelVersion.job_id == job_id)).first()

    def add_pending_version(self, **fields: Any) -> int:
        """Step 1 of a registration: the row, committed with no folder yet; its id names the folder."""
        with self.session() as s:
            row = ModelVersion(path=PENDING_PATH, **fields)
            s.add(row)
            s.flush()
            return row.id

    def set_version_path(self, version_id: int, path: str) -> None:
        """The last step of a registration: the folder is in place, the version is final."""
        with self.session() as s:
            row = s.get(ModelVersion, version_id)
            assert row is not None
            row.path = path

    def drop_pending_version(self, version_id: int) -> None:
        """A pending registration with nothing left to register (no folder, no final model)."""
        with self.session() as s:
            row = s.get(ModelVersion, version_id)
            if row is not None and row.path == PENDING_PATH:
                s.delete(row)

    def promoted_ids(self, lineage: str = MAIN) -> list[int]:
        """Versions the lineage's pointer was moved to (gate, promote, rollback), most recent first."""
        with self.session() as s:
            q = select(Promotion.version_id).join(ModelVersion, ModelVersion.id == Promotion.version_id)
            q = q.where(ModelVersion.lineage == lineage).order_by(Promotion.id.desc())
            return list(s.scalars(q))

    def mark_checkpoints_deleted(self, job_id: int, now: float) -> None:
        """A job's checkpoints were discarded as a whole (a job rebased onto the current version)."""
        with self.session() as s:
            for c in s.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.deleted_at.is_(None))):
                c.deleted_at = now

    def runs(self, job_id: int) -> list[Run]:
        with self.session() as s:
            return list(s.scalars(select(Run).where(Run.job_id == job_id).order_by(Run.id)))

    def checkpoints(self, job_id: int) -> list[Checkpoint]:
        with self.session() as s:
            q = select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step)
            return list(s.scalars(q))

    def events(self, job_id: int | None = None, kind: str | None = None) -> list[Event]:
        with self.session() as s:
            q = select(Event).order_by(Event.id)
            if job_id is not None:
                q = q.where(Event.job_id == job_id)
            if kind is not None:
                q = q.where(Event.kind == kind)
            return list(s.scalars(q))

    def version(self, version_id: int) -> ModelVersion | None:
        with self.session() as s:
            return s.get(ModelVersion, version_id)

    def promotions(self) -> list[Promotion]:
        with self.session() as s:
            return list(s.scalars(select(Promotion).order_by(Promotion.id)))

    def gates(self, version_id: int | None = None) -> list[VersionGate]:
        with self.session() as s:
            q = select(VersionGate).order_by(VersionGate.id)
            if version_id is not None:
                q = q.where(VersionGate.version_id == version_id)
            return list(s.scalars(q))


def schema_ready(url: str) -> bool:
    """Whether the model DB exists with its tables, made by the first opener; readers that must not be
    the one to create a SQLite file (watchdog, retention) wait for it. Read-only, never migrates."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_tables_ready(Path(parsed.database or ""))
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return set(Base.metadata.tables) <= set(inspect(conn).get_table_names())
    except SQLAlchemyError:
        return False
    finally:
        engine.dispose()


def _sqlite_tables_ready(db_file: Path) -> bool:
    if not db_file.is_file():
        return False
    try:
        con = sqlite3.connect(f"file:{db_file}?mode=ro", uri=True, timeout=10)
        try:
            names = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            con.close()
    except sqlite3.Error:
        return False
    return set(Base.metadata.tables) <= names
