"""The ``hosts`` table's reads and writes (issue 18): each a single statement, so two daemons racing for one name
are settled by the DB on SQLite and PostgreSQL alike, without a lock of our own.

A new name is an INSERT that the unique ``name`` lets only one daemon win. An existing row is taken by an UPDATE
that matches the row as the claimant judged it (pid, start, last beat): if its daemon beat or another claimant
took it meanwhile, nothing matches and the claimant looks again. A beat matches the beating daemon's own
``(pid, started_at)``, so a daemon whose name was taken learns it from a beat that changed no row.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any, cast

from sqlalchemy import CursorResult, select, update
from sqlalchemy.exc import IntegrityError

from management.db import Host, ModelDB
from management.fleet import HostRecord


def _record(row: Host) -> HostRecord:
    return HostRecord(**{f.name: getattr(row, f.name) for f in fields(HostRecord)})


def all_hosts(db: ModelDB) -> list[HostRecord]:
    """Every host that ever joined, by name."""
    with db.session() as s:
        return [_record(r) for r in s.scalars(select(Host).order_by(Host.name))]


def host(db: ModelDB, name: str) -> HostRecord | None:
    with db.session() as s:
        row = s.scalars(select(Host).where(Host.name == name)).first()
        return None if row is None else _record(row)


def insert(db: ModelDB, record: HostRecord) -> bool:
    """Add a new host's row; False when another daemon added one with this name first."""
    try:
        with db.session() as s:
            s.add(Host(**asdict(record)))
    except IntegrityError:
        return False
    return True


def take(db: ModelDB, record: HostRecord, seen: HostRecord) -> bool:
    """Replace the row ``seen`` (as it was read) with ``record``; False when it changed since."""
    fields = {k: v for k, v in asdict(record).items() if k != "name"}
    return _update(
        db,
        [
            Host.name == seen.name,
            Host.pid == seen.pid,
            Host.started_at == seen.started_at,
            Host.heartbeat_at == seen.heartbeat_at,
        ],
        fields,
    )


def beat(db: ModelDB, mine: HostRecord, now: float, state: str, job_id: int | None, paused: bool) -> bool:
    """The daemon ``mine`` is alive in ``state``; False when its row now belongs to another daemon."""
    values = {"heartbeat_at": now, "state": state, "job_id": job_id, "paused": paused}
    return _update(db, _owned(mine), values)


def mark_stopped(db: ModelDB, mine: HostRecord, now: float) -> bool:
    """A clean exit: the name is free at once (no wait for staleness); False when it was not ours any more."""
    values = {"heartbeat_at": now, "stopped_at": now, "state": "stopped", "job_id": None}
    return _update(db, _owned(mine), values)


def _owned(mine: HostRecord) -> list[Any]:
    return [Host.name == mine.name, Host.pid == mine.pid, Host.started_at == mine.started_at]


def _update(db: ModelDB, where: list[Any], values: dict[str, Any]) -> bool:
    with db.session() as s:
        stmt = update(Host).where(*where).values(**values).execution_options(synchronize_session=False)
        result = cast(CursorResult[Any], s.execute(stmt))
        return result.rowcount == 1
