"""Users, their roles in projects, API keys bound to users, and a project for files and jobs.

Existing databases upgrade in place and lose nothing: the keys they hold get no user (`user_id`
NULL) and keep working as admins of the default project, as they were before roles existed; new
keys always belong to a user. Existing files and jobs belong to the default project. A store without
users is a single-user installation: the CLI acts as admin there until the first user is added.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-10
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# Spelled out rather than imported from afina.store.tables, as in 0001.
TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("removed_at", TIMESTAMP, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.UniqueConstraint("name", name=op.f("uq_users_name")),
    )
    op.create_table(
        "memberships",
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("project", sa.String(64), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.CheckConstraint("role IN ('admin', 'engineer', 'viewer')", name=op.f("ck_memberships_role")),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_memberships_user_id_users"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("user_id", "project", name=op.f("pk_memberships")),
    )
    with op.batch_alter_table("api_keys") as batch:  # SQLite adds a foreign key by rebuilding the table
        batch.add_column(sa.Column("user_id", sa.Integer(), nullable=True))
        batch.create_foreign_key(op.f("fk_api_keys_user_id_users"), "users", ["user_id"], ["id"])
    for table in ("files", "jobs"):
        op.add_column(table, sa.Column("project", sa.String(64), nullable=False, server_default="default"))


def downgrade() -> None:
    for table in ("jobs", "files"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("project")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_constraint(op.f("fk_api_keys_user_id_users"), type_="foreignkey")
        batch.drop_column("user_id")
    op.drop_table("memberships")
    op.drop_table("users")
