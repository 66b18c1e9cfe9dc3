"""Alembic migrations for podcap's SQL schema; the same revisions run on SQLite and PostgreSQL."""
