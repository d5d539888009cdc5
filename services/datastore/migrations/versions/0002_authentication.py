"""authentication: users, enrollment tokens, audit

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 11:24:57.538035
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "appuser",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("password_hash", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=True),
        sa.Column("locked", sa.Boolean(), nullable=False),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("password_changed_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("appuser", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_appuser_name"), ["name"], unique=True)

    op.create_table(
        "auditentry",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("event", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column("identity", sqlmodel.sql.sqltypes.AutoString(length=160), nullable=False),
        sa.Column("source", sqlmodel.sql.sqltypes.AutoString(length=80), nullable=False),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("detail", sqlmodel.sql.sqltypes.AutoString(length=300), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("auditentry", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_auditentry_at"), ["at"], unique=False)

    op.create_table(
        "enrolltoken",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("secret_hash", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("vpn_id", sa.Integer(), nullable=False),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("max_uses", sa.Integer(), nullable=True),
        sa.Column("uses", sa.Integer(), nullable=False),
        sa.Column("expires_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("revoked_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("created_by", sqlmodel.sql.sqltypes.AutoString(length=120), nullable=False),
        sa.ForeignKeyConstraint(["vpn_id"], ["vpn.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("enrolltoken", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_enrolltoken_secret_hash"), ["secret_hash"], unique=True)
        batch_op.create_index(batch_op.f("ix_enrolltoken_vpn_id"), ["vpn_id"], unique=False)

    op.create_table(
        "nodeowner",
        sa.Column("node_id", sa.Integer(), nullable=False),
        sa.Column("user_name", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.ForeignKeyConstraint(["node_id"], ["node.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("node_id"),
    )
    with op.batch_alter_table("nodeowner", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_nodeowner_user_name"), ["user_name"], unique=False)

    op.create_table(
        "uservpn",
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("vpn_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["appuser.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["vpn_id"], ["vpn.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("user_id", "vpn_id"),
    )


def downgrade() -> None:
    op.drop_table("uservpn")
    with op.batch_alter_table("nodeowner", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_nodeowner_user_name"))

    op.drop_table("nodeowner")
    with op.batch_alter_table("enrolltoken", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_enrolltoken_vpn_id"))
        batch_op.drop_index(batch_op.f("ix_enrolltoken_secret_hash"))

    op.drop_table("enrolltoken")
    with op.batch_alter_table("auditentry", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_auditentry_at"))

    op.drop_table("auditentry")
    with op.batch_alter_table("appuser", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_appuser_name"))

    op.drop_table("appuser")
