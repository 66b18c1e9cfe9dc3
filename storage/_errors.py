"""The storage exception tree, one place for every failure the storage layer lets out.

    StorageError
    ├── ObjectNotFound        the object key does not exist in the store
    ├── StoreUnavailable      the object store cannot be reached or refuses us (network, 5xx, credentials,
    │                         missing bucket, local I/O errors); retrying later may help
    └── DatabaseUnavailable   the SQL database cannot be reached or dropped the connection; retrying may help

Callers (the controller's error table, the agent's upload loop) map these to gRPC status codes and retry
policies without knowing whether S3, a local directory, SQLite or PostgreSQL sits behind the seam. The
client library's own exception (botocore, OSError, psycopg) is kept as ``__cause__`` for the logs; it never
escapes on its own.
"""

__all__ = ["DatabaseUnavailable", "ObjectNotFound", "StorageError", "StoreUnavailable"]


class StorageError(Exception):
    """Base of every error raised by ``podcap.storage``."""


class ObjectNotFound(StorageError):
    """The object key does not exist in the store."""


class StoreUnavailable(StorageError):
    """The object store could not serve the request; the underlying error is ``__cause__``."""


class DatabaseUnavailable(StorageError):
    """The SQL database could not serve the request; the underlying error is ``__cause__``."""
