"""The audit trail: appending access decisions, and reading them back for people and tests.

There is deliberately no way here to change or remove an entry (the database refuses it too, see migration
0005). The caller commits the entry before it acts, so an action never happens without its record.
"""

import builtins
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from ._models import AuditRow, utcnow

__all__ = ["AuditLog"]


class AuditLog:
    """The audit entries reachable through one session."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def append(
        self,
        *,
        actor: str,
        action: str,
        result: str,
        namespace: str = "",
        capture_id: str = "",
        peer: str = "",
        detail: str = "",
        at: datetime | None = None,
    ) -> AuditRow:
        row = AuditRow(
            at=at or utcnow(),
            actor=actor[:256],
            action=action,
            namespace=namespace[:253],
            capture_id=capture_id[:32],
            peer=peer[:256],
            result=result,
            detail=detail,
        )
        self.session.add(row)
        self.session.flush()
        return row

    def entries(self, *, actor: str = "", capture_id: str = "", limit: int = 1000) -> builtins.list[AuditRow]:
        """Entries oldest first, optionally only one actor's or one capture's."""
        query = select(AuditRow)
        if actor:
            query = query.where(AuditRow.actor == actor)
        if capture_id:
            query = query.where(AuditRow.capture_id == capture_id)
        return builtins.list(self.session.scalars(query.order_by(AuditRow.id).limit(limit)))
