"""The audit trail is append-only in the database itself, on both backends: no UPDATE, no DELETE."""

from __future__ import annotations

import pytest
from sqlalchemy import delete, update
from sqlalchemy.exc import DatabaseError
from sqlalchemy.orm import Session, sessionmaker

from podcap.storage import AuditLog, AuditRow


def test_entries_are_appended_in_order_and_can_be_neither_changed_nor_removed(
    db_sessionmaker: sessionmaker[Session],
) -> None:
    with db_sessionmaker.begin() as session:
        log = AuditLog(session)
        log.append(
            actor="alice", action="capture", result="allowed", namespace="shop", peer="ipv4:10.0.0.7:5000"
        )
        log.append(actor="bob", action="download", result="denied", namespace="shop", capture_id="a" * 32)

    for statement in (
        update(AuditRow).values(result="allowed"),
        delete(AuditRow).where(AuditRow.actor == "bob"),
    ):
        with (
            pytest.raises(DatabaseError, match="audit_events is append-only"),
            db_sessionmaker.begin() as session,
        ):
            session.execute(statement)

    with db_sessionmaker.begin() as session:
        entries = AuditLog(session).entries()
        assert [(e.actor, e.action, e.result) for e in entries] == [
            ("alice", "capture", "allowed"),
            ("bob", "download", "denied"),
        ]
        assert entries[0].at <= entries[1].at
        assert AuditLog(session).entries(capture_id="a" * 32) == [entries[1]]
