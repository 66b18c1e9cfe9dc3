"""Captures keep the ends of a `between` capture and their verdicts; targets keep the network context around them.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("captures") as batch:
        batch.add_column(sa.Column("between", sa.Text(), nullable=False, server_default=sa.text("''")))
        batch.add_column(sa.Column("verdicts", sa.Text(), nullable=False, server_default=sa.text("''")))
    with op.batch_alter_table("capture_targets") as batch:
        batch.add_column(sa.Column("context", sa.Text(), nullable=False, server_default=sa.text("''")))


def downgrade() -> None:
    with op.batch_alter_table("capture_targets") as batch:
        batch.drop_column("context")
    with op.batch_alter_table("captures") as batch:
        batch.drop_column("verdicts")
        batch.drop_column("between")
