"""podcap's storage: capture metadata in SQL (SQLite, PostgreSQL), pcaps in an object store (S3, a directory).

It knows nothing of the controller or the agent; both reach their data through the names below.
"""

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
