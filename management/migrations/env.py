"""Alembic's entry point, run by ``management/migrate.py`` with a connection already in a locked transaction.

No ``alembic.ini`` and no logging set-up here: the process that opens the DB owns its logging, and the
migration must commit or roll back with the lock that guards it, so alembic is given the connection and
never begins or commits on its own.
"""

from __future__ import annotations

from alembic import context

from management.db import Base
from management.migrate import compare_type

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, compare_type=compare_type)
with context.begin_transaction():
    context.run_migrations()
