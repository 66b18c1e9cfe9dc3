"""Initial schema: captures and their per-pod targets.

Revision ID: 0001
Revises:
Create Date: 2025-11-22

Written by hand; types and constraint names are spelled out rather than imported from the models, so this
revision keeps creating the same schema whatever the models become later.
"""

from collections.abc import Sequence
from datetime import datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_STATES = "'PENDING', 'RUNNING', 'UPLOADING', 'COMPLETED', 'FAILED', 'CANCELLED'"


def _text(name: str, type_: sa.types.TypeEngine[str] | None = None) -> sa.Column[str]:
    return sa.Column(
        name, type_ if type_ is not None else sa.Text(), nullable=False, server_default=sa.text("''")
    )


def _count(name: str) -> sa.Column[int]:
    return sa.Column(name, sa.BigInteger(), nullable=False, server_default=sa.text("0"))


def _timestamp(name: str, *, nullable: bool) -> sa.Column[datetime]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "captures",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=True),
        sa.Column("requester", sa.String(256), nullable=False),
        _text("reason"),
        sa.Column("namespace", sa.String(63), nullable=False),
        _text("pod", sa.String(253)),
        _text("label_selector"),
        _text("filter"),
        sa.Column("duration_ms", sa.BigInteger(), nullable=False),
        _count("max_packets"),
        _count("max_bytes"),
        sa.Column("snaplen", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("state", sa.String(16), nullable=False),
        _text("error"),
        _timestamp("created_at", nullable=False),
        _timestamp("updated_at", nullable=False),
        _timestamp("started_at", nullable=True),
        _timestamp("ended_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_captures")),
        sa.UniqueConstraint("requester", "request_id", name=op.f("uq_captures_requester_request_id")),
        sa.CheckConstraint(f"state IN ({_STATES})", name=op.f("ck_captures_state")),
    )
    op.create_index(op.f("ix_captures_namespace_created_at"), "captures", ["namespace", "created_at"])
    op.create_index(op.f("ix_captures_state"), "captures", ["state"])
    op.create_index(op.f("ix_captures_created_at_id"), "captures", ["created_at", "id"])

    op.create_table(
        "capture_targets",
        sa.Column("capture_id", sa.String(32), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("namespace", sa.String(253), nullable=False),
        sa.Column("pod", sa.String(253), nullable=False),
        sa.Column("node", sa.String(253), nullable=False),
        sa.Column("pod_ip", sa.String(64), nullable=False),
        _text("pod_uid", sa.String(64)),
        _text("agent_address", sa.String(256)),
        _text("interface", sa.String(64)),
        sa.Column("state", sa.String(16), nullable=False),
        _count("packets"),
        _count("packets_received"),
        _count("kernel_drops"),
        _count("bytes"),
        _text("object_key"),
        _text("sha256", sa.String(64)),
        _text("error"),
        _text("pod_context"),
        _timestamp("started_at", nullable=True),
        _timestamp("ended_at", nullable=True),
        sa.PrimaryKeyConstraint("capture_id", "index", name=op.f("pk_capture_targets")),
        sa.ForeignKeyConstraint(
            ["capture_id"],
            ["captures.id"],
            name=op.f("fk_capture_targets_capture_id_captures"),
            ondelete="CASCADE",
        ),
        sa.CheckConstraint(f"state IN ({_STATES})", name=op.f("ck_capture_targets_state")),
    )


def downgrade() -> None:
    op.drop_table("capture_targets")
    op.drop_index(op.f("ix_captures_created_at_id"), table_name="captures")
    op.drop_index(op.f("ix_captures_state"), table_name="captures")
    op.drop_index(op.f("ix_captures_namespace_created_at"), table_name="captures")
    op.drop_table("captures")
