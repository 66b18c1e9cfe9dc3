"""Which captures retention may remove, on SQLite and PostgreSQL, and that two replicas never take the same one.

Expired: finished (COMPLETED, FAILED, CANCELLED) and ended before the cutoff, or created before it when no end was
recorded, soft-deleted or not. Never a capture still running, never one that ended recently, never the audit
trail.
"""

import threading
from datetime import UTC, datetime, timedelta

from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from podcap.storage import CaptureState, ExpiredCaptures, create_engine_for, make_sessionmaker, migrate
from tests.support.rows import audit_trail, capture_row, row_counts, store_rows

NOW = datetime.now(UTC).replace(microsecond=0)
TTL = timedelta(days=1)
CUTOFF = NOW - TTL


def test_only_finished_captures_past_the_cutoff_are_claimed_and_removed(
    db_sessionmaker: sessionmaker[Session],
) -> None:
    old = NOW - timedelta(days=3)
    expired = {
        "completed": capture_row(CaptureState.COMPLETED, old, old + timedelta(minutes=1), targets=2),
        "failed early": capture_row(CaptureState.FAILED, old - timedelta(hours=1), None),
        "deleted": capture_row(
            CaptureState.CANCELLED, old, NOW - timedelta(days=2), deleted_at=NOW - timedelta(days=2)
        ),
    }
    kept = {
        "ended recently": capture_row(CaptureState.COMPLETED, old, NOW - timedelta(hours=1)),
        "fresh": capture_row(CaptureState.COMPLETED, NOW - timedelta(minutes=2), NOW - timedelta(minutes=1)),
        "running for days": capture_row(CaptureState.RUNNING, old, None),
        "uploading for days": capture_row(CaptureState.UPLOADING, old, None),
        "pending for days": capture_row(CaptureState.PENDING, old, None),
    }
    store_rows(db_sessionmaker, [*expired.values(), *kept.values()])
    with db_sessionmaker() as session:
        audit_before = audit_trail(session)
        kept_before = row_counts(session, {r.id for r in kept.values()})

    with db_sessionmaker.begin() as session:
        claimed = ExpiredCaptures(session).claim(CUTOFF, limit=10)
        # Oldest first, each with the keys of the pcaps its targets stored.
        assert [c.id for c in claimed] == [
            expired["failed early"].id,
            *sorted([expired["completed"].id, expired["deleted"].id]),
        ]
        keys = {c.id: c.object_keys for c in claimed}
        assert keys[expired["completed"].id] == tuple(t.object_key for t in expired["completed"].targets)
        assert len(keys[expired["completed"].id]) == 2
        assert keys[expired["deleted"].id] == ()  # CANCELLED: nothing was stored
        assert ExpiredCaptures(session).delete([c.id for c in claimed]) == 3

    with db_sessionmaker() as session:
        assert row_counts(session, {r.id for r in expired.values()}) == (0, 0, 0)
        assert row_counts(session, {r.id for r in kept.values()}) == kept_before
        assert kept_before == (5, 5, 10)
        # The audit trail still names every capture, the removed ones included.
        assert audit_trail(session) == audit_before
        assert {entry[1] for entry in audit_before} >= {r.id for r in expired.values()}
    with db_sessionmaker.begin() as session:
        assert ExpiredCaptures(session).claim(CUTOFF, limit=10) == []


def test_claims_come_in_batches_and_skip_excluded_captures(db_sessionmaker: sessionmaker[Session]) -> None:
    rows = [
        capture_row(CaptureState.COMPLETED, NOW - timedelta(days=10 - i), NOW - timedelta(days=10 - i))
        for i in range(5)
    ]
    store_rows(db_sessionmaker, rows)
    with db_sessionmaker.begin() as session:
        expired = ExpiredCaptures(session)
        assert [c.id for c in expired.claim(CUTOFF, limit=2)] == [rows[0].id, rows[1].id]
        assert [c.id for c in expired.claim(CUTOFF, limit=2, exclude={rows[0].id})] == [
            rows[1].id,
            rows[2].id,
        ]
        assert [c.id for c in expired.claim(NOW - timedelta(days=7, hours=12), limit=10)] == [
            rows[0].id,
            rows[1].id,
            rows[2].id,
        ]


def test_replicas_claim_disjoint_captures_without_waiting(postgres_url: str) -> None:
    """Two transactions claiming at once get different captures; the second never waits for the first's locks."""
    engine = create_engine_for(postgres_url)
    try:
        migrate(engine)
        sessions = make_sessionmaker(engine)
        rows = [
            capture_row(CaptureState.COMPLETED, NOW - timedelta(days=5, minutes=i), NOW - timedelta(days=4))
            for i in range(10)
        ]
        store_rows(sessions, rows)
        first_claimed = threading.Event()
        second_done = threading.Event()
        first: list[str] = []

        def first_replica() -> None:
            with sessions.begin() as session:
                expired = ExpiredCaptures(session)
                first.extend(c.id for c in expired.claim(CUTOFF, limit=4))
                first_claimed.set()
                # Holds its locks until the other replica has claimed (and removed) the rest.
                assert second_done.wait(timeout=30)
                expired.delete(first)

        thread = threading.Thread(target=first_replica)
        thread.start()
        try:
            assert first_claimed.wait(timeout=30)
            with sessions.begin() as session:
                # Without SKIP LOCKED this claim would wait for the first replica, which waits for us.
                session.execute(text("SET LOCAL lock_timeout = '5s'"))
                expired = ExpiredCaptures(session)
                second = [c.id for c in expired.claim(CUTOFF, limit=10)]
                assert expired.delete(second) == 6
        finally:
            second_done.set()
            thread.join(timeout=30)
        assert len(first) == 4
        assert not set(first) & set(second)
        assert set(first) | set(second) == {r.id for r in rows}
        with sessions() as session:
            assert row_counts(session, {r.id for r in rows}) == (0, 0, 0)
            assert len(audit_trail(session)) == 10
    finally:
        engine.dispose()
