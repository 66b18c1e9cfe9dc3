"""Engines, sessions and migrations: how a process connects to its metadata database.

Built once at start-up by the controller (DESIGN: engine and sessionmaker at start-up, the use case owns the
transaction). The two supported backends differ in ways the rest of the code must not see, so they are
smoothed over here: SQLite gets foreign keys and real write locks, PostgreSQL gets psycopg 3 and connection
liveness checks, and both turn "the database is not there" into :class:`DatabaseUnavailable`.
"""

import importlib.resources
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import ExceptionContext, make_url
from sqlalchemy.exc import ArgumentError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from ._errors import DatabaseUnavailable

__all__ = ["create_engine_for", "make_sessionmaker", "migrate"]

# Any constant works; it only has to be the same in every controller replica.
_MIGRATION_LOCK_KEY = 0x706F64636170  # "podcap"


def create_engine_for(url: str) -> Engine:
    """An engine for ``sqlite:///PATH`` or ``postgresql://...`` (psycopg 3 unless another driver is named)."""
    try:
        sa_url = make_url(url)
    except ArgumentError as exc:
        raise ValueError(f"not a database URL: {url!r}") from exc
    if sa_url.drivername in ("postgresql", "postgres"):
        sa_url = sa_url.set(drivername="postgresql+psycopg")
    backend = sa_url.get_backend_name()
    if backend == "postgresql":
        # Pre-ping: a long-running controller survives a database restart without a failed request.
        engine = create_engine(sa_url, pool_pre_ping=True)
    elif backend == "sqlite":
        engine = create_engine(sa_url, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
    else:
        raise ValueError(
            f"unsupported database URL {sa_url.render_as_string(hide_password=True)!r}: "
            "expected sqlite:///PATH or postgresql://USER@HOST/DB"
        )
    shown = sa_url.render_as_string(hide_password=True)

    def as_unavailable(context: ExceptionContext) -> BaseException | None:
        # Pre-ping relies on seeing the driver's own error to decide to reconnect; leave it alone there.
        if context.is_pre_ping:
            return None
        unreachable = isinstance(context.sqlalchemy_exception, OperationalError | InterfaceError)
        if context.is_disconnect or unreachable:
            return DatabaseUnavailable(f"database {shown} unavailable: {context.original_exception}")
        return None

    event.listen(engine, "handle_error", as_unavailable, retval=True)
    return engine


def _sqlite_on_connect(dbapi_connection: Any, connection_record: Any) -> None:
    # SQLite enforces foreign keys (and so ON DELETE CASCADE) only when asked, per connection.
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()
    # Let SQLAlchemy, not the sqlite3 module, decide when transactions begin (see _sqlite_on_begin).
    dbapi_connection.isolation_level = None


def _sqlite_on_begin(connection: Any) -> None:
    # BEGIN IMMEDIATE takes the write lock up front, so a read-then-update transaction cannot lose an update
    # or deadlock on lock upgrade: it gives SQLite what SELECT ... FOR UPDATE gives PostgreSQL. Embedded
    # SQLite serves one controller, so serialising its transactions costs little.
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Sessions whose objects stay readable after commit, so results can outlive the transaction."""
    return sessionmaker(bind=engine, expire_on_commit=False)


def migrate(engine_or_url: Engine | str) -> None:
    """Bring the schema to the newest revision; a no-op when it already is, so every start may call it."""
    engine = create_engine_for(engine_or_url) if isinstance(engine_or_url, str) else engine_or_url
    try:
        with engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                # Replicas starting together would otherwise race to create the same tables.
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
            with importlib.resources.as_file(
                importlib.resources.files("podcap.storage").joinpath("alembic.ini")
            ) as ini:
                config = Config(str(ini))
                config.attributes["connection"] = connection
                command.upgrade(config, "head")
    finally:
        if isinstance(engine_or_url, str):
            engine.dispose()
