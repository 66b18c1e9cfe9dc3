"""Targets say whether a late result from a lost agent is still awaited, and whether and why they were cut short
(drops unknown when tcpdump's statistics ended with a killed agent).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("capture_targets") as batch:
        batch.add_column(sa.Column("awaiting_agent", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("drops_unknown", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("interruption", sa.Text(), nullable=False, server_default=sa.text("''")))


def downgrade() -> None:
    with op.batch_alter_table("capture_targets") as batch:
        batch.drop_column("interruption")
        batch.drop_column("drops_unknown")
        batch.drop_column("awaiting_agent")
