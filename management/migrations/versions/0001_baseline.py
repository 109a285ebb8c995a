"""Baseline: any model DB made before migrations existed, or none, brought to the schema of December 2026.

Homes made by earlier trainbox versions hold any subset of these tables and columns (the schema only
ever grew: ``promotions`` and ``version_gates``, ``jobs.attempts/retry_at/failure_class``,
``model_versions.kind/adapter_of``, ``runs.exit_code/exit_signal``, ``runs.oom_count_at_start/oom_kills``
came later), so this revision creates the missing tables and adds the missing columns the way the
retired ``add_missing_columns`` did (nullable, with the server default where the model has one), then
the DB is stamped and real revisions follow. The tables are frozen here, not read from the models: a
later column belongs to its own revision.

Revision ID: 0001
Revises:
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

meta = sa.MetaData()

sa.Table(
    "jobs",
    meta,
    sa.Column("id", sa.Integer(), primary_key=True),
    sa.Column("name", sa.String(), nullable=False),
    sa.Column("spool_name", sa.String(), nullable=False),
    sa.Column("sha256", sa.String(), nullable=False, index=True),
    sa.Column("priority", sa.String(), nullable=False),
    sa.Column("state", sa.String(), nullable=False, index=True),
    sa.Column("admitted_at", sa.Float(), nullable=False),
    sa.Column("started_at", sa.Float(), nullable=True),
    sa.Column("finished_at", sa.Float(), nullable=True),
    sa.Column("data_format", sa.String(), nullable=False),
    sa.Column("n_records", sa.Integer(), nullable=False),
    sa.Column("settings", sa.JSON(), nullable=False),
    sa.Column("error", sa.Text(), nullable=True),
    sa.Column("duplicate_of", sa.Integer(), nullable=True),
    sa.Column("init_version", sa.Integer(), nullable=True),
    sa.Column("init_model", sa.String(), nullable=False),
    sa.Column("attempts", sa.Integer(), nullable=False),
    sa.Column("retry_at", sa.Float(), nullable=True),
    sa.Column("failure_class", sa.String(), nullable=True),
)
sa.Table(
    "runs",
    meta,
    sa.Column("id", sa.Integer(), primary_key=True),
    sa.Column("job_id", sa.Integer(), sa.ForeignKey("jobs.id"), nullable=False, index=True),
    sa.Column("attempt", sa.Integer(), nullable=False),
    sa.Column("pid", sa.Integer(), nullable=True),
    sa.Column("started_at", sa.Float(), nullable=False),
    sa.Column("ended_at", sa.Float(), nullable=True),
    sa.Column("outcome", sa.String(), nullable=True),
    sa.Column("exit_status", sa.String(), nullable=True),
    sa.Column("exit_code", sa.Integer(), nullable=True),
    sa.Column("exit_signal", sa.Integer(), nullable=True),
    sa.Column("start_step", sa.Integer(), nullable=False),
    sa.Column("end_step", sa.Integer(), nullable=True),
    sa.Column("init_model", sa.String(), nullable=False),
    sa.Column("oom_count_at_start", sa.Integer(), nullable=True),
    sa.Column("oom_kills", sa.Integer(), nullable=True),
)
sa.Table(
    "checkpoints",
    meta,
    sa.Column("id", sa.Integer(), primary_key=True),
    sa.Column("job_id", sa.Integer(), sa.ForeignKey("jobs.id"), nullable=False, index=True),
    sa.Column("step", sa.Integer(), nullable=False),
    sa.Column("path", sa.String(), nullable=False),
    sa.Column("created_at", sa.Float(), nullable=False),
    sa.Column("train_loss", sa.Float(), nullable=True),
    sa.Column("val_loss", sa.Float(), nullable=True),
    sa.Column("size_bytes", sa.Integer(), nullable=False),
    sa.Column("deleted_at", sa.Float(), nullable=True),
)
sa.Table(
    "model_versions",
    meta,
    sa.Column("id", sa.Integer(), primary_key=True),
    sa.Column("path", sa.String(), nullable=False),
    sa.Column("parent_id", sa.Integer(), sa.ForeignKey("model_versions.id"), nullable=True),
    sa.Column("job_id", sa.Integer(), sa.ForeignKey("jobs.id"), nullable=True),
    sa.Column("base_model", sa.String(), nullable=False),
    sa.Column("data_sha256", sa.String(), nullable=False),
    sa.Column("train_loss", sa.Float(), nullable=True),
    sa.Column("val_loss", sa.Float(), nullable=True),
    sa.Column("steps", sa.Integer(), nullable=False),
    sa.Column("created_at", sa.Float(), nullable=False),
    sa.Column("kind", sa.String(), server_default="full", nullable=False),
    sa.Column("adapter_of", sa.String(), server_default="", nullable=False),
)
sa.Table(
    "events",
    meta,
    sa.Column("id", sa.Integer(), primary_key=True),
    sa.Column("time", sa.Float(), nullable=False, index=True),
    sa.Column("job_id", sa.Integer(), nullable=True, index=True),
    sa.Column("kind", sa.String(), nullable=False),
    sa.Column("message", sa.Text(), nullable=False),
    sa.Column("data", sa.JSON(), nullable=False),
)
sa.Table(
    "promotions",
    meta,
    sa.Column("id", sa.Integer(), primary_key=True),
    sa.Column("time", sa.Float(), nullable=False),
    sa.Column("version_id", sa.Integer(), sa.ForeignKey("model_versions.id"), nullable=False, index=True),
    sa.Column("previous_id", sa.Integer(), nullable=True),
    sa.Column("action", sa.String(), nullable=False),
    sa.Column("reason", sa.Text(), nullable=False),
)
sa.Table(
    "version_gates",
    meta,
    sa.Column("id", sa.Integer(), primary_key=True),
    sa.Column("time", sa.Float(), nullable=False),
    sa.Column("version_id", sa.Integer(), sa.ForeignKey("model_versions.id"), nullable=False, index=True),
    sa.Column("promoted", sa.Boolean(), nullable=False),
    sa.Column("reason", sa.Text(), nullable=False),
    sa.Column("eval_set", sa.String(), nullable=False),
    sa.Column("new_loss", sa.Float(), nullable=True),
    sa.Column("current_id", sa.Integer(), nullable=True),
    sa.Column("current_loss", sa.Float(), nullable=True),
    sa.Column("tolerance", sa.Float(), nullable=False),
)


def _added(column: sa.Column[object]) -> sa.Column[object]:
    """A column for an existing table: nullable (its old rows have no value) and without a foreign key
    (SQLite cannot add one to a table), keeping the server default so old rows read it."""
    default = column.server_default.arg if isinstance(column.server_default, sa.DefaultClause) else None
    text = default if isinstance(default, str) else None
    return sa.Column(column.name, column.type, nullable=True, server_default=text)


def upgrade() -> None:
    bind = op.get_bind()
    have = sa.inspect(bind)
    missing = [t for t in meta.sorted_tables if not have.has_table(t.name)]
    meta.create_all(bind, tables=missing)
    for table in meta.sorted_tables:
        if table in missing:
            continue
        names = {c["name"] for c in have.get_columns(table.name)}
        for column in table.columns:
            if column.name not in names:
                op.add_column(table.name, _added(column))


def downgrade() -> None:
    meta.drop_all(op.get_bind())
