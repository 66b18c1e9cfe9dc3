"""Capture rows written straight through the storage models, for tests that need captures of any age or state.

The controller never writes a capture that ended days ago; retention tests need many. Each capture gets what the
controller would have written with it: its targets, a history event per capture and per target, and an audit
entry.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from podcap.storage import AuditLog, AuditRow, CaptureRow, CaptureState, EventRow, TargetRow

STORED = (CaptureState.COMPLETED, CaptureState.FAILED)  # the states in which a test capture has a pcap


def capture_row(
    state: CaptureState, created: datetime, ended: datetime | None, *, targets: int = 1, **extra: Any
) -> CaptureRow:
    """A capture of ``targets`` pods of shop/checkout; each target has an object key if its state stores one."""
    capture_id = uuid.uuid4().hex
    row = CaptureRow(
        id=capture_id,
        requester="alice@example.com",
        namespace="shop",
        pod="checkout-0" if targets == 1 else "",
        label_selector="" if targets == 1 else "app=checkout",
        duration_ms=30_000,
        state=state,
        created_at=created,
        updated_at=ended or created,
        ended_at=ended,
        **extra,
    )
    for i in range(targets):
        row.targets.append(
            TargetRow(
                namespace="shop",
                pod=f"checkout-{i}",
                node="node-a",
                pod_ip=f"10.1.0.{i + 7}",
                state=state,
                object_key=f"shop/checkout-{i}/{capture_id}.pcap" if state in STORED else "",
            )
        )
    return row


def store_rows(sessions: sessionmaker[Session], rows: list[CaptureRow]) -> None:
    """The rows, a history event per capture and per target, and an audit entry per capture."""
    with sessions.begin() as session:
        audit = AuditLog(session)
        for row in rows:
            session.add(row)
            session.flush()
            session.add(EventRow(capture_id=row.id, state=row.state, at=row.created_at))
            for target in row.targets:
                session.add(EventRow(capture_id=row.id, target_index=target.index, state=target.state))
            audit.append(actor=row.requester, action="create", result="allowed", capture_id=row.id)


def row_counts(session: Session, capture_ids: set[str]) -> tuple[int, int, int]:
    """How many (captures, targets, events) rows name these captures."""
    ids = list(capture_ids)

    def count(model: Any, column: Any) -> int:
        return session.scalar(select(func.count()).select_from(model).where(column.in_(ids))) or 0

    return (
        count(CaptureRow, CaptureRow.id),
        count(TargetRow, TargetRow.capture_id),
        count(EventRow, EventRow.capture_id),
    )


def audit_trail(session: Session) -> list[tuple[int, str, str, str]]:
    """Every audit entry as (id, capture id, actor, action), in order."""
    rows = session.scalars(select(AuditRow).order_by(AuditRow.id))
    return [(r.id, r.capture_id, r.actor, r.action) for r in rows]
