"""Lineages (issue 18): the chain of versions a job continues and a version belongs to; every existing
row is ``main``, the one chain a home had before.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("lineage", sa.String(), server_default="main", nullable=False))
    op.create_index(op.f("ix_jobs_lineage"), "jobs", ["lineage"], unique=False)
    op.add_column("model_versions", sa.Column("lineage", sa.String(), server_default="main", nullable=False))
    op.create_index(op.f("ix_model_versions_lineage"), "model_versions", ["lineage"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_model_versions_lineage"), table_name="model_versions")
    op.drop_column("model_versions", "lineage")
    op.drop_index(op.f("ix_jobs_lineage"), table_name="jobs")
    op.drop_column("jobs", "lineage")
