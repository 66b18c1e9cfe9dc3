"""Captures record the kernel capture buffer asked for; targets say whether their summary is still being made.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("captures") as batch:
        batch.add_column(
            sa.Column("buffer_size", sa.BigInteger(), nullable=False, server_default=sa.text("0"))
        )
    with op.batch_alter_table("capture_targets") as batch:
        batch.add_column(
            sa.Column("summary_pending", sa.Boolean(), nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("capture_targets") as batch:
        batch.drop_column("summary_pending")
    with op.batch_alter_table("captures") as batch:
        batch.drop_column("buffer_size")
