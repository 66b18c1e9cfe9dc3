"""The queries the controller needs on captures, and nothing else.

A repository wraps a session it does not own: the use case opens the transaction (``with factory.begin() as
session:``), so several repository calls and the state change they lead to commit or roll back together.
"""

import builtins
from datetime import datetime

from sqlalchemy import and_, delete, or_, select
from sqlalchemy.orm import Session

from ._models import TERMINAL_STATES, CaptureRow, CaptureState, TargetRow

__all__ = ["CaptureRepository"]


class CaptureRepository:
    """Captures (with their targets, always loaded) in one session."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, row: CaptureRow) -> None:
        """Stage a new capture; flushed now so constraint violations surface at the call, not at commit."""
        self.session.add(row)
        self.session.flush()

    def get(self, capture_id: str) -> CaptureRow | None:
        return self.session.get(CaptureRow, capture_id)

    def get_for_update(self, capture_id: str) -> CaptureRow | None:
        """The capture, locked until the transaction ends (FOR UPDATE; SQLite holds its write lock anyway)."""
        return self.session.get(CaptureRow, capture_id, with_for_update=True)

    def find_by_request(self, requester: str, request_id: str) -> CaptureRow | None:
        """The capture this caller already created with this ``request_id``, for idempotent creation."""
        query = select(CaptureRow).where(
            CaptureRow.requester == requester, CaptureRow.request_id == request_id
        )
        return self.session.scalars(query).one_or_none()

    def list(
        self,
        namespace: str = "",
        pod: str = "",
        state: CaptureState | None = None,
        limit: int = 50,
        after: tuple[datetime, str] | None = None,
    ) -> builtins.list[CaptureRow]:
        """Captures newest first; ``after`` is the (created_at, id) of the last row of the previous page.

        Keyset pagination rather than OFFSET: pages stay consistent while captures are being created, and each
        page is an index range scan on (created_at, id). ``pod`` matches the pod asked for or any pod captured
        (a label-selector capture names its pods only in its targets).
        """
        query = select(CaptureRow)
        if namespace:
            query = query.where(CaptureRow.namespace == namespace)
        if pod:
            query = query.where(or_(CaptureRow.pod == pod, CaptureRow.targets.any(TargetRow.pod == pod)))
        if state is not None:
            query = query.where(CaptureRow.state == state)
        if after is not None:
            created_at, capture_id = after
            query = query.where(
                or_(
                    CaptureRow.created_at < created_at,
                    and_(CaptureRow.created_at == created_at, CaptureRow.id < capture_id),
                )
            )
        query = query.order_by(CaptureRow.created_at.desc(), CaptureRow.id.desc()).limit(limit)
        return builtins.list(self.session.scalars(query))

    def non_terminal(self) -> builtins.list[CaptureRow]:
        """Every capture that may still change, oldest first: the reconciler's work list after a restart."""
        query = (
            select(CaptureRow)
            .where(CaptureRow.state.not_in(TERMINAL_STATES))
            .order_by(CaptureRow.created_at, CaptureRow.id)
        )
        return builtins.list(self.session.scalars(query))

    def delete(self, capture_id: str) -> bool:
        """Delete a capture (its targets go by the foreign key's ON DELETE CASCADE); False if absent."""
        result = self.session.execute(delete(CaptureRow).where(CaptureRow.id == capture_id))
        return bool(result.rowcount)  # type: ignore[attr-defined]  # a DELETE's Result is a CursorResult
