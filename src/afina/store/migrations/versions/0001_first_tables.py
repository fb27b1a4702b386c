"""The first tables: data files, runs, their data and stages, events, models and aliases.

Revision ID: 0001
Revises:
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Spelled out rather than imported from afina.store.tables: a migration must create the same
# tables whatever later versions of that module say.
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TIMESTAMP = sa.DateTime(timezone=True)


def one_of(column: str, *values: str) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def upgrade() -> None:
    op.create_table(
        "data_files",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("format", sa.String(32), nullable=False),
        sa.Column("rows", sa.Integer(), nullable=False),
        sa.Column("report", JSON, nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_data_files")),
        sa.UniqueConstraint("sha256", name=op.f("uq_data_files_sha256")),
    )
    op.create_table(
        "runs",
        sa.Column("id", sa.String(200), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("config", JSON, nullable=False),
        sa.Column("run_dir", sa.Text(), nullable=False),
        sa.Column("base_model", sa.Text(), nullable=False),
        sa.Column("decision", sa.String(32), nullable=True),
        sa.Column("metric_name", sa.String(200), nullable=True),
        sa.Column("metric_value", sa.Float(), nullable=True),
        sa.Column("error_code", sa.String(64), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.Column("finished_at", TIMESTAMP, nullable=True),
        sa.CheckConstraint(one_of("status", "pending", "running", "succeeded", "failed", "discarded", "interrupted"),
                           name=op.f("ck_runs_status")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_runs")),
    )
    op.create_index(op.f("ix_runs_created_at"), "runs", ["created_at"])
    op.create_table(
        "run_data",
        sa.Column("run_id", sa.String(200), nullable=False),
        sa.Column("data_file_id", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.CheckConstraint(one_of("role", "train", "validation", "test", "general"), name=op.f("ck_run_data_role")),
        sa.ForeignKeyConstraint(["data_file_id"], ["data_files.id"], name=op.f("fk_run_data_data_file_id_data_files")),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_run_data_run_id_runs"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("run_id", "data_file_id", "role", name=op.f("pk_run_data")),
    )
    op.create_table(
        "stages",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(200), nullable=False),
        sa.Column("name", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("started_at", TIMESTAMP, nullable=False),
        sa.Column("finished_at", TIMESTAMP, nullable=True),
        sa.Column("figures", JSON, nullable=True),
        sa.Column("message", sa.Text(), nullable=True),
        sa.CheckConstraint(one_of("status", "running", "succeeded", "failed", "skipped"),
                           name=op.f("ck_stages_status")),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_stages_run_id_runs"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_stages")),
        sa.UniqueConstraint("run_id", "name", name=op.f("uq_stages_run_id_name")),
    )
    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(200), nullable=True),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("level", sa.String(16), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("details", JSON, nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.CheckConstraint(one_of("level", "debug", "info", "warning", "error"), name=op.f("ck_events_level")),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_events_run_id_runs"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
    )
    op.create_index(op.f("ix_events_run_id_id"), "events", ["run_id", "id"])
    op.create_table(
        "models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(200), nullable=True),
        sa.Column("base_model", sa.Text(), nullable=False),
        sa.Column("base_sha256", sa.String(64), nullable=True),
        sa.Column("data_hashes", JSON, nullable=False),
        sa.Column("config", JSON, nullable=False),
        sa.Column("afina_version", sa.String(32), nullable=False),
        sa.Column("metrics", JSON, nullable=False),
        sa.Column("gate", JSON, nullable=False),
        sa.Column("artifacts", JSON, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.CheckConstraint(one_of("status", "registered", "deleted"), name=op.f("ck_models_status")),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_models_run_id_runs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_models")),
        sa.UniqueConstraint("name", "version", name=op.f("uq_models_name_version")),
    )
    op.create_table(
        "aliases",
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("alias", sa.String(64), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], name=op.f("fk_aliases_model_id_models")),
        sa.PrimaryKeyConstraint("name", "alias", name=op.f("pk_aliases")),
    )


def downgrade() -> None:
    for table in ("aliases", "models", "events", "stages", "run_data", "runs", "data_files"):
        op.drop_table(table)  # their indexes go with them
