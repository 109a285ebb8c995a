"""What ``trainbox health`` reads from a model DB on a server (``[db] url`` set to PostgreSQL).

The SQLite checks open the file read-only with ``sqlite3``; a server DB is read through SQLAlchemy with
a one-off connection (no pool: health is a short-lived command), never migrated, its URL shown masked.
"""

from __future__ import annotations

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from management.db import display_url
from management.migrate import current, head

CONNECT_TIMEOUT_S = 5


def _engine(url: str) -> Engine:
    return create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": CONNECT_TIMEOUT_S})


def describe_server(url: str) -> tuple[bool, str]:
    """Reachable, and at which schema revision; False with the reason when it cannot be read."""
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            revision = current(conn)
    except SQLAlchemyError as e:
        first = (str(getattr(e, "orig", None) or e).strip().splitlines() or [""])[0]
        return False, f"cannot read {display_url(url)}: {type(e).__name__}: {first}"
    finally:
        engine.dispose()
    newest = head()
    shown = display_url(url)
    if revision == newest:
        return True, f"{shown}: schema at revision {revision}"
    return True, f"{shown}: schema at revision {revision}; the next process to open it upgrades it to {newest}"


def server_rows(url: str) -> tuple[dict[int, str], set[int]]:
    """Every job row's state and the jobs with a model version (``safety/checkup.py`` ``_rows``)."""
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            states = {int(i): str(st) for i, st in conn.execute(text("SELECT id, state FROM jobs"))}
            q = text("SELECT job_id FROM model_versions WHERE job_id IS NOT NULL")
            versions = {int(j) for (j,) in conn.execute(q)}
    finally:
        engine.dispose()
    return states, versions
