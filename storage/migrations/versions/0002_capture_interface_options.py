"""Captures record which pod interface was asked for and whether a hostNetwork pod was opted in.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("captures") as batch:
        batch.add_column(
            sa.Column("pod_interface", sa.String(15), nullable=False, server_default=sa.text("''"))
        )
        batch.add_column(sa.Column("host_network", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("captures") as batch:
        batch.drop_column("host_network")
        batch.drop_column("pod_interface")
