"""The queries the controller needs on captures, and nothing else.

A repository wraps a session it does not own: the use case opens the transaction (``with factory.begin() as
session:``), so several repository calls and the state change they lead to commit or roll back together.
"""

import builtins
import hashlib
from collections.abc import Collection
from datetime import datetime

from sqlalchemy import case, delete, func, select, text, tuple_
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

    def ids_starting_with(self, prefix: str, limit: int) -> list[str]:
        """Up to `limit` capture ids that begin with `prefix` (a person's abbreviation of one)."""
        query = select(CaptureRow.id).where(CaptureRow.id.startswith(prefix, autoescape=True)).limit(limit)
        return list(self.session.scalars(query))

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
        *,
        requester: str = "",
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        namespaces: Collection[str] | None = None,
    ) -> builtins.list[CaptureRow]:
        """Captures newest first, filtered; ``after`` is the (created_at, id) of the last row of the previous page.

        Empty filters match everything; ``namespaces`` (None: any) limits the result to the namespaces a caller
        may read; ``created_after``/``created_before`` select created_at in the half-open
        range [after, before), so consecutive ranges neither overlap nor leave gaps. ``pod`` matches every
        capture that captured that pod (any of its targets): a label-selector capture names its pods only in its
        targets, and a capture for one pod always has that pod as its target.

        Keyset pagination rather than OFFSET: pages stay consistent while captures are being created, and every
        page is one backward range scan of an index that ends in (created_at, id) and starts with the filtered
        column (see migration 0003 for which index serves which filter), whatever the depth of the page.
        """
        # A deleted capture's row stays for the audit trail but is no longer listed.
        query = select(CaptureRow).where(CaptureRow.deleted_at.is_(None))
        if namespace:
            query = query.where(CaptureRow.namespace == namespace)
        if namespaces is not None:
            query = query.where(CaptureRow.namespace.in_(sorted(namespaces)))
        if pod:
            # Targets only, not ``captures.pod = :pod OR ...``: an OR with a subquery can use no index and reads
            # every capture (of the namespace) when the pod is rare. As ``id IN (SELECT ...)`` rather than an
            # EXISTS: PostgreSQL plans both as the same semi-join on ix_capture_targets_pod_capture_id, started
            # from the index for a rare pod or probing it newest first for a common one, but SQLite runs an EXISTS
            # as a probe per capture and only starts from the index for IN.
            query = query.where(CaptureRow.id.in_(select(TargetRow.capture_id).where(TargetRow.pod == pod)))
        if state is not None:
            query = query.where(CaptureRow.state == state)
        if requester:
            query = query.where(CaptureRow.requester == requester)
        if created_after is not None:
            query = query.where(CaptureRow.created_at >= created_after)
        if created_before is not None:
            query = query.where(CaptureRow.created_at < created_before)
        if after is not None:
            # A row-value comparison is one index range condition on PostgreSQL and SQLite alike; the equivalent
            # ``created_at < :c OR (created_at = :c AND id < :i)`` is only a filter, so a deep page re-read
            # every newer row first (48 ms at 100,000 captures instead of 0.1 ms).
            query = query.where(tuple_(CaptureRow.created_at, CaptureRow.id) < after)
        query = query.order_by(CaptureRow.created_at.desc(), CaptureRow.id.desc()).limit(limit)
        return builtins.list(self.session.scalars(query))

    def lock_quotas(self, *keys: str) -> None:
        """Serialises, until the transaction ends, the transactions that check and spend these quotas.

        PostgreSQL: transaction-scoped advisory locks, taken in a fixed order so two callers cannot deadlock.
        SQLite: nothing to do, every write transaction already holds the database's write lock (BEGIN IMMEDIATE).
        """
        if self.session.get_bind().dialect.name != "postgresql":
            return
        for key in sorted(set(keys)):
            lock = int.from_bytes(
                hashlib.sha256(f"podcap-quota:{key}".encode()).digest()[:8], "big", signed=True
            )
            self.session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": lock})

    def active_count(self, requester: str) -> int:
        """How many of this caller's captures are not finished yet (PENDING, RUNNING or UPLOADING)."""
        query = select(func.count()).where(
            CaptureRow.requester == requester, CaptureRow.state.not_in(TERMINAL_STATES)
        )
        return int(self.session.scalar(query) or 0)

    def bytes_committed(self, namespace: str, since: datetime) -> int:
        """Bytes of the namespace's captures created since ``since``: what finished targets stored, plus, for
        each unfinished target, its ``max_bytes`` (the most it may still store) or, without one, what it has."""
        unfinished_cap = case(
            (
                TargetRow.state.not_in(TERMINAL_STATES) & (CaptureRow.max_bytes > 0),
                func.greatest(CaptureRow.max_bytes, TargetRow.bytes)
                if self.session.get_bind().dialect.name == "postgresql"
                else func.max(CaptureRow.max_bytes, TargetRow.bytes),
            ),
            else_=TargetRow.bytes,
        )
        query = (
            select(func.coalesce(func.sum(unfinished_cap), 0))
            .select_from(TargetRow)
            .join(CaptureRow, CaptureRow.id == TargetRow.capture_id)
            .where(CaptureRow.namespace == namespace, CaptureRow.created_at >= since)
        )
        return int(self.session.scalar(query) or 0)

    def delete(self, capture_id: str) -> bool:
        """Delete a capture (its targets go by the foreign key's ON DELETE CASCADE); False if absent."""
        result = self.session.execute(delete(CaptureRow).where(CaptureRow.id == capture_id))
        return bool(result.rowcount)  # type: ignore[attr-defined]  # a DELETE's Result is a CursorResult
