"""Alembic revisions, written and reviewed by hand."""
