"""Memory sets and memory scores (issue 17): each job's kept validation and training samples, and each
version's loss on them as the eval gate scored it.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "memory_sets",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("sha256", sa.String(), nullable=False),
        sa.Column("n_examples", sa.Integer(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("source_examples", sa.Integer(), nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["jobs.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_memory_sets_job_id"), "memory_sets", ["job_id"], unique=False)
    op.create_table(
        "memory_scores",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("set_sha256", sa.String(), nullable=False),
        sa.Column("n_examples", sa.Integer(), nullable=False),
        sa.Column("loss", sa.Float(), nullable=True),
        sa.Column("time", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["version_id"],
            ["model_versions.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_memory_scores_job_id"), "memory_scores", ["job_id"], unique=False)
    op.create_index(op.f("ix_memory_scores_version_id"), "memory_scores", ["version_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_memory_scores_version_id"), table_name="memory_scores")
    op.drop_index(op.f("ix_memory_scores_job_id"), table_name="memory_scores")
    op.drop_table("memory_scores")
    op.drop_index(op.f("ix_memory_sets_job_id"), table_name="memory_sets")
    op.drop_table("memory_sets")
