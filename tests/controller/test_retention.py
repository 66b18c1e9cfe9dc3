"""Retention as an operator sees it: expired captures vanish, pcaps and records alike, and nothing else does.

With PostgreSQL and moto's S3 server, two sweepers (two replicas) work through 200 expired captures at once;
with the store down, or failing halfway, nothing is lost track of and the next sweep finishes the job; and a
real controller on SQLite and a directory removes an expired capture from `podcap list` and from the disk.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from podcap.controller import RetentionSettings
from podcap.controller._retention import RetentionSweeper, SweepReport
from podcap.storage import (
    CaptureRow,
    CaptureState,
    ObjectStore,
    TargetRow,
    create_engine_for,
    make_sessionmaker,
    migrate,
    open_store,
)
from tests.support.processes import PODCAP, cli, controller
from tests.support.rows import audit_trail, capture_row, row_counts, store_rows
from tests.support.s3 import S3Server

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

TTL = timedelta(days=7)


def _now() -> datetime:
    return datetime.now(UTC)


def _expired(count: int) -> list[CaptureRow]:
    """Finished captures from 8 to 30 days ago: one, two or three pods each, completed, failed or deleted."""
    rows = []
    for i in range(count):
        ended = _now() - timedelta(days=8 + i % 22, minutes=i)
        if i % 10 == 9:  # deleted by a user long ago: the row stayed for the history, its objects are gone
            rows.append(
                capture_row(CaptureState.COMPLETED, ended - timedelta(minutes=1), ended, deleted_at=ended)
            )
        elif i % 7 == 3:  # failed before it ever ended properly
            rows.append(capture_row(CaptureState.FAILED, ended, None))
        else:
            rows.append(
                capture_row(CaptureState.COMPLETED, ended - timedelta(minutes=1), ended, targets=1 + i % 3)
            )
    return rows


def _kept() -> list[CaptureRow]:
    """Captures retention must leave alone: fresh, ended just inside the TTL, or still running for weeks."""
    now, old = _now(), _now() - timedelta(days=30)
    rows = [
        capture_row(CaptureState.COMPLETED, now - timedelta(minutes=i + 1), now, targets=2) for i in range(10)
    ]
    rows += [capture_row(CaptureState.FAILED, old, now - TTL + timedelta(hours=1)) for _ in range(5)]
    rows += [capture_row(state, old, None) for state in (CaptureState.RUNNING, CaptureState.UPLOADING) * 5]
    return rows


def _keys(rows: list[CaptureRow]) -> set[str]:
    return {t.object_key for row in rows for t in row.targets if t.object_key}


def _upload(store: ObjectStore, rows: list[CaptureRow], *, skip_deleted: bool = True) -> None:
    """Each target's pcap, as its agent stored it (a user's delete already removed a deleted capture's)."""
    keys = [
        t.object_key
        for row in rows
        if not (skip_deleted and row.deleted_at is not None)
        for t in row.targets
        if t.object_key
    ]

    def put(key: str) -> None:
        upload = store.open_upload(key)
        upload.write(f"pcap of {key}".encode())
        upload.complete()

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, keys))


def _bucket_keys(client: S3Client, bucket: str) -> set[str]:
    keys: set[str] = set()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="captures/"):
        keys.update(obj["Key"].removeprefix("captures/") for obj in page.get("Contents", []))
    return keys


def _rows_left(sessions: sessionmaker[Session]) -> tuple[set[str], set[str]]:
    """(capture ids, object keys) still in the database."""
    with sessions() as session:
        ids = set(session.scalars(select(CaptureRow.id)))
        keys = set(session.scalars(select(TargetRow.object_key).where(TargetRow.object_key != "")))
    return ids, keys


@pytest.fixture
def pg_sessions(postgres_url: str) -> Iterator[sessionmaker[Session]]:
    engine = create_engine_for(postgres_url)
    try:
        migrate(engine)
        yield make_sessionmaker(engine)
    finally:
        engine.dispose()


def test_two_replicas_remove_every_expired_capture_exactly_once(
    postgres_url: str, pg_sessions: sessionmaker[Session], s3_server: S3Server, s3_bucket: tuple[str, str]
) -> None:
    bucket, store_url = s3_bucket
    client = s3_server.client()
    expired, kept = _expired(200), _kept()
    store_rows(pg_sessions, [*expired, *kept])
    _upload(open_store(store_url), [*expired, *kept])
    with pg_sessions() as session:
        audit_before = audit_trail(session)
        kept_counts = row_counts(session, {r.id for r in kept})
    assert _bucket_keys(client, bucket) == _keys([r for r in expired if r.deleted_at is None]) | _keys(kept)

    # Two replicas: each its own engine, store client and sweeper, sweeping at the same moment in small batches.
    engines = [create_engine_for(postgres_url) for _ in range(2)]
    settings = RetentionSettings(ttl=TTL, batch_size=10)
    sweepers = [RetentionSweeper(make_sessionmaker(e), open_store(store_url), settings) for e in engines]
    start = threading.Barrier(2)

    def sweep(sweeper: RetentionSweeper) -> SweepReport:
        start.wait(timeout=30)
        return sweeper.sweep()

    try:
        with ThreadPoolExecutor(2) as pool:
            first, second = pool.map(sweep, sweepers)  # an error (a deadlock, say) would be raised here
    finally:
        for engine in engines:
            engine.dispose()

    expired_ids = {r.id for r in expired}
    assert first.captures and second.captures  # both replicas took part (they split 100/100 in practice)
    assert not set(first.captures) & set(second.captures)
    assert len(first.captures) + len(second.captures) == len(expired_ids)
    assert set(first.captures) | set(second.captures) == expired_ids
    # Each object was deleted by one replica only (the keys of deleted captures too: deleting is idempotent).
    assert not set(first.objects) & set(second.objects)
    assert len(first.objects) + len(second.objects) == len(_keys(expired))
    assert set(first.objects) | set(second.objects) == _keys(expired)
    for report in (first, second):
        assert not report.store_unavailable and report.left == {}

    assert _bucket_keys(client, bucket) == _keys(kept)
    assert _rows_left(pg_sessions) == ({r.id for r in kept}, _keys(kept))
    with pg_sessions() as session:
        assert row_counts(session, expired_ids) == (0, 0, 0)
        assert row_counts(session, {r.id for r in kept}) == kept_counts
        assert audit_trail(session) == audit_before  # every entry, the removed captures' included
        states = {
            capture_id: state
            for capture_id, state in session.execute(select(CaptureRow.id, CaptureRow.state))
        }
    assert states == {r.id: r.state for r in kept}


def test_store_down_leaves_captures_for_the_next_sweep(
    pg_sessions: sessionmaker[Session],
    s3_server: S3Server,
    s3_bucket: tuple[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    bucket, store_url = s3_bucket
    client, store = s3_server.client(), open_store(store_url)
    expired = [r for r in _expired(25) if r.deleted_at is None]
    store_rows(pg_sessions, expired)
    _upload(store, expired)
    sweeper = RetentionSweeper(pg_sessions, store, RetentionSettings(ttl=TTL, batch_size=10))

    s3_server.stop()
    try:
        with caplog.at_level(logging.WARNING, logger="podcap.controller._retention"):
            report = sweeper.sweep()
    finally:
        s3_server.start()
    assert report.store_unavailable
    assert report.captures == [] and report.objects == []
    assert (
        len(report.left) == 10
    )  # the first batch; the sweep stopped there instead of failing on every capture
    assert "object store unavailable, 10 expired captures left for the next sweep" in caplog.text
    # Every capture is still there, naming every object it stored.
    assert _rows_left(pg_sessions) == ({r.id for r in expired}, _keys(expired))

    # moto forgets everything when it stops; a real store keeps its objects through an outage, so put them back.
    client.create_bucket(Bucket=bucket)
    _upload(store, expired)
    assert _bucket_keys(client, bucket) == _keys(expired)

    report = sweeper.sweep()
    assert not report.store_unavailable and report.left == {}
    assert set(report.captures) == {r.id for r in expired}
    assert _rows_left(pg_sessions) == (set(), set())
    assert _bucket_keys(client, bucket) == set()


def test_store_failing_halfway_keeps_track_of_every_object(
    db_sessionmaker: sessionmaker[Session], tmp_path: Path
) -> None:
    """The store refuses one object in the middle of a sweep: what came before is removed, the capture that failed
    and those after it keep their rows and every object they still have, and the next sweep finishes."""
    root = tmp_path / "objects"
    store = open_store(root.as_uri())
    now = _now()
    rows = [
        capture_row(
            CaptureState.COMPLETED, now - timedelta(days=20 - i), now - timedelta(days=20 - i), targets=2
        )
        for i in range(12)
    ]
    store_rows(db_sessionmaker, rows)
    _upload(store, rows)
    # The 6th capture's second pcap cannot be removed: a directory stands where the file was.
    broken = root / rows[5].targets[1].object_key
    broken.unlink()
    (broken / "lost+found").mkdir(parents=True)

    sweeper = RetentionSweeper(db_sessionmaker, store, RetentionSettings(ttl=TTL, batch_size=4))
    report = sweeper.sweep()
    assert report.store_unavailable
    assert report.captures == [r.id for r in rows[:5]]
    assert set(report.left) == {r.id for r in rows[5:8]}  # the rest of its batch; later ones were not claimed
    assert (
        "lost+found" not in report.left[rows[5].id]
        and rows[5].targets[1].object_key in report.left[rows[5].id]
    )
    ids, keys = _rows_left(db_sessionmaker)
    assert ids == {r.id for r in rows[5:]}
    assert keys == _keys(
        rows[5:]
    )  # including the 6th capture's first pcap, already deleted: deleted again later
    assert not (root / rows[5].targets[0].object_key).exists()
    for row in rows[6:]:
        assert all((root / t.object_key).is_file() for t in row.targets)
    for row in rows[:5]:
        assert not any((root / t.object_key).exists() for t in row.targets)

    shutil.rmtree(broken)
    report = sweeper.sweep()
    assert not report.store_unavailable
    assert report.captures == [r.id for r in rows[5:]]
    assert _rows_left(db_sessionmaker) == (set(), set())
    assert not [p for p in root.rglob("*") if p.is_file()]


@pytest.mark.parametrize("key", ["../outside.pcap", "/etc/podcap-outside.pcap", "shop/../../outside.pcap"])
def test_hostile_object_key_never_deletes_outside_the_store(
    db_sessionmaker: sessionmaker[Session], tmp_path: Path, key: str
) -> None:
    """A row naming a key outside the store (a bug, or a tampered row) costs no file outside it, nor the sweep."""
    root = tmp_path / "store" / "objects"
    store = open_store(root.as_uri())
    old = _now() - timedelta(days=9)
    rows = [capture_row(CaptureState.COMPLETED, old + timedelta(minutes=i), old, targets=2) for i in range(3)]
    hostile = rows[1].targets[1]
    hostile.object_key = key
    outside = tmp_path / "store" / "outside.pcap"  # where the relative keys point
    root.mkdir(parents=True)
    outside.write_bytes(b"not podcap's to delete")
    store_rows(db_sessionmaker, rows)
    _upload(store, [rows[0], rows[2]])
    store.open_upload(rows[1].targets[0].object_key).complete()

    report = RetentionSweeper(db_sessionmaker, store, RetentionSettings(ttl=TTL)).sweep()
    assert report.captures == [r.id for r in rows] and report.left == {}
    assert key not in report.objects and len(report.objects) == 5
    assert outside.read_bytes() == b"not podcap's to delete"
    assert _rows_left(db_sessionmaker) == (set(), set())
    assert not [p for p in root.rglob("*") if p.is_file()]


def test_controller_removes_expired_captures_from_list_and_store(tmp_path: Path) -> None:
    """A real controller on SQLite and a directory, with a retention of a few seconds."""
    db_url = f"sqlite:///{tmp_path / 'podcap.db'}"
    root = tmp_path / "objects"
    store = open_store(root.as_uri())
    engine = create_engine_for(db_url)
    try:
        migrate(engine)
        sessions = make_sessionmaker(engine)
        old = capture_row(CaptureState.COMPLETED, _now() - timedelta(days=3), _now() - timedelta(days=3))
        store_rows(sessions, [old])
        _upload(store, [old])
        (tmp_path / "inventory.yaml").write_text("pods: []\nagents: {}\n")
        args = [
            *("--db", db_url, "--store", root.as_uri(), "--inventory", str(tmp_path / "inventory.yaml")),
            *("--no-auth", "--retention", "4s", "--retention-sweep-interval", "0.2s"),
        ]
        with controller(args, tmp_path) as address:
            # Written while the controller runs: listed at first, then gone once 4 s have passed since it ended.
            ended = _now()
            recent = capture_row(CaptureState.COMPLETED, ended - timedelta(seconds=30), ended)
            store_rows(sessions, [recent])
            _upload(store, [recent])
            assert recent.id in _listed(address)

            assert _wait_until(lambda: old.id not in _listed(address), timeout=20)
            assert not (root / old.targets[0].object_key).exists()
            assert _wait_until(lambda: recent.id not in _listed(address), timeout=30)
            assert _now() - ended >= timedelta(seconds=4)
            assert not (root / recent.targets[0].object_key).exists()
            gone = cli(["get", recent.id], address)
            assert gone.returncode != 0 and "not found" in gone.stderr.lower()
    finally:
        engine.dispose()


def _listed(address: str) -> set[str]:
    result = cli(["list", "-o", "json"], address)
    assert result.returncode == 0, result.stderr
    return {capture["id"] for capture in json.loads(result.stdout)}


def _wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--retention=-3600"], "'-3600' is negative"),
        (["--retention", "thirty days"], "is not a duration"),
        (["--retention-sweep-interval", "0"], "'0' is not a positive duration"),
    ],
)
def test_bad_retention_flags_are_refused(tmp_path: Path, flags: list[str], message: str) -> None:
    command = [PODCAP, "controller", "--listen", "127.0.0.1:0", "--db", "sqlite://", "--no-auth"]
    command += ["--store", tmp_path.as_uri(), "--inventory", str(tmp_path / "none.yaml"), *flags]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert message in result.stderr
