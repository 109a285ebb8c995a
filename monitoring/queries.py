"""The status server's own DB reads beyond ``management.db.ModelDB``'s: paged events, counts by state.

Read-only queries that only the API's paging needs, so they live with the server; every write and
every query another process shares stays in ``ModelDB``.
"""

from __future__ import annotations

from sqlalchemy import func, select

from management.db import Event, Job, ModelDB, ModelVersion


def events(
    db: ModelDB, since_id: int | None, limit: int, job_id: int | None = None, before_id: int | None = None
) -> list[Event]:
    """Events after ``since_id``, oldest first; without it, the newest ``limit`` events (still oldest
    first). ``before_id`` bounds either from above, so a client can page back from any event."""
    with db.session() as s:
        q = select(Event)
        if job_id is not None:
            q = q.where(Event.job_id == job_id)
        if before_id is not None:
            q = q.where(Event.id < before_id)
        if since_id is not None:
            return list(s.scalars(q.where(Event.id > since_id).order_by(Event.id).limit(limit)))
        newest = list(s.scalars(q.order_by(Event.id.desc()).limit(limit)))
        return newest[::-1]


def event_exists(db: ModelDB, job_id: int | None, above: int | None = None, below: int | None = None) -> bool:
    """Whether an event lies strictly between ``above`` and ``below``: tells a page whether to offer a cursor."""
    with db.session() as s:
        q = select(Event.id)
        if job_id is not None:
            q = q.where(Event.job_id == job_id)
        if above is not None:
            q = q.where(Event.id > above)
        if below is not None:
            q = q.where(Event.id < below)
        return s.scalar(q.limit(1)) is not None


def last_event_id(db: ModelDB) -> int:
    with db.session() as s:
        return int(s.scalar(select(func.max(Event.id))) or 0)


def job_counts(db: ModelDB) -> dict[str, int]:
    with db.session() as s:
        return {str(state): int(n) for state, n in s.execute(select(Job.state, func.count()).group_by(Job.state))}


def jobs(db: ModelDB, state: str | None, limit: int, before: int | None = None) -> list[Job]:
    """Newest first; ``before`` (a job id) is the cursor of the page after the one that ended there."""
    with db.session() as s:
        q = select(Job).order_by(Job.id.desc()).limit(limit)
        if state:
            q = q.where(Job.state == state)
        if before is not None:
            q = q.where(Job.id < before)
        return list(s.scalars(q))


def jobs_by_id(db: ModelDB, ids: list[int]) -> dict[int, Job]:
    if not ids:
        return {}
    with db.session() as s:
        return {j.id: j for j in s.scalars(select(Job).where(Job.id.in_(ids)))}


def versions_by_job(db: ModelDB, job_ids: list[int]) -> dict[int, ModelVersion]:
    if not job_ids:
        return {}
    with db.session() as s:
        q = select(ModelVersion).where(ModelVersion.job_id.in_(job_ids))
        return {v.job_id: v for v in s.scalars(q) if v.job_id is not None}
