"""``/api/queue``: the spool's waiting jobs a page at a time, so 10,000 waiting files cost one
directory listing and a page of stats and DB rows, never 10,000 of each.

Order is the daemon's dispatch order (``Spool.waiting``): priority, then the job id of the spool
name (``<job id>__<name>``) as a number. A cursor is ``<priority>:<spool name>`` of the last job a
page listed; the next page is what sorts after it in that queue, so jobs dispatched or cancelled between two
pages never make a walk skip or repeat one that is still waiting.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass
from pathlib import Path

from management.db import Job, ModelDB
from monitoring import queries
from monitoring.schemas import DoneItem, FailedItem, QueueItem, QueueResponse
from monitoring.views import ERROR_SUFFIX, failed_item
from trainbox.home import Home
from trainbox.spool import JOB_SUFFIX, Spool, job_id_of
from trainbox.states import JobState, Priority

CURSOR_PATTERN = r"^(high|normal|low):[A-Za-z0-9._-]{1,200}$"


class CursorError(ValueError):
    """A cursor that names another queue than the ``priority`` asked for."""


@dataclass(frozen=True)
class Cursor:
    priority: Priority
    name: str

    @classmethod
    def parse(cls, raw: str) -> Cursor:
        """``raw`` already matched CURSOR_PATTERN (FastAPI checked it), so this cannot fail."""
        prio, _, name = raw.partition(":")
        return cls(Priority(prio), name)

    def __str__(self) -> str:
        return f"{self.priority.value}:{self.name}"


def waiting_names(folder: Path) -> list[str]:
    """The waiting job files of one priority folder in dispatch order (names only: no stat per file)."""
    try:
        with os.scandir(folder) as it:
            names = [e.name for e in it if e.name.endswith(JOB_SUFFIX) and job_id_of(e.name) is not None]
    except FileNotFoundError:
        return []
    names.sort(key=dispatch_key)
    return names


def dispatch_key(name: str) -> tuple[int, str]:
    """The daemon's order within a queue: the job id as a number (7-digit ids after 999,999), then name."""
    return (job_id_of(name) or 0, name)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _original_name(spool_file: str) -> str:
    _, sep, rest = spool_file.partition("__")
    return rest if sep else spool_file


def _item(path: Path, priority: str, state: str, position: int | None, row: Job | None) -> QueueItem:
    job_id = job_id_of(path.name)
    assert job_id is not None
    return QueueItem(
        job_id=job_id,
        name=row.name if row else _original_name(path.name),
        file=path.name,
        priority=priority or (row.priority if row else ""),
        position=position,
        state=row.state if row and state != JobState.QUEUED else state,
        size_bytes=_size(path),
        admitted_at=row.admitted_at if row else None,
        n_records=row.n_records if row else None,
        data_format=row.data_format if row else None,
    )


@dataclass
class WaitingPage:
    paths: list[tuple[Path, Priority, int]]  # (file, its queue, dispatch position)
    next: dict[str, str | None]


def waiting_page(home: Home, limit: int, priority: Priority | None, after: Cursor | None) -> WaitingPage:
    """At most ``limit`` jobs of each queue asked for, after ``after`` in its queue."""
    if after is not None:
        if priority is not None and priority != after.priority:
            raise CursorError(f"the cursor {after} belongs to the {after.priority.value} queue, not {priority.value}")
        priority = after.priority
    ahead = 0  # jobs of higher priority queues: dispatched before any of this queue
    paths: list[tuple[Path, Priority, int]] = []
    nexts: dict[str, str | None] = {}
    for p in Priority:
        folder = home.waiting(p)
        names = waiting_names(folder)
        if priority is None or p == priority:
            start = bisect.bisect_right(names, dispatch_key(after.name), key=dispatch_key) if after is not None else 0
            page = names[start : start + limit]
            paths += [(folder / n, p, ahead + start + i + 1) for i, n in enumerate(page)]
            more = start + limit < len(names)
            nexts[p.value] = str(Cursor(p, page[-1])) if more and page else None
        ahead += len(names)
    return WaitingPage(paths, nexts)


def failed_items(home: Home, limit: int) -> list[FailedItem]:
    """The newest ``limit`` ``failed/<name>.error.json``, newest first: only those are read, so a
    failed/ folder of thousands costs a listing and ``limit`` small reads."""
    try:
        with os.scandir(home.failed) as it:
            found = [(e.stat().st_mtime, e.path) for e in it if e.name.endswith(ERROR_SUFFIX)]
    except FileNotFoundError:
        return []
    found.sort(reverse=True)
    out = [failed_item(Path(path), mtime) for mtime, path in found[:limit]]
    out.sort(key=lambda f: (f.time or 0, f.job_id or 0), reverse=True)
    return out


def done_items(db: ModelDB, limit: int) -> list[DoneItem]:
    done_jobs = queries.jobs(db, JobState.DONE.value, limit)
    done_jobs.sort(key=lambda j: (j.finished_at or 0, j.id), reverse=True)
    versions = queries.versions_by_job(db, [j.id for j in done_jobs])
    return [
        DoneItem(
            job_id=j.id,
            name=j.name,
            finished_at=j.finished_at,
            version=versions[j.id].id if j.id in versions else None,
            train_loss=versions[j.id].train_loss if j.id in versions else None,
            val_loss=versions[j.id].val_loss if j.id in versions else None,
        )
        for j in done_jobs
    ]


def queue(
    home: Home,
    spool: Spool,
    db: ModelDB,
    recent: int,
    limit: int,
    priority: Priority | None = None,
    after: Cursor | None = None,
) -> QueueResponse:
    page = waiting_page(home, limit, priority, after)
    processing = spool.processing()
    ids = [i for i in (job_id_of(p.name) for p, _, _ in page.paths) if i is not None]
    ids += [i for i in (job_id_of(p.name) for p in processing) if i is not None]
    rows = queries.jobs_by_id(db, ids)

    def row(path: Path) -> Job | None:
        job_id = job_id_of(path.name)
        return rows.get(job_id) if job_id is not None else None

    # a waiting job's queue is its folder (where the daemon will look), even if its row lags behind
    waiting = [_item(path, p.value, JobState.QUEUED.value, pos, row(path)) for path, p, pos in page.paths]
    running = [_item(path, "", JobState.RUNNING.value, None, row(path)) for path in processing]
    return QueueResponse(
        waiting=waiting,
        next=page.next,
        processing=running,
        failed=failed_items(home, recent),
        done=done_items(db, recent),
        counts=spool.counts(),
    )
