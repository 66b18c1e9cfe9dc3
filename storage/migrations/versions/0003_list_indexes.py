"""Indexes for ListCaptures: each filter's column, then the (created_at, id) keyset, newest first.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23

A ListCaptures page is ``WHERE <filters> AND (created_at, id) < (:c, :i) ORDER BY created_at DESC, id DESC
LIMIT n``. An index (filter column, created_at, id) answers it with one backward index range scan that stops
after n rows, at any depth; an index on the filter column alone makes the database fetch and sort every match.
Chosen with EXPLAIN ANALYZE on 100,000 captures (``python -m bench.list_captures --explain``, docs/bench.md):

* (namespace, created_at, id) replaces (namespace, created_at), which left ties on created_at to an extra sort;
* (state, created_at, id) replaces (state), which the reconciler's ``state NOT IN (...)`` scan never used;
* (requester, created_at, id) is new ("my captures"); (requester, request_id) stays for idempotency;
* (created_at, id) stays: no filter, or only a time range;
* capture_targets (pod, capture_id) is new: the pod filter is a semi-join on it, started from the index for a
  rare pod, or an index-only probe per capture, newest first, for a common one.

Pairs of filters (namespace and state, requester and state, ...) use the more selective of these and filter
on the other column: at most ~6 ms at 100,000 captures, so no index is spent on a pair. The newly indexed
columns never change after a capture is created and state was indexed before, so updates stay as cheap.

Index DDL needs no batch mode on SQLite. On PostgreSQL these CREATE INDEX run inside the migration's transaction
(not CONCURRENTLY) and block writes to the table while they build: about 0.4 s at 100,000 captures.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        op.f("ix_captures_namespace_created_at_id"), "captures", ["namespace", "created_at", "id"]
    )
    op.create_index(op.f("ix_captures_state_created_at_id"), "captures", ["state", "created_at", "id"])
    op.create_index(
        op.f("ix_captures_requester_created_at_id"), "captures", ["requester", "created_at", "id"]
    )
    op.drop_index(op.f("ix_captures_namespace_created_at"), table_name="captures")
    op.drop_index(op.f("ix_captures_state"), table_name="captures")
    op.create_index(op.f("ix_capture_targets_pod_capture_id"), "capture_targets", ["pod", "capture_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_capture_targets_pod_capture_id"), table_name="capture_targets")
    op.create_index(op.f("ix_captures_state"), "captures", ["state"])
    op.create_index(op.f("ix_captures_namespace_created_at"), "captures", ["namespace", "created_at"])
    op.drop_index(op.f("ix_captures_requester_created_at_id"), table_name="captures")
    op.drop_index(op.f("ix_captures_state_created_at_id"), table_name="captures")
    op.drop_index(op.f("ix_captures_namespace_created_at_id"), table_name="captures")
