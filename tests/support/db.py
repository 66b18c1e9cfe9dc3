"""SQL databases for tests: a SQLite file and a fresh PostgreSQL database per test.

Every SQL test runs on both backends, because production runs PostgreSQL and the embedded default is SQLite,
and the same migrations and queries must behave the same on each. PostgreSQL is a real server over a real
connection; each test gets its own database, created and dropped around it, so tests cannot see each other's
rows. In CI (``CI=true``) an unreachable PostgreSQL fails the test; locally it is skipped.
"""

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from sqlalchemy.orm import Session, sessionmaker

from podcap.storage import create_engine_for, make_sessionmaker, migrate

PG_SERVER = "postgresql://postgres@127.0.0.1:5432"


def _admin_connection() -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True, connect_timeout=5)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """The URL of a fresh, empty PostgreSQL database, dropped after the test."""
    try:
        admin = _admin_connection()
    except psycopg.OperationalError as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"PostgreSQL at {PG_SERVER} is required in CI: {exc}")
        pytest.skip(f"PostgreSQL at {PG_SERVER} unreachable: {exc}")
    name = f"podcap_test_{uuid.uuid4().hex[:12]}"
    with admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            yield f"{PG_SERVER}/{name}"
        finally:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database URL with an empty database behind it, once per backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'podcap.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
def db_sessionmaker(db_url: str) -> Iterator[sessionmaker[Session]]:
    """Sessions on a migrated database."""
    engine = create_engine_for(db_url)
    try:
        migrate(engine)
        yield make_sessionmaker(engine)
    finally:
        engine.dispose()
