"""checkpoints.size_bytes as a 64-bit integer: a checkpoint of 2 GiB or more overflows PostgreSQL's INTEGER.

SQLite stores any integer in the same 8 bytes whatever the declared type, so only PostgreSQL changes.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        op.alter_column("checkpoints", "size_bytes", type_=sa.BigInteger(), existing_type=sa.Integer())


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        op.alter_column("checkpoints", "size_bytes", type_=sa.Integer(), existing_type=sa.BigInteger())
