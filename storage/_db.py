"""Engines, sessions and migrations: how a process connects to its metadata database.

Built once at start-up by the controller (DESIGN: engine and sessionmaker at start-up, the use case owns the
transaction). The two supported backends differ in ways the rest of the code must not see, so they are
smoothed over here: SQLite gets foreign keys and real write locks, PostgreSQL gets psycopg 3 and connection
liveness checks, and both turn "the database is not there" into :class:`DatabaseUnavailable`.

Every database wait is bounded, so a stuck database fails requests (UNAVAILABLE) instead of hanging them and
pinning the worker threads that every other request needs: connecting, waiting for a lock, running a
statement, waiting for a pooled connection (constants below). Migrations, which may legitimately wait for
another replica's migration or rewrite a table, get longer limits of their own.
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

# PostgreSQL: a server that does not answer fails the connect in 5 s. Our transactions are short (a few rows
# each), so waiting 5 s for a row or table lock means something else holds it far too long (a manual
# `LOCK TABLE`, a stuck migration): fail the request instead (LockNotAvailable -> DatabaseUnavailable). No
# statement of ours should take 15 s; one that does is cancelled rather than left holding a worker thread.
_PG_CONNECT_TIMEOUT_S = 5
_PG_LOCK_TIMEOUT_MS = 5_000
_PG_STATEMENT_TIMEOUT_MS = 15_000
# Migrations wait for a concurrent replica's migration and may rewrite tables: bounded, but generously.
_PG_MIGRATION_TIMEOUT = "10min"
# SQLite: how long a writer waits for another connection's write lock (BEGIN IMMEDIATE) before "database is
# locked" (an OperationalError -> DatabaseUnavailable).
_SQLITE_BUSY_TIMEOUT_S = 10.0
# Both: how long a request waits for a free pooled connection before it fails. That failure is SQLAlchemy's
# own TimeoutError, raised before any DBAPI call, so the handle_error hook below does not see it.
_POOL_TIMEOUT_S = 10.0


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
        engine = create_engine(
            sa_url,
            pool_pre_ping=True,
            pool_timeout=_POOL_TIMEOUT_S,
            connect_args={
                "connect_timeout": _PG_CONNECT_TIMEOUT_S,
                "options": f"-c lock_timeout={_PG_LOCK_TIMEOUT_MS} -c statement_timeout={_PG_STATEMENT_TIMEOUT_MS}",
            },
        )
    elif backend == "sqlite":
        # One connection: every transaction takes SQLite's write lock (BEGIN IMMEDIATE, below), so a second
        # connection in the same process adds no concurrency, only a wait in SQLite's busy handler, which polls
        # the lock with sleeps of up to 100 ms. With the pool's default of several connections, a burst of 200
        # CreateCaptures spent most of its time asleep there (a profile: 2,367 of 3,808 samples in BEGIN
        # IMMEDIATE; bench/burst.py). Threads queue for the one connection instead, each woken the moment it is
        # free. The busy timeout still covers another process on the same file (a second controller, a CLI).
        engine = create_engine(
            sa_url,
            pool_size=1,
            max_overflow=0,
            pool_timeout=_POOL_TIMEOUT_S,
            connect_args={"check_same_thread": False, "timeout": _SQLITE_BUSY_TIMEOUT_S},
        )
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
        # Write-ahead log: a commit appends to the log and fsyncs it once, instead of the rollback journal's
        # create, write, fsync, write, fsync and delete (a commit of one row here: 0.24 ms against 1.27 ms), and
        # readers in other processes no longer wait for a writer. synchronous stays FULL, SQLite's default: in
        # WAL mode NORMAL would skip that fsync, and a commit could then be lost to a power cut or a kernel
        # crash (never to a crash of the process), yet this file is the record of every capture and its audit
        # trail, and a client that was told "created" must find its capture after a reboot. The fsync is not
        # what bounds a burst (bench/burst.py: the controller is then bound by its CPU).
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = FULL")
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
                for setting in ("lock_timeout", "statement_timeout"):
                    connection.execute(
                        text("SELECT set_config(:name, :value, true)"),
                        {"name": setting, "value": _PG_MIGRATION_TIMEOUT},
                    )
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
