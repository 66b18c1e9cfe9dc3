"""Alembic's entry point for podcap's migrations, shared by ``podcap.storage.migrate()`` and the alembic CLI.

``migrate()`` passes its open connection in ``config.attributes["connection"]`` so migrations run on the
caller's engine, inside the caller's transaction (and its PostgreSQL advisory lock). From the CLI, the URL
comes from ``-x url=...`` or ``sqlalchemy.url``, and goes through the engine factory the controller uses.
"""

from logging.config import fileConfig

from alembic import context
from sqlalchemy.engine import Connection, make_url

from podcap.storage._db import create_engine_for
from podcap.storage._models import Base

config = context.config


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        # SQLite cannot ALTER most things; autogenerate then emits batch (copy-and-move) operations.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        compare_server_default=True,
    )


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("no database URL: pass -x url=sqlite:///PATH or -x url=postgresql://USER@HOST/DB")
    return url


def run_offline() -> None:
    """Print the SQL instead of running it (``alembic upgrade --sql``), for review by a DBA."""
    dialect_name = make_url(_url()).get_backend_name()  # no driver needed to render SQL
    context.configure(dialect_name=dialect_name, target_metadata=Base.metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection: Connection | None = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine_for(_url())
    try:
        with engine.connect() as connection:
            _configure(connection)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


# Only the CLI configures logging: inside the controller, its own logging set-up stays untouched.
if "connection" not in config.attributes and config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

if context.is_offline_mode():
    run_offline()
else:
    run_online()
