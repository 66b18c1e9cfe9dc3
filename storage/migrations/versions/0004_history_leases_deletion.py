"""Every state transition kept (capture_events), follower leases and pcap summaries on targets, soft deletion.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_STATES = "'PENDING', 'RUNNING', 'UPLOADING', 'COMPLETED', 'FAILED', 'CANCELLED'"


def upgrade() -> None:
    op.create_table(
        "capture_events",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("capture_id", sa.String(32), nullable=False),
        sa.Column("target_index", sa.Integer(), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False, server_default=sa.text("''")),
        sa.ForeignKeyConstraint(
            ["capture_id"],
            ["captures.id"],
            name=op.f("fk_capture_events_capture_id_captures"),
            ondelete="CASCADE",
        ),
        sa.CheckConstraint(f"state IN ({_STATES})", name=op.f("ck_capture_events_state")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_capture_events")),
    )
    op.create_index(op.f("ix_capture_events_capture_id_id"), "capture_events", ["capture_id", "id"])
    with op.batch_alter_table("captures") as batch:
        batch.add_column(sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("capture_targets") as batch:
        batch.add_column(
            sa.Column("lease_owner", sa.String(128), nullable=False, server_default=sa.text("''"))
        )
        batch.add_column(sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("summary", sa.Text(), nullable=False, server_default=sa.text("''")))


def downgrade() -> None:
    with op.batch_alter_table("capture_targets") as batch:
        batch.drop_column("summary")
        batch.drop_column("lease_expires_at")
        batch.drop_column("lease_owner")
    with op.batch_alter_table("captures") as batch:
        batch.drop_column("deleted_at")
    op.drop_index(op.f("ix_capture_events_capture_id_id"), table_name="capture_events")
    op.drop_table("capture_events")
