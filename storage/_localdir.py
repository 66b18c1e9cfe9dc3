"""The local-directory object store: pcaps as files, for the embedded default and single-node runs.

It keeps S3's one promise that matters to podcap: an object is either complete under its key or absent.
Uploads go to a hidden temporary file in the target directory, are fsynced, and are renamed over the key on
completion, so a crash mid-upload never leaves half a pcap under the final name.
"""

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

from ._errors import ObjectNotFound, StoreUnavailable
from ._objectstore import StoredObject, check_key, upload_path

__all__ = ["LocalDirStore"]


@contextmanager
def _translated(what: str) -> Iterator[None]:
    """Map I/O errors onto the storage tree: a missing file is ObjectNotFound, the rest StoreUnavailable."""
    try:
        yield
    except FileNotFoundError as exc:
        raise ObjectNotFound(f"{what}: no such object") from exc
    except OSError as exc:
        raise StoreUnavailable(f"{what}: {exc}") from exc


class LocalDirStore:
    """Objects as files under one directory (created on the first upload)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def open_upload(self, key: str) -> "LocalUpload":
        path = self._path(key)
        with _translated(f"upload to {self.url}/{key}"):
            path.parent.mkdir(parents=True, exist_ok=True)
            return LocalUpload(key, path)

    def upload_file(self, key: str, path: Path) -> StoredObject:
        return upload_path(self, key, path)

    def iter_bytes(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        self.stat(key)  # fail now, not at the first chunk, when the object is missing
        return self._chunks(key, chunk_size)

    def _chunks(self, key: str, chunk_size: int) -> Iterator[bytes]:
        with _translated(f"download of {self.url}/{key}"), self._path(key).open("rb") as source:
            while chunk := source.read(chunk_size):
                yield chunk

    def stat(self, key: str) -> int:
        path = self._path(key)
        with _translated(f"stat of {self.url}/{key}"):
            return path.stat().st_size

    def presign_get(self, key: str, expires: timedelta, filename: str) -> str:
        """The object's file:// URL: local files need no signature, and their name is their key's."""
        return self._path(key).as_uri()

    def delete(self, key: str) -> None:
        path = self._path(key)
        with _translated(f"delete of {self.url}/{key}"):
            path.unlink(missing_ok=True)


class LocalUpload:
    """A hidden temporary file next to the final path, renamed over it by :meth:`complete`."""

    def __init__(self, key: str, path: Path) -> None:
        self._key = key
        self._path = path
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        self._temp = Path(temp)
        self._file = os.fdopen(fd, "wb")
        self._hash = hashlib.sha256()
        self._size = 0

    def write(self, data: bytes) -> None:
        if self._file.closed:
            raise ValueError(f"upload of {self._key!r} is already completed or aborted")
        with _translated(f"upload of {self._key}"):
            self._file.write(data)
        self._hash.update(data)
        self._size += len(data)

    def complete(self) -> StoredObject:
        if self._file.closed:
            raise ValueError(f"upload of {self._key!r} is already completed or aborted")
        with _translated(f"upload of {self._key}"):
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self._temp, self._path)
            _fsync_dir(self._path.parent)  # make the rename itself durable
        return StoredObject(key=self._key, size=self._size, sha256=self._hash.hexdigest())

    def abort(self) -> None:
        # Closing flushes, which fails on a full disk; the data is being thrown away anyway.
        with contextlib.suppress(OSError):
            self._file.close()
        with _translated(f"aborting upload of {self._key}"):
            self._temp.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
