"""Leases through the model DB (issue 18): which host runs which lineage's job, and which host leads.

Several daemons share one model DB (PostgreSQL; SQLite on one host, where the same code runs unchanged).
A lease is a row (``management/db.py`` ``Lease``): a holder, an expiry and a generation. A host takes a
lease that is free, expired or its own (the generation grows by one), renews it while it works, and
releases it when done. A host that dies stops renewing; once the lease expires another host takes it,
with the next generation, and resumes the job from its checkpoint on the shared storage. A holder that
was only cut off (a partition, a stopped process) cannot finish what it started: the transaction that
records a job's end first checks that the lease still has the generation it took (``fence``).

A lineage's lease (``lineage:<name>``) is what makes a lineage one chain: the one job of that lineage
that may train, be gated and be filed, whichever host runs it. ``claim_job`` picks, in priority order
across the fleet, the first job whose lineage is free and takes that lineage's lease for it, in one
transaction: two hosts claiming at once never take the same lineage.

Why no queue library (procrastinate, pgqueuer, read for this): both are PostgreSQL-only (the embedded
default is SQLite, so trainbox would carry two claiming paths), both model a job as a Python function a
worker calls (a trainbox job is a spool file, a worker process, a gate and a filing, spread over ticks),
and neither hands out a fencing generation: a job one of them finds stalled can be finished by its old
worker and by its new one. What trainbox needs is this one table and the queries below.

Locks: PostgreSQL ``SELECT ... FOR UPDATE`` (``SKIP LOCKED`` while claiming, so a host finding a lineage
being claimed by another moves on to the next lineage instead of waiting). SQLite has one writer at a
time; the transaction's first statement is a write (``_write_first``), so it holds the write lock before
it reads and nothing it reads can change under it.

Clocks: an expiry is the holder's wall clock plus the TTL; hosts are assumed to agree within a few
seconds (NTP), well below the TTL (``fleet.lease_seconds``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy import select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from management.db import Job, Lease, ModelDB
from trainbox.states import JobState, Priority

LINEAGE = "lineage:"
NODE = "node:"  # node:<run id>:<k>: host k of a multi-node run, taken once (``take_once``; daemon/node_join.py)
LEADER = "leader"
RETENTION = "retention"  # the one host whose retention process deletes (management/fleet_role.py)
IN_PROGRESS = (JobState.RUNNING.value, JobState.PAUSED.value)


def lineage_lease(lineage: str) -> str:
    return LINEAGE + lineage


class LeaseLost(RuntimeError):
    """The lease was taken by another holder (or released): the work it covered must not be finished."""


@dataclass(frozen=True)
class Held:
    """A lease as its holder took it; ``generation`` is the fencing token."""

    name: str
    holder: str
    generation: int
    expires_at: float
    job_id: int | None = None


@dataclass(frozen=True)
class Claim:
    job_id: int
    lineage: str
    lease: Held
    resumed: bool  # a job another holder had started (its lease expired), not a queued one


# --- pure: which job a host claims next -------------------------------------------------------------


@dataclass(frozen=True)
class JobFacts:
    id: int
    lineage: str
    state: str
    priority: str
    admitted_at: float
    retry_at: float | None = None


def is_free(lease: Held | None, host: str, now: float) -> bool:
    """Takeable by ``host``: never taken, released, expired, or its own (a daemon restarted on the same
    host takes its lease back at once, with a new generation, instead of waiting out the TTL)."""
    return lease is None or not lease.holder or lease.expires_at <= now or lease.holder == host


def claim_order(jobs: Sequence[JobFacts], leases: dict[str, Held], host: str, now: float) -> list[int]:
    """Job ids in the order ``host`` tries to claim them: one per free lineage, a job already started
    (running or paused, its holder gone) before a waiting one of the same lineage; across lineages the
    started ones first, then by priority, then by admission. ``leases``: by lineage name."""

    def key(j: JobFacts) -> tuple[int, float, int]:
        return Priority(j.priority).rank, j.admitted_at, j.id

    free = {j.lineage for j in jobs if is_free(leases.get(j.lineage), host, now)}
    started = sorted((j for j in jobs if j.state in IN_PROGRESS and j.lineage in free), key=key)
    waiting = sorted(
        (
            j
            for j in jobs
            if j.state == JobState.QUEUED.value and (j.retry_at is None or j.retry_at <= now) and j.lineage in free
        ),
        key=key,
    )
    order: list[int] = []
    seen: set[str] = set()
    for j in [*started, *waiting]:
        if j.lineage not in seen:
            seen.add(j.lineage)
            order.append(j.id)
    return order


# --- the DB ----------------------------------------------------------------------------------------


def _write_first(s: Session) -> None:
    """SQLite: take the write lock with the transaction's first statement (a no-op UPDATE)."""
    if s.get_bind().dialect.name == "sqlite":
        s.execute(text("UPDATE leases SET generation = generation WHERE 1 = 0"))


def _row(s: Session, name: str, skip_locked: bool = False) -> Lease | None:
    """The lease's row, created if missing, locked for this transaction; None when ``skip_locked`` and
    another transaction holds it."""
    if s.scalars(select(Lease.name).where(Lease.name == name)).first() is None:
        insert = pg_insert if s.get_bind().dialect.name == "postgresql" else sqlite_insert
        s.execute(insert(Lease).values(name=name, holder="", generation=0, expires_at=0.0).on_conflict_do_nothing())
    q = select(Lease).where(Lease.name == name).with_for_update(skip_locked=skip_locked)
    return s.scalars(q.execution_options(populate_existing=True)).first()


def _take(row: Lease, host: str, ttl: float, now: float, job_id: int | None) -> Held:
    row.holder, row.generation, row.expires_at, row.acquired_at, row.job_id = (
        host,
        row.generation + 1,
        now + ttl,
        now,
        job_id,
    )
    return Held(row.name, host, row.generation, row.expires_at, job_id)


def _held(row: Lease) -> Held:
    return Held(row.name, row.holder, row.generation, row.expires_at, row.job_id)


def acquire(db: ModelDB, name: str, host: str, ttl: float, now: float | None = None) -> Held | None:
    """Take ``name`` if it is free for ``host`` (``is_free``); None when another holder has it."""
    now = time.time() if now is None else now
    with db.session() as s:
        _write_first(s)
        row = _row(s, name)
        assert row is not None
        if not is_free(_held(row), host, now):
            return None
        return _take(row, host, ttl, now, None)


def node_slot(run_id: int, node: int) -> str:
    return f"{NODE}{run_id}:{node}"


def take_once(db: ModelDB, name: str, host: str, ttl: float, job_id: int, now: float | None = None) -> Held | None:
    """Take ``name`` if nobody ever took it (generation 0); None otherwise, even once released or expired.
    A node slot of a multi-node run is such a lease: the run's rendezvous admits each node once, and a host
    joining after a node left (or after a dead host's slot expired) would find the round closed, or start a
    membership change in the agents still running; the run fails instead and its retry is a new run, with
    new slots."""
    now = time.time() if now is None else now
    with db.session() as s:
        _write_first(s)
        row = _row(s, name, skip_locked=True)
        if row is None or row.generation != 0:
            return None
        return _take(row, host, ttl, now, job_id)


def renew(db: ModelDB, held: Held, ttl: float, now: float | None = None) -> Held | None:
    """Extend a lease still at the generation ``held`` took; None when it was taken or released meanwhile
    (the holder must stop the work it covers). An expired lease nobody took is renewed: its unchanged
    generation proves nobody else acted under it."""
    now = time.time() if now is None else now
    with db.session() as s:
        q = (
            update(Lease)
            .where(Lease.name == held.name, Lease.holder == held.holder, Lease.generation == held.generation)
            .values(expires_at=now + ttl)
        )
        if s.execute(q).rowcount != 1:  # type: ignore[attr-defined]
            return None
    return Held(held.name, held.holder, held.generation, now + ttl, held.job_id)


def release(db: ModelDB, held: Held) -> bool:
    """Give the lease up (its work is done); False when it was no longer ours."""
    with db.session() as s:
        q = (
            update(Lease)
            .where(Lease.name == held.name, Lease.holder == held.holder, Lease.generation == held.generation)
            .values(holder="", expires_at=0.0, job_id=None)
        )
        return bool(s.execute(q).rowcount == 1)  # type: ignore[attr-defined]


def fence(s: Session, held: Held) -> None:
    """Inside the transaction that records a job's end: raise ``LeaseLost`` unless the lease is still at
    the generation ``held`` took. The row stays locked to the end of that transaction, so nobody takes
    the lease between the check and the commit."""
    _write_first(s)
    row = _row(s, held.name)
    assert row is not None
    if row.holder != held.holder or row.generation != held.generation:
        who = f"{row.holder} (generation {row.generation})" if row.holder else f"nobody (generation {row.generation})"
        raise LeaseLost(f"lease {held.name} of generation {held.generation} is held by {who} now")


def claim_job(
    db: ModelDB,
    host: str,
    ttl: float,
    now: float | None = None,
    accept: Callable[[Job], bool] = lambda job: True,
) -> Claim | None:
    """Claim the next job ``host`` should run (``claim_order``) and take its lineage's lease for it, in
    one transaction; None when no lineage with work is free. ``accept`` may refuse a job (a host whose
    GPU cannot fit it leaves it for another) and the next one is tried."""
    now = time.time() if now is None else now
    with db.session() as s:
        _write_first(s)
        jobs = s.scalars(select(Job).where(Job.state.in_([JobState.QUEUED.value, *IN_PROGRESS]))).all()
        rows = s.scalars(select(Lease).where(Lease.name.like(LINEAGE + "%"))).all()
        leases = {r.name[len(LINEAGE) :]: _held(r) for r in rows}
        facts = [JobFacts(j.id, j.lineage, j.state, j.priority, j.admitted_at, j.retry_at) for j in jobs]
        by_id = {j.id: j for j in jobs}
        seen = {f.id: f.state for f in facts}  # as read: the locked re-read below refreshes the same objects
        for job_id in claim_order(facts, leases, host, now):
            job = by_id[job_id]
            if not accept(job):
                continue
            row = _row(s, lineage_lease(job.lineage), skip_locked=True)
            if row is None or not is_free(_held(row), host, now):
                continue  # another host is claiming or took this lineage since the read
            locked = select(Job).where(Job.id == job_id).with_for_update(skip_locked=True)
            fresh = s.scalars(locked.execution_options(populate_existing=True)).first()
            if fresh is None or fresh.state != seen[job_id]:
                continue  # another host claimed and finished it since the read (PostgreSQL: read committed)
            held = _take(row, host, ttl, now, job_id)
            return Claim(job_id, job.lineage, held, resumed=seen[job_id] in IN_PROGRESS)
    return None


def leases(db: ModelDB) -> list[Held]:
    """Every lease row, for display (``trainbox fleet``, the API)."""
    with db.session() as s:
        return [_held(r) for r in s.scalars(select(Lease).order_by(Lease.name))]
