"""Which controller replica follows which capture target: a lease per target row, taken and renewed with plain
conditional UPDATEs, so several replicas on one database never follow the same target twice and a dead
replica's targets are taken over once its leases expire."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ColumnElement, and_, or_, select, update
from sqlalchemy.orm import Session

from ._models import TERMINAL_STATES, TargetRow

# A target is followed until it is terminal and its summary is in, and while a lost agent may still report.
_FOLLOWED = or_(TargetRow.state.not_in(TERMINAL_STATES), TargetRow.summary_pending, TargetRow.awaiting_agent)


@dataclass(frozen=True)
class Claim:
    capture_id: str
    index: int
    agent_address: str


class TargetLeases:
    def __init__(self, session: Session) -> None:
        self._session = session

    def _free_or(self, owner: str, now: datetime) -> ColumnElement[bool]:
        return or_(
            TargetRow.lease_owner == "",
            TargetRow.lease_owner == owner,
            TargetRow.lease_expires_at.is_(None),
            TargetRow.lease_expires_at < now,
        )

    def claim(self, capture_id: str, index: int, owner: str, until: datetime, now: datetime) -> bool:
        """Takes the lease of one target unless another replica holds an unexpired one."""
        result = self._session.execute(
            update(TargetRow)
            .where(
                TargetRow.capture_id == capture_id,
                TargetRow.index == index,
                _FOLLOWED,
                self._free_or(owner, now),
            )
            .values(lease_owner=owner, lease_expires_at=until)
            .execution_options(synchronize_session=False)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]

    def claimable(self, owner: str, now: datetime, limit: int = 100) -> list[Claim]:
        """Targets still to follow (not terminal, or waiting for their summary) nobody (else) follows now."""
        rows = self._session.execute(
            select(TargetRow.capture_id, TargetRow.index, TargetRow.agent_address)
            .where(
                _FOLLOWED,
                or_(
                    TargetRow.lease_owner == "",
                    TargetRow.lease_expires_at.is_(None),
                    and_(TargetRow.lease_owner != owner, TargetRow.lease_expires_at < now),
                ),
            )
            .limit(limit)
        ).all()
        return [Claim(capture_id, index, address) for capture_id, index, address in rows]

    def renew(self, owner: str, until: datetime) -> set[tuple[str, int]]:
        """Extends every lease `owner` holds on a target still to follow; returns the targets still held."""
        self._session.execute(
            update(TargetRow)
            .where(TargetRow.lease_owner == owner, _FOLLOWED)
            .values(lease_expires_at=until)
            .execution_options(synchronize_session=False)
        )
        held = self._session.execute(
            select(TargetRow.capture_id, TargetRow.index).where(TargetRow.lease_owner == owner, _FOLLOWED)
        ).all()
        return {(capture_id, index) for capture_id, index in held}

    def release(self, owner: str, now: datetime) -> None:
        """Lets other replicas take over at once (a clean shutdown)."""
        self._session.execute(
            update(TargetRow)
            .where(TargetRow.lease_owner == owner)
            .values(lease_expires_at=now)
            .execution_options(synchronize_session=False)
        )
