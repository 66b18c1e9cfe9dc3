"""podcap's storage: capture metadata in SQL (SQLite, PostgreSQL), pcaps in an object store (S3, a directory).

It knows nothing of the controller or the agent; both reach their data through the names below.

The names are loaded on first use (PEP 562), so a process that only uploads (the agent) never imports
SQLAlchemy and Alembic: that was about a second of its 1.3 s of imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Public name -> the module that defines it.
_HOME = {
    "AuditLog": "._audit",
    "create_engine_for": "._db",
    "make_sessionmaker": "._db",
    "migrate": "._db",
    "DatabaseUnavailable": "._errors",
    "ObjectNotFound": "._errors",
    "StorageError": "._errors",
    "StoreUnavailable": "._errors",
    "Claim": "._leases",
    "TargetLeases": "._leases",
    "TERMINAL_STATES": "._models",
    "AuditRow": "._models",
    "Base": "._models",
    "CaptureRow": "._models",
    "CaptureState": "._models",
    "EventRow": "._models",
    "TargetRow": "._models",
    "ObjectStore": "._objectstore",
    "StoredObject": "._objectstore",
    "Upload": "._objectstore",
    "context_key": "._objectstore",
    "open_store": "._objectstore",
    "CaptureRepository": "._repository",
    "ExpiredCapture": "._retention",
    "ExpiredCaptures": "._retention",
}

# The same names for type checkers; tests/test_layers.py checks these imports, _HOME and __all__ agree.
if TYPE_CHECKING:
    from ._audit import AuditLog
    from ._db import create_engine_for, make_sessionmaker, migrate
    from ._errors import DatabaseUnavailable, ObjectNotFound, StorageError, StoreUnavailable
    from ._leases import Claim, TargetLeases
    from ._models import TERMINAL_STATES, AuditRow, Base, CaptureRow, CaptureState, EventRow, TargetRow
    from ._objectstore import ObjectStore, StoredObject, Upload, context_key, open_store
    from ._repository import CaptureRepository
    from ._retention import ExpiredCapture, ExpiredCaptures

__all__ = [
    "TERMINAL_STATES",
    "AuditLog",
    "AuditRow",
    "Base",
    "CaptureRepository",
    "CaptureRow",
    "CaptureState",
    "Claim",
    "DatabaseUnavailable",
    "EventRow",
    "ExpiredCapture",
    "ExpiredCaptures",
    "ObjectNotFound",
    "ObjectStore",
    "StorageError",
    "StoreUnavailable",
    "StoredObject",
    "TargetLeases",
    "TargetRow",
    "Upload",
    "context_key",
    "create_engine_for",
    "make_sessionmaker",
    "migrate",
    "open_store",
]


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value  # once loaded, a plain module attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOME})
