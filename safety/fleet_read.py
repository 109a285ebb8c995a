"""What ``trainbox health`` reads of the fleet: the ``hosts`` rows, read-only (a SQLite file opened with
``mode=ro``, a server DB through a one-off connection), never creating or migrating the DB."""

from __future__ import annotations

from dataclasses import fields

from sqlalchemy import create_engine, select
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from management.db import Host, schema_ready
from management.fleet import HostRecord


def read_hosts(url: str) -> list[HostRecord] | None:
    """Every host's row; None while the DB or its hosts table does not exist yet. Raises SQLAlchemyError."""
    if not schema_ready(url):
        return None
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        url = f"sqlite:///file:{parsed.database}?mode=ro&uri=true"
    engine = create_engine(url, poolclass=NullPool)
    names = [f.name for f in fields(HostRecord)]
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(*(Host.__table__.c[n] for n in names))).mappings().all()
    finally:
        engine.dispose()
    return [HostRecord(**dict(r)) for r in rows]
