"""Bring a model DB to the newest schema with the Alembic revisions in ``management/migrations/``.

Every process that opens the DB calls ``upgrade``; the first one to find the DB behind migrates it, under a
lock held for one transaction, so two processes starting at once never both migrate and a process killed
half-way leaves the DB as it was: SQLite takes its write lock up front (``BEGIN IMMEDIATE``: its DDL is
transactional, the other opener waits in the busy timeout), PostgreSQL a transaction-scoped advisory lock.
Once the DB is at head, opening costs one read of ``alembic_version`` and no lock.

``python -m management.migrate revision "MESSAGE"`` writes a new revision from the difference between the
models and the newest schema (see docs/ARCHITECTURE.md, "Adding a column").
"""

from __future__ import annotations

import argparse
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Column, Connection, create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.types import TypeEngine

MIGRATIONS = Path(__file__).with_name("migrations")
# pg_advisory_xact_lock key: any constant no other user of the database takes ("trainbox" in ASCII)
PG_LOCK_KEY = 0x747261696E626F78


def compare_type(
    context: MigrationContext,
    inspected: Column[Any],
    metadata: Column[Any],
    inspected_type: TypeEngine[Any],
    metadata_type: TypeEngine[Any],
) -> bool | None:
    """SQLite stores by affinity (INTEGER and BIGINT are the same 8 bytes), so there only a change of
    affinity is a difference; elsewhere Alembic's own comparison (None)."""
    if context.dialect.name == "sqlite":
        return inspected_type._type_affinity is not metadata_type._type_affinity
    return None


def alembic_config(connection: Connection | None = None) -> Config:
    """Built in code: nothing is read from an alembic.ini, so an installed trainbox needs none."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


@cache
def head() -> str:
    """The newest revision (read from the scripts once per process)."""
    rev = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert rev is not None
    return rev


def current(connection: Connection) -> str | None:
    """The DB's revision; None for an empty DB or one made before migrations existed."""
    return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine) -> None:
    """Migrate to head unless already there; safe to call from several processes at once."""
    with engine.connect() as conn:
        if current(conn) == head():
            return
    with engine.connect() as conn:
        _lock(conn)
        found = current(conn)  # again: someone else may have migrated while we waited for the lock
        if found != head():
            _refuse_newer(found)
            command.upgrade(alembic_config(conn), "head")
        conn.commit()


class SchemaTooNew(RuntimeError):
    """The DB was migrated by a newer trainbox (another host of a fleet, or a downgrade)."""


def _refuse_newer(found: str | None) -> None:
    scripts = ScriptDirectory.from_config(alembic_config())
    if found is not None and found not in {s.revision for s in scripts.walk_revisions()}:
        raise SchemaTooNew(
            f"the model DB is at schema revision {found}, which this trainbox does not know (its newest is "
            f"{head()}): a newer trainbox migrated it; upgrade this one"
        )


def _lock(conn: Connection) -> None:
    """Begin the migration's transaction holding the DB-wide lock that keeps other migrators out."""
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    elif conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_LOCK_KEY})


def new_revision(message: str) -> None:
    """Autogenerate a revision: the models against a scratch SQLite DB upgraded to the current head.
    Check the result by hand (types PostgreSQL changes but SQLite ignores need an explicit alter)."""
    with tempfile.TemporaryDirectory() as tmp:
        engine = create_engine(f"sqlite:///{tmp}/scratch.db")
        try:
            upgrade(engine)
            with engine.begin() as conn:
                command.revision(alembic_config(conn), message, autogenerate=True, rev_id=_next_id())
        finally:
            engine.dispose()


def _next_id() -> str:
    return f"{int(head()) + 1:04d}"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m management.migrate")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("revision", help="write a new revision from the models").add_argument("message")
    args = parser.parse_args()
    new_revision(args.message)


if __name__ == "__main__":
    main()
