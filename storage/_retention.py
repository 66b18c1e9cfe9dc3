"""Finding and removing the captures that have outlived the retention period.

Expired means finished (COMPLETED, FAILED or CANCELLED) and ended before the cutoff: ``ended_at``, or
``created_at`` for a capture that never recorded an end. Soft-deleted captures expire like the rest; their
rows were only kept for the history. Several controller replicas sweep at once, so :meth:`claim` locks what it
returns with ``FOR UPDATE SKIP LOCKED``: a replica never waits for, nor takes, a capture another replica is
removing. (SQLite ignores the clause; its transactions take the database's write lock, and it serves one
process anyway.)

The caller owns the transaction and the order inside it: delete a claimed capture's objects first, then its
rows with :meth:`delete`, then commit, so that a failure at any point leaves rows that still name every
object not yet removed. The audit trail (``audit_events``) is never touched: it names captures by id only,
without a foreign key, precisely so that it outlives them.
"""

from __future__ import annotations

import builtins
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from ._models import TERMINAL_STATES, CaptureRow, EventRow, TargetRow

__all__ = ["ExpiredCapture", "ExpiredCaptures"]


@dataclass(frozen=True)
class ExpiredCapture:
    """A claimed capture: its id and the keys of the objects its targets stored (none if it stored none)."""

    id: str
    object_keys: tuple[str, ...]


class ExpiredCaptures:
    """Expired captures in one session, locked by the session's transaction once claimed."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def claim(
        self, cutoff: datetime, limit: int, exclude: Collection[str] = ()
    ) -> builtins.list[ExpiredCapture]:
        """Up to ``limit`` captures that ended before ``cutoff``, oldest first, locked until the transaction ends.

        Rows another transaction holds are skipped, not waited for. ``exclude`` names captures the caller
        already failed to remove in this sweep, so one bad capture cannot hold up the ones behind it.
        """
        query = (
            select(CaptureRow.id)
            .where(
                CaptureRow.state.in_(TERMINAL_STATES),
                func.coalesce(CaptureRow.ended_at, CaptureRow.created_at) < cutoff,
                # Implied by the line above (nothing ends before it was created), but it is what lets the
                # (state, created_at, id) index of migration 0003 narrow the scan to old captures.
                CaptureRow.created_at < cutoff,
            )
            .order_by(CaptureRow.created_at, CaptureRow.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        if exclude:
            query = query.where(CaptureRow.id.not_in(builtins.list(exclude)))
        ids = builtins.list(self.session.scalars(query))
        if not ids:
            return []
        keys: dict[str, builtins.list[str]] = {capture_id: [] for capture_id in ids}
        targets = select(TargetRow.capture_id, TargetRow.object_key).where(
            TargetRow.capture_id.in_(ids), TargetRow.object_key != ""
        )
        for capture_id, key in self.session.execute(targets.order_by(TargetRow.capture_id, TargetRow.index)):
            keys[capture_id].append(key)
        return [ExpiredCapture(capture_id, tuple(keys[capture_id])) for capture_id in ids]

    def delete(self, capture_ids: Collection[str]) -> int:
        """Delete these captures' history, targets and rows (children first); the number of captures deleted."""
        if not capture_ids:
            return 0
        ids = builtins.list(capture_ids)
        # Plain DELETEs: the rows are not loaded in this session, so there is nothing to synchronise.
        plain = {"synchronize_session": False}
        self.session.execute(delete(EventRow).where(EventRow.capture_id.in_(ids)), execution_options=plain)
        self.session.execute(delete(TargetRow).where(TargetRow.capture_id.in_(ids)), execution_options=plain)
        result = self.session.execute(
            delete(CaptureRow).where(CaptureRow.id.in_(ids)), execution_options=plain
        )
        return int(result.rowcount)  # type: ignore[attr-defined]  # a DELETE's Result is a CursorResult
