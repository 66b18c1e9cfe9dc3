"""The SQL layer on SQLite and PostgreSQL: migrations, round trips, constraints, pagination, cascades."""

import uuid
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, select
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.orm import Session, sessionmaker

from podcap.storage import (
    Base,
    CaptureRepository,
    CaptureRow,
    CaptureState,
    DatabaseUnavailable,
    TargetLeases,
    TargetRow,
    create_engine_for,
    make_sessionmaker,
    migrate,
)

T0 = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)


def _capture(**overrides: object) -> CaptureRow:
    values: dict[str, object] = {
        "id": uuid.uuid4().hex,
        "requester": "alice@example.com",
        "namespace": "shop",
        "pod": "checkout-7d9f",
        "duration_ms": 30_000,
        "state": CaptureState.PENDING,
    }
    values.update(overrides)
    return CaptureRow(**values)


VERSIONS = Path(__file__).resolve().parents[2] / "storage" / "migrations" / "versions"


def _target(pod: str, **overrides: object) -> TargetRow:
    values: dict[str, object] = {"namespace": "shop", "pod": pod, "node": "node-a", "pod_ip": "10.1.0.7"}
    values.update(overrides)
    return TargetRow(**values)


def test_migrations_create_the_schema_and_rerun_as_a_no_op(db_url: str) -> None:
    engine = create_engine_for(db_url)
    try:
        migrate(engine)
        migrate(db_url)  # every controller start migrates; the second time changes nothing
        inspector = inspect(engine)
        assert {"captures", "capture_targets", "alembic_version"} <= set(inspector.get_table_names())
        with engine.connect() as connection:
            # the newest revision file in storage/migrations/versions is the head
            newest = max(p.name.split("_")[0] for p in VERSIONS.glob("[0-9]*_*.py"))
            assert MigrationContext.configure(connection).get_current_revision() == newest
    finally:
        engine.dispose()


def test_migrated_schema_matches_the_models(db_url: str) -> None:
    """What ``alembic check`` does in CI: autogenerate finds nothing left to migrate."""
    engine = create_engine_for(db_url)
    try:
        migrate(engine)
        with engine.connect() as connection:
            context = MigrationContext.configure(
                connection, opts={"compare_type": True, "compare_server_default": True}
            )
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()


def test_capture_with_targets_round_trips_with_utc_timestamps(db_sessionmaker: sessionmaker[Session]) -> None:
    started = datetime(2025, 3, 1, 14, 0, 0, 5, tzinfo=timezone(timedelta(hours=2)))  # 12:00 UTC
    row = _capture(
        request_id="req-1",
        reason="ticket 4711: intermittent 502s",
        filter="tcp port 443",
        max_packets=10_000,
        max_bytes=5 << 40,  # beyond 32 bits
        snaplen=128,
        state=CaptureState.RUNNING,
        started_at=started,
        created_at=T0,
        updated_at=T0,
    )
    row.targets.append(_target("checkout-7d9f", interface="cali1234abcd", packets=1 << 33))
    row.targets.append(_target("checkout-x2b1", node="node-b", pod_context='{"phase": "Running"}'))
    with db_sessionmaker.begin() as session:
        CaptureRepository(session).add(row)

    with db_sessionmaker.begin() as session:
        loaded = CaptureRepository(session).get(row.id)
        assert loaded is not None and loaded is not row

    assert loaded.state is CaptureState.RUNNING
    assert (loaded.reason, loaded.filter, loaded.max_bytes, loaded.snaplen) == (
        "ticket 4711: intermittent 502s",
        "tcp port 443",
        5 << 40,
        128,
    )
    assert loaded.created_at == T0 and loaded.created_at.tzinfo is UTC
    assert loaded.started_at == started and loaded.started_at is not None
    assert loaded.started_at.utcoffset() == timedelta(0)
    assert loaded.ended_at is None and loaded.error == "" and loaded.label_selector == ""
    assert [(t.index, t.pod, t.node) for t in loaded.targets] == [
        (0, "checkout-7d9f", "node-a"),
        (1, "checkout-x2b1", "node-b"),
    ]
    assert loaded.targets[0].packets == 1 << 33 and loaded.targets[0].interface == "cali1234abcd"
    assert loaded.targets[1].pod_context == '{"phase": "Running"}'
    assert loaded.targets[1].state is CaptureState.PENDING and loaded.targets[1].object_key == ""


def test_naive_timestamps_are_refused(db_sessionmaker: sessionmaker[Session]) -> None:
    with pytest.raises(StatementError, match="naive datetime"), db_sessionmaker.begin() as session:
        CaptureRepository(session).add(_capture(created_at=datetime(2025, 1, 1)))


def test_same_request_id_from_same_requester_is_rejected(db_sessionmaker: sessionmaker[Session]) -> None:
    with db_sessionmaker.begin() as session:
        CaptureRepository(session).add(_capture(request_id="req-1"))
        CaptureRepository(session).add(_capture(request_id="req-1", requester="bob@example.com"))
        CaptureRepository(session).add(_capture(request_id=None))
        CaptureRepository(session).add(_capture(request_id=None))  # no request id, no idempotency

    with pytest.raises(IntegrityError), db_sessionmaker.begin() as session:
        CaptureRepository(session).add(_capture(request_id="req-1"))

    with db_sessionmaker.begin() as session:
        repo = CaptureRepository(session)
        found = repo.find_by_request("alice@example.com", "req-1")
        assert found is not None and found.requester == "alice@example.com"
        assert repo.find_by_request("carol@example.com", "req-1") is None
        assert len(repo.list(limit=10)) == 4


def test_unknown_state_is_rejected_by_the_check_constraint(db_sessionmaker: sessionmaker[Session]) -> None:
    row = _capture()
    with db_sessionmaker.begin() as session:
        CaptureRepository(session).add(row)
    with pytest.raises(IntegrityError), db_sessionmaker.begin() as session:
        session.connection().exec_driver_sql(f"UPDATE captures SET state = 'EXPLODED' WHERE id = '{row.id}'")


def test_keyset_pagination_returns_each_row_once_newest_first(db_sessionmaker: sessionmaker[Session]) -> None:
    rows = []
    for i in range(23):
        # Pairs of captures share a timestamp, so pages must break ties on the id.
        created = T0 + timedelta(seconds=i // 2)
        namespace = "shop" if i % 3 else "billing"
        state = CaptureState.COMPLETED if i % 2 else CaptureState.FAILED
        rows.append(_capture(namespace=namespace, state=state, created_at=created, updated_at=created))
    rows[5].pod, rows[5].label_selector = "", "app=checkout"
    rows[5].targets.append(_target("selected-by-label"))
    with db_sessionmaker.begin() as session:
        for row in rows:
            CaptureRepository(session).add(row)

    def pages(namespace: str = "", pod: str = "", state: CaptureState | None = None) -> list[list[str]]:
        result: list[list[str]] = []
        after = None
        while True:
            with db_sessionmaker.begin() as session:
                repo = CaptureRepository(session)
                page = repo.list(namespace=namespace, pod=pod, state=state, limit=4, after=after)
            if not page:
                return result
            result.append([row.id for row in page])
            after = (page[-1].created_at, page[-1].id)

    def newest_first(selected: list[CaptureRow]) -> list[str]:
        return [r.id for r in sorted(selected, key=lambda r: (r.created_at, r.id), reverse=True)]

    all_pages = pages()
    assert [len(p) for p in all_pages] == [4, 4, 4, 4, 4, 3]
    assert [i for p in all_pages for i in p] == newest_first(rows)

    shop_done = [r for r in rows if r.namespace == "shop" and r.state is CaptureState.COMPLETED]
    filtered = pages(namespace="shop", state=CaptureState.COMPLETED)
    assert [i for p in filtered for i in p] == newest_first(shop_done)

    assert pages(pod="selected-by-label") == [[rows[5].id]]
    assert pages(namespace="nowhere") == []


def test_leases_give_each_live_target_to_one_replica(db_sessionmaker: sessionmaker[Session]) -> None:
    now = datetime.now(UTC)
    rows = {
        state: _capture(state=state, targets=[_target(f"pod-{state.value.lower()}", state=state)])
        for state in CaptureState
    }
    with db_sessionmaker.begin() as session:
        for row in rows.values():
            CaptureRepository(session).add(row)
    running = rows[CaptureState.RUNNING].id
    with db_sessionmaker.begin() as session:
        leases = TargetLeases(session)
        # Only targets that may still change are anyone's work.
        assert {c.capture_id for c in leases.claimable("a", now)} == {
            rows[s].id for s in (CaptureState.PENDING, CaptureState.RUNNING, CaptureState.UPLOADING)
        }
        assert leases.claim(running, 0, "a", now + timedelta(seconds=10), now)
        assert not leases.claim(running, 0, "b", now + timedelta(seconds=10), now)  # a holds it
        assert running not in {c.capture_id for c in leases.claimable("b", now)}
        assert not leases.claim(rows[CaptureState.COMPLETED].id, 0, "a", now + timedelta(seconds=10), now)
    with db_sessionmaker.begin() as session:
        leases = TargetLeases(session)
        later = now + timedelta(seconds=11)  # a stopped renewing: its lease has run out
        assert running in {c.capture_id for c in leases.claimable("b", later)}
        assert leases.claim(running, 0, "b", later + timedelta(seconds=10), later)
        assert (running, 0) not in leases.renew("a", later + timedelta(seconds=10))
        assert (running, 0) in leases.renew("b", later + timedelta(seconds=10))


def test_get_for_update_reads_and_updates_in_one_transaction(db_sessionmaker: sessionmaker[Session]) -> None:
    row = _capture(created_at=T0, updated_at=T0)
    with db_sessionmaker.begin() as session:
        CaptureRepository(session).add(row)
    with db_sessionmaker.begin() as session:
        locked = CaptureRepository(session).get_for_update(row.id)
        assert locked is not None
        locked.state = CaptureState.CANCELLED
    with db_sessionmaker.begin() as session:
        reread = CaptureRepository(session).get(row.id)
    assert reread is not None and reread.state is CaptureState.CANCELLED
    assert reread.updated_at > T0
    with db_sessionmaker.begin() as session:
        assert CaptureRepository(session).get_for_update("0" * 32) is None


def test_deleting_a_capture_deletes_its_targets(db_sessionmaker: sessionmaker[Session]) -> None:
    doomed, kept = _capture(), _capture()
    for row in (doomed, kept):
        row.targets.extend([_target("a"), _target("b")])
    with db_sessionmaker.begin() as session:
        CaptureRepository(session).add(doomed)
        CaptureRepository(session).add(kept)

    with db_sessionmaker.begin() as session:
        assert CaptureRepository(session).delete(doomed.id) is True
    with db_sessionmaker.begin() as session:
        assert CaptureRepository(session).delete(doomed.id) is False
        remaining = session.execute(select(TargetRow.capture_id, TargetRow.index)).all()
        assert CaptureRepository(session).get(doomed.id) is None
    assert sorted(remaining) == [(kept.id, 0), (kept.id, 1)]


def test_unreachable_database_raises_database_unavailable() -> None:
    engine = create_engine_for("postgresql://postgres@127.0.0.1:1/podcap?connect_timeout=2")
    try:
        with pytest.raises(DatabaseUnavailable) as caught, make_sessionmaker(engine).begin() as session:
            CaptureRepository(session).get("0" * 32)
        assert caught.value.__cause__ is not None
    finally:
        engine.dispose()


def test_unsupported_database_url_is_refused() -> None:
    with pytest.raises(ValueError, match="unsupported database URL"):
        create_engine_for("mysql://root@localhost/podcap")


def test_a_stored_target_waiting_for_its_summary_is_still_followed(
    db_sessionmaker: sessionmaker[Session],
) -> None:
    now, until = datetime.now(UTC), datetime.now(UTC) + timedelta(seconds=10)
    waiting = _capture(
        state=CaptureState.COMPLETED, targets=[_target("waiting", state=CaptureState.COMPLETED)]
    )
    waiting.targets[0].summary_pending = True
    with db_sessionmaker.begin() as session:
        CaptureRepository(session).add(waiting)
    with db_sessionmaker.begin() as session:
        leases = TargetLeases(session)
        assert waiting.id in {c.capture_id for c in leases.claimable("a", now)}
        assert leases.claim(waiting.id, 0, "a", until, now)
        assert (waiting.id, 0) in leases.renew("a", until)
    with db_sessionmaker.begin() as session:
        target = CaptureRepository(session).get_for_update(waiting.id).targets[0]  # type: ignore[union-attr]
        target.summary_pending = False  # the summary came in: nothing left to follow
    with db_sessionmaker.begin() as session:
        leases = TargetLeases(session)
        assert (waiting.id, 0) not in leases.renew("a", until)
        assert waiting.id not in {c.capture_id for c in leases.claimable("b", now + timedelta(seconds=11))}
