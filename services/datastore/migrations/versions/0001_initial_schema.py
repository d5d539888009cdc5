"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-29 09:21:40.523067
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "change",
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("kind", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column("summary", sqlmodel.sql.sqltypes.AutoString(length=300), nullable=False),
        sa.Column("actor", sqlmodel.sql.sqltypes.AutoString(length=120), nullable=False),
        sa.Column("vpn_ids", sa.JSON(), nullable=False),
        sa.Column("node_ids", sa.JSON(), nullable=False),
        sa.Column("idempotency_key", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
        sa.PrimaryKeyConstraint("revision"),
    )
    with op.batch_alter_table("change", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_change_idempotency_key"), ["idempotency_key"], unique=True)

    op.create_table(
        "counter",
        sa.Column("name", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column("value", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "node",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("curve_key", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=True),
        sa.Column("sign_key", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("endpoints", sa.JSON(), nullable=False),
        sa.Column("public_endpoint", sqlmodel.sql.sqltypes.AutoString(length=80), nullable=True),
        sa.Column("nat_class", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("online", sa.Boolean(), nullable=False),
        sa.Column("last_seen", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("agent_version", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("node", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_node_curve_key"), ["curve_key"], unique=True)
        batch_op.create_index(batch_op.f("ix_node_name"), ["name"], unique=True)

    op.create_table(
        "vpn",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("subnet", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("addressing", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("topology", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("cipher", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column("mtu", sa.Integer(), nullable=False),
        sa.Column("keepalive", sa.Integer(), nullable=False),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("vpn", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_vpn_name"), ["name"], unique=True)

    op.create_table(
        "aclrule",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("vpn_id", sa.Integer(), nullable=False),
        sa.Column("src", sqlmodel.sql.sqltypes.AutoString(length=80), nullable=False),
        sa.Column("dst", sqlmodel.sql.sqltypes.AutoString(length=80), nullable=False),
        sa.Column("proto", sqlmodel.sql.sqltypes.AutoString(length=8), nullable=False),
        sa.Column("ports", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.ForeignKeyConstraint(["vpn_id"], ["vpn.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("aclrule", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_aclrule_vpn_id"), ["vpn_id"], unique=False)

    op.create_table(
        "delivery",
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("node_id", sa.Integer(), nullable=False),
        sa.Column("pushed_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("applied_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(["node_id"], ["node.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("revision", "node_id"),
    )
    op.create_table(
        "gatewayroute",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("vpn_id", sa.Integer(), nullable=False),
        sa.Column("node_id", sa.Integer(), nullable=False),
        sa.Column("cidr", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.ForeignKeyConstraint(["node_id"], ["node.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["vpn_id"], ["vpn.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("vpn_id", "cidr"),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("gatewayroute", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_gatewayroute_node_id"), ["node_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_gatewayroute_vpn_id"), ["vpn_id"], unique=False)

    op.create_table(
        "jointoken",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("node_id", sa.Integer(), nullable=False),
        sa.Column("secret_hash", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("expires_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("used_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(["node_id"], ["node.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("jointoken", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_jointoken_node_id"), ["node_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_jointoken_secret_hash"), ["secret_hash"], unique=True)

    op.create_table(
        "membership",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("node_id", sa.Integer(), nullable=False),
        sa.Column("vpn_id", sa.Integer(), nullable=False),
        sa.Column("vip", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("role", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.ForeignKeyConstraint(["node_id"], ["node.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["vpn_id"], ["vpn.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("node_id", "vpn_id"),
        sa.UniqueConstraint("vpn_id", "vip"),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("membership", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_membership_node_id"), ["node_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_membership_vpn_id"), ["vpn_id"], unique=False)

    # The revision counter exists from the start, so that the first writers lock a row that is there.
    counter = sa.table("counter", sa.column("name", sa.String), sa.column("value", sa.Integer))
    op.bulk_insert(counter, [{"name": "revision", "value": 0}])


def downgrade() -> None:
    with op.batch_alter_table("membership", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_membership_vpn_id"))
        batch_op.drop_index(batch_op.f("ix_membership_node_id"))

    op.drop_table("membership")
    with op.batch_alter_table("jointoken", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_jointoken_secret_hash"))
        batch_op.drop_index(batch_op.f("ix_jointoken_node_id"))

    op.drop_table("jointoken")
    with op.batch_alter_table("gatewayroute", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_gatewayroute_vpn_id"))
        batch_op.drop_index(batch_op.f("ix_gatewayroute_node_id"))

    op.drop_table("gatewayroute")
    op.drop_table("delivery")
    with op.batch_alter_table("aclrule", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_aclrule_vpn_id"))

    op.drop_table("aclrule")
    with op.batch_alter_table("vpn", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_vpn_name"))

    op.drop_table("vpn")
    with op.batch_alter_table("node", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_node_name"))
        batch_op.drop_index(batch_op.f("ix_node_curve_key"))

    op.drop_table("node")
    op.drop_table("counter")
    with op.batch_alter_table("change", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_change_idempotency_key"))

    op.drop_table("change")
