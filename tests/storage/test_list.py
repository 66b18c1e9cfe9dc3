"""ListCaptures' query on SQLite and PostgreSQL: every filter, alone and combined, and keyset pagination.

Each result is checked against the same filter applied in Python to the rows that were stored, in the order a
support engineer sees them (newest first, ties broken by id), page by page as the controller fetches them.
"""

import importlib.resources
import random
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import inspect
from sqlalchemy.orm import Session, sessionmaker

from podcap.storage import CaptureRepository, CaptureRow, CaptureState, TargetRow, create_engine_for

T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
PLUS_TWO = timezone(timedelta(hours=2))
NAMESPACES = ("shop", "billing", "search")
REQUESTERS = ("alice@example.com", "bob@example.com", "carol@example.com")
STATES = (CaptureState.COMPLETED, CaptureState.FAILED, CaptureState.RUNNING)


def _capture(created_at: datetime, **overrides: Any) -> CaptureRow:
    values: dict[str, Any] = {
        "id": uuid.uuid4().hex,
        "requester": "alice@example.com",
        "namespace": "shop",
        "pod": "shop-api-1",
        "duration_ms": 30_000,
        "state": CaptureState.COMPLETED,
        "created_at": created_at,
        "updated_at": created_at,
    }
    values.update(overrides)
    row = CaptureRow(**values)
    if row.pod:  # as the controller writes them: the pod asked for is the capture's target
        row.targets.append(_target(row.namespace, row.pod))
    return row


def _target(namespace: str, pod: str) -> TargetRow:
    return TargetRow(namespace=namespace, pod=pod, node="node-a", pod_ip="10.1.0.7")


def _store(sessions: sessionmaker[Session], rows: list[CaptureRow]) -> None:
    with sessions.begin() as session:
        repo = CaptureRepository(session)
        for row in rows:
            repo.add(row)


def _mixed_rows() -> list[CaptureRow]:
    """90 captures over 3 namespaces, 6 pods, 3 states and 3 requesters, on only 12 distinct timestamps."""
    rng = random.Random(4)
    rows = []
    for i in range(90):
        namespace = rng.choice(NAMESPACES)
        created = T0 + timedelta(minutes=rng.randrange(12))
        common = {"namespace": namespace, "state": rng.choice(STATES), "requester": rng.choice(REQUESTERS)}
        if i % 9 == 0:  # a label-selector capture: its pods are named only in its targets
            row = _capture(created, pod="", label_selector="app=api", **common)
            row.targets.extend(
                [_target(namespace, f"{namespace}-api-1"), _target(namespace, f"{namespace}-api-2")]
            )
        else:
            row = _capture(created, pod=f"{namespace}-api-{rng.randint(1, 2)}", **common)
        rows.append(row)
    return rows


def _expected(rows: list[CaptureRow], **filters: Any) -> list[str]:
    """What ``list(**filters)`` must return, computed without SQL: ids newest first, ties by id descending."""

    def keep(row: CaptureRow) -> bool:
        return all(
            (
                not filters.get("namespace") or row.namespace == filters["namespace"],
                not filters.get("pod") or any(t.pod == filters["pod"] for t in row.targets),
                filters.get("state") is None or row.state == filters["state"],
                not filters.get("requester") or row.requester == filters["requester"],
                filters.get("created_after") is None or row.created_at >= filters["created_after"],
                filters.get("created_before") is None or row.created_at < filters["created_before"],
            )
        )

    ordered = sorted((r for r in rows if keep(r)), key=lambda r: (r.created_at, r.id), reverse=True)
    return [r.id for r in ordered]


def _pages(sessions: sessionmaker[Session], size: int, **filters: Any) -> Iterator[list[CaptureRow]]:
    """Pages as ``Captures.page`` fetches them: each in its own transaction, the cursor from the last row."""
    after = None
    while True:
        with sessions.begin() as session:
            page = CaptureRepository(session).list(limit=size, after=after, **filters)
        if not page:
            return
        assert len(page) <= size
        yield page
        after = (page[-1].created_at, page[-1].id)


def _ids(pages: Iterator[list[CaptureRow]]) -> list[str]:
    return [row.id for page in pages for row in page]


FILTERS: list[dict[str, Any]] = [
    {},
    {"namespace": "shop"},
    {"pod": "billing-api-2"},  # includes label-selector captures through their targets
    {"state": CaptureState.FAILED},
    {"state": CaptureState.PENDING},  # no capture is PENDING
    {"requester": "bob@example.com"},
    {"created_after": T0 + timedelta(minutes=3)},
    {"created_before": T0 + timedelta(minutes=5)},
    {"created_after": T0 + timedelta(minutes=3), "created_before": T0 + timedelta(minutes=7)},
    {"namespace": "shop", "pod": "shop-api-2"},
    {"namespace": "shop", "state": CaptureState.COMPLETED},
    {"namespace": "search", "requester": "carol@example.com"},
    {"requester": "alice@example.com", "state": CaptureState.RUNNING},
    {
        "pod": "search-api-1",
        "created_after": T0 + timedelta(minutes=2),
        "created_before": T0 + timedelta(minutes=9),
    },
    {
        "namespace": "billing",
        "pod": "billing-api-1",
        "state": CaptureState.COMPLETED,
        "requester": "bob@example.com",
        "created_after": T0 + timedelta(minutes=1),
        "created_before": T0 + timedelta(minutes=11),
    },
    {"namespace": "nowhere"},
    {"namespace": "shop", "pod": "billing-api-1"},  # a pod of another namespace
]


def test_every_filter_alone_and_combined_returns_exactly_its_rows_newest_first(
    db_sessionmaker: sessionmaker[Session],
) -> None:
    rows = _mixed_rows()
    _store(db_sessionmaker, rows)
    nonempty = 0
    for filters in FILTERS:
        want = _expected(rows, **filters)
        with db_sessionmaker.begin() as session:
            got = [r.id for r in CaptureRepository(session).list(limit=1000, **filters)]
        assert got == want, f"list({filters})"
        assert _ids(_pages(db_sessionmaker, 4, **filters)) == want, f"list({filters}) 4 rows a page"
        nonempty += bool(want)
    assert nonempty == len(FILTERS) - 3  # the data set gives every other filter something to find


def test_pages_return_every_row_once_when_many_share_created_at(
    db_sessionmaker: sessionmaker[Session],
) -> None:
    same = [_capture(T0, namespace=NAMESPACES[i % 2]) for i in range(30)]
    older = [_capture(T0 - timedelta(microseconds=1), namespace=NAMESPACES[i % 2]) for i in range(10)]
    newer = [_capture(T0 + timedelta(microseconds=1)) for _ in range(3)]
    rows = same + older + newer
    _store(db_sessionmaker, rows)

    for size in (1, 4, 7, 30, 43, 44):
        pages = list(_pages(db_sessionmaker, size))
        assert [len(p) for p in pages[:-1]] == [size] * (len(pages) - 1)
        assert _ids(iter(pages)) == _expected(rows), f"{size} rows a page"
    assert _ids(_pages(db_sessionmaker, 4, namespace="billing")) == _expected(rows, namespace="billing")
    assert len(_ids(_pages(db_sessionmaker, 4, namespace="shop"))) == 15 + 5 + 3


def test_pages_stay_consistent_while_captures_are_created(db_sessionmaker: sessionmaker[Session]) -> None:
    rows = [_capture(T0 + timedelta(seconds=i // 3)) for i in range(20)]
    _store(db_sessionmaker, rows)
    pages = _pages(db_sessionmaker, 6)
    first = next(pages)
    cursor = (first[-1].created_at, first[-1].id)
    # Created between two page requests: one newer than everything, one among the rows still to come (its
    # random id decides on which side of the cursor it falls), one older than all.
    late = [
        _capture(T0 + timedelta(hours=1)),
        _capture(T0 + timedelta(seconds=3)),
        _capture(T0 - timedelta(days=1)),
    ]
    _store(db_sessionmaker, late)
    rest = _ids(pages)
    # Later pages continue below the cursor: nothing repeats, nothing old is skipped, and a new row shows up
    # exactly when it sorts below the cursor.
    below = [i for i in _expected(rows + late) if _key(rows + late, i) < cursor]
    assert rest == below
    assert late[2].id in rest and late[0].id not in rest
    assert sorted([r.id for r in first] + rest) == sorted({r.id for r in rows} | set(below))


def _key(rows: list[CaptureRow], capture_id: str) -> tuple[datetime, str]:
    row = next(r for r in rows if r.id == capture_id)
    return (row.created_at, row.id)


def test_time_range_is_half_open(db_sessionmaker: sessionmaker[Session]) -> None:
    hour = timedelta(hours=1)
    micro = timedelta(microseconds=1)
    at = {
        "before_start": T0 - micro,
        "start": T0,
        "just_after_start": T0 + micro,
        "just_before_end": T0 + hour - micro,
        "end": T0 + hour,
    }
    rows = {name: _capture(when) for name, when in at.items()}
    _store(db_sessionmaker, list(rows.values()))

    def names(**filters: Any) -> list[str]:
        with db_sessionmaker.begin() as session:
            found = CaptureRepository(session).list(limit=100, **filters)
        by_id = {row.id: name for name, row in rows.items()}
        return [by_id[row.id] for row in found]

    assert names(created_after=T0, created_before=T0 + hour) == [
        "just_before_end",
        "just_after_start",
        "start",
    ]
    # The same instants written in another zone select the same rows.
    assert names(created_after=T0.astimezone(PLUS_TWO), created_before=(T0 + hour).astimezone(PLUS_TWO)) == [
        "just_before_end",
        "just_after_start",
        "start",
    ]
    assert names(created_after=T0 + hour) == ["end"]
    assert names(created_before=T0) == ["before_start"]
    assert names(created_after=T0, created_before=T0) == []
    # Adjacent ranges neither overlap nor leave a gap.
    middle = T0 + timedelta(minutes=30)
    assert names(created_after=middle, created_before=T0 + hour) + names(
        created_after=T0, created_before=middle
    ) == names(created_after=T0, created_before=T0 + hour)


def test_a_page_past_the_end_is_empty(db_sessionmaker: sessionmaker[Session]) -> None:
    rows = [_capture(T0 + timedelta(seconds=i), namespace=NAMESPACES[i % 3]) for i in range(9)]
    _store(db_sessionmaker, rows)
    oldest = min(rows, key=lambda r: (r.created_at, r.id))
    with db_sessionmaker.begin() as session:
        repo = CaptureRepository(session)
        assert repo.list(after=(oldest.created_at, oldest.id)) == []
        assert repo.list(after=(T0 - timedelta(days=1), "f" * 32)) == []
        assert repo.list(namespace="billing", after=(T0, oldest.id)) == []
        assert repo.list(created_after=T0 + timedelta(days=1)) == []
        # The cursor of the newest row, written in another zone, still continues right after it.
        newest = max(rows, key=lambda r: (r.created_at, r.id))
        following = repo.list(limit=3, after=(newest.created_at.astimezone(PLUS_TWO), newest.id))
    assert [r.id for r in following] == _expected(rows)[1:4]


def test_pod_matches_every_target_of_a_capture_once(db_sessionmaker: sessionmaker[Session]) -> None:
    selector = _capture(T0, pod="", label_selector="app=web")
    selector.targets.extend([_target("shop", "web-1"), _target("shop", "web-2"), _target("shop", "web-3")])
    single = _capture(T0 + timedelta(seconds=1), pod="web-2")
    other_namespace = _capture(T0 + timedelta(seconds=2), namespace="billing", pod="web-2")
    _store(db_sessionmaker, [selector, single, other_namespace])
    with db_sessionmaker.begin() as session:
        repo = CaptureRepository(session)
        assert [r.id for r in repo.list(pod="web-1")] == [selector.id]
        assert [r.id for r in repo.list(pod="web-2")] == [other_namespace.id, single.id, selector.id]
        assert [r.id for r in repo.list(pod="web-2", namespace="shop")] == [single.id, selector.id]
        assert [r.id for r in repo.list(pod="web-2", limit=1, after=(single.created_at, single.id))] == [
            selector.id
        ]
        assert repo.list(pod="web") == []  # whole names only
        listed = repo.list(pod="web-3")
    assert [t.pod for t in listed[0].targets] == [
        "web-1",
        "web-2",
        "web-3",
    ]  # all targets, not just the match


def _alembic(connection: Any) -> Config:
    ini = importlib.resources.files("podcap.storage").joinpath("alembic.ini")
    with importlib.resources.as_file(ini) as path:
        config = Config(str(path))
    config.attributes["connection"] = connection
    return config


def test_migration_0003_swaps_the_list_indexes_and_downgrades(db_url: str) -> None:
    engine = create_engine_for(db_url)
    try:

        def indexes() -> dict[str, set[str]]:
            inspector = inspect(engine)
            return {
                table: {str(ix["name"]) for ix in inspector.get_indexes(table)}
                for table in ("captures", "capture_targets")
            }

        new = {
            "ix_captures_namespace_created_at_id",
            "ix_captures_state_created_at_id",
            "ix_captures_requester_created_at_id",
        }
        old = {"ix_captures_namespace_created_at", "ix_captures_state"}
        with engine.begin() as connection:
            command.upgrade(_alembic(connection), "0003")
        at_0003 = indexes()
        assert new | {"ix_captures_created_at_id"} <= at_0003["captures"] and not old & at_0003["captures"]
        assert at_0003["capture_targets"] == {"ix_capture_targets_pod_capture_id"}

        with engine.begin() as connection:
            command.downgrade(_alembic(connection), "0002")
        at_0002 = indexes()
        assert old | {"ix_captures_created_at_id"} <= at_0002["captures"] and not new & at_0002["captures"]
        assert at_0002["capture_targets"] == set()

        with engine.begin() as connection:
            command.upgrade(_alembic(connection), "0003")
        assert indexes() == at_0003
    finally:
        engine.dispose()
