"""Pause, resume and stop addressed to a fleet's daemons through the model DB (issue 18).

A home's ``control/`` folder reaches the daemon of that home only; a request for another host, or for every
host of the fleet, is a row of ``fleet_controls`` (``trainbox pause|resume|stop --host H`` or ``--fleet``).
Each daemon of the fleet reads the rows that address it (its host, or every host) every heartbeat:
- at its start, the newest pause or resume among them says whether it starts paused (a host that joins a
  paused fleet stays paused until a resume), and the stops written before it started are history;
- afterwards each new row is applied in order, exactly as a request in its own ``control/`` would be.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import ColumnElement, func, or_, select

from management.db import FleetControl, ModelDB

PAUSE, RESUME, STOP = "pause", "resume", "stop"
ACTIONS = (PAUSE, RESUME, STOP)


@dataclass(frozen=True)
class Request:
    id: int
    action: str
    host: str  # empty: every host


def submit(db: ModelDB, action: str, host: str = "") -> int:
    """Write a request for ``host`` (empty: every host of the fleet); returns its id."""
    if action not in ACTIONS:
        raise ValueError(f"fleet control {action!r}: expected one of {', '.join(ACTIONS)}")
    with db.session() as s:
        row = FleetControl(action=action, host=host)
        s.add(row)
        s.flush()
        return row.id


def _for(host: str) -> ColumnElement[bool]:
    return or_(FleetControl.host == "", FleetControl.host == host)


def addressed(db: ModelDB, host: str, after_id: int) -> list[Request]:
    """The requests for ``host`` (or every host) newer than ``after_id``, oldest first."""
    with db.session() as s:
        q = select(FleetControl).where(FleetControl.id > after_id, _for(host)).order_by(FleetControl.id)
        return [Request(r.id, r.action, r.host) for r in s.scalars(q)]


def starting_state(db: ModelDB, host: str) -> tuple[bool | None, int]:
    """At a daemon's start: whether the newest pause or resume for it says paused (None: there is none),
    and the newest request id (what it has seen)."""
    with db.session() as s:
        latest = s.scalar(select(func.max(FleetControl.id))) or 0
        q = select(FleetControl.action).where(_for(host), FleetControl.action.in_([PAUSE, RESUME]))
        last = s.scalars(q.order_by(FleetControl.id.desc()).limit(1)).first()
    return (None if last is None else last == PAUSE), latest
