"""The object store seam: where pcaps go, whatever is behind it.

The agent streams a growing spool file into an :class:`Upload`; the controller reads, sizes, presigns and
deletes objects. Two implementations keep the seam honest: S3 (any S3-compatible server, through boto3) for
production, a local directory for the embedded default and single-node runs. Both see the same keys,
relative to the store's prefix or directory, and both raise only the storage error tree.
"""

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qsl, unquote, urlsplit

from ._errors import StorageError

__all__ = ["ObjectStore", "StoredObject", "Upload", "check_key", "open_store", "upload_path"]

# Reading a file into an upload: large enough for few system calls, small enough to bound memory.
_FILE_CHUNK = 1 << 20

# Options an s3:// URL may carry, and the server-side encryption algorithms S3 takes for ``sse``.
_S3_OPTIONS = frozenset({"sse", "kms_key_id"})
_SSE_ALGORITHMS = ("AES256", "aws:kms")


@dataclass(frozen=True)
class StoredObject:
    """A completed object: its key (relative to the store), size in bytes and hex SHA-256 of its content."""

    key: str
    size: int
    sha256: str


class Upload(Protocol):
    """A streaming upload; nothing is visible under the key until :meth:`complete` returns.

    The size and SHA-256 are computed from the bytes as they are written, never by reading the object back.
    After an error, :meth:`abort` and start over from the source: a failed upload is not resumable.
    """

    def write(self, data: bytes) -> None: ...

    def complete(self) -> StoredObject: ...

    def abort(self) -> None:
        """Throw away what was written, leaving nothing: no partial object, no pending multipart upload.

        If it raises (the store is down), no more writes are accepted but calling it again later retries
        the clean-up; after :meth:`complete` or a successful abort it does nothing.
        """
        ...


class ObjectStore(Protocol):
    """Objects under one S3 prefix or local directory; keys are relative ``a/b/c.pcap`` paths."""

    url: str  # "s3://bucket/prefix" or "file:///dir", for logs and messages

    def open_upload(self, key: str) -> Upload: ...

    def upload_file(self, key: str, path: Path) -> StoredObject:
        """Upload a whole file, reading it in chunks so memory stays bounded."""
        ...

    def iter_bytes(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """The object's content in chunks; a missing key raises ObjectNotFound here, before any chunk."""
        ...

    def stat(self, key: str) -> int:
        """The object's size in bytes; ObjectNotFound if missing."""
        ...

    def presign_get(self, key: str, expires: timedelta, filename: str) -> str:
        """A URL that downloads the object as ``filename`` without credentials, until ``expires`` passes."""
        ...

    def delete(self, key: str) -> None:
        """Delete the object; deleting a missing key is not an error."""
        ...


def context_key(object_key: str) -> str:
    """Where the agent stores the network context of the pcap at ``object_key``, next to it: ``x/y.pcap`` ->
    ``x/y.context.json`` (a key without a ``.pcap`` extension gets ``.context.json`` appended). The controller
    deletes it with the pcap."""
    return f"{object_key.removesuffix('.pcap')}.context.json"


def check_key(key: str) -> str:
    """Return ``key`` if it is a safe relative path inside a store, else raise ValueError.

    Keys become S3 keys under a prefix and file paths under a directory: "..", absolute paths, empty
    segments and NUL bytes could escape the directory or alias another key, so they are refused in both.
    """
    if not key or key.startswith("/") or "\\" in key or "\x00" in key:
        raise ValueError(f"invalid object key {key!r}: must be a non-empty relative path like 'a/b.pcap'")
    if any(segment in ("", ".", "..") for segment in key.split("/")):
        raise ValueError(f"invalid object key {key!r}: empty, '.' and '..' path segments are not allowed")
    return key


def upload_path(store: ObjectStore, key: str, path: Path) -> StoredObject:
    """``store.upload_file`` for any store: chunks of ``path`` through ``store.open_upload``."""
    upload = store.open_upload(key)
    try:
        with path.open("rb") as source:
            while chunk := source.read(_FILE_CHUNK):
                upload.write(chunk)
        return upload.complete()
    except BaseException:
        # Keep the original error: if the store is down, the abort fails too, and says less.
        with contextlib.suppress(StorageError):
            upload.abort()
        raise


def open_store(url: str) -> ObjectStore:
    """The store for ``s3://BUCKET[/PREFIX][?OPTIONS]`` or ``file:///DIR``; any other URL raises ValueError.

    S3 options (the URL is the one setting every process shares, so the agent that writes objects and the
    controller that reads them cannot disagree): ``sse=AES256`` or ``sse=aws:kms`` (optionally with
    ``kms_key_id=KEY``) writes every object with that server-side encryption.
    """
    parts = urlsplit(url)
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ValueError(
                f"invalid object store URL {url!r}: s3:// URLs need a bucket, s3://BUCKET/PREFIX"
            )
        sse, kms_key_id = _s3_options(url, parts.query)
        from ._s3 import S3Store  # boto3 is only imported when S3 is used

        return S3Store(
            bucket=parts.netloc, prefix=unquote(parts.path).strip("/"), sse=sse, kms_key_id=kms_key_id
        )
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise ValueError(f"invalid object store URL {url!r}: expected an absolute path, file:///DIR")
        if parts.query or parts.fragment:
            raise ValueError(
                f"invalid object store URL {url!r}: file:// URLs take no options "
                "(server-side encryption is an S3 feature; encrypt the directory's file system instead)"
            )
        from ._localdir import LocalDirStore

        return LocalDirStore(Path(unquote(parts.path)))
    raise ValueError(f"unsupported object store URL {url!r}: expected s3://BUCKET[/PREFIX] or file:///DIR")


def _s3_options(url: str, query: str) -> tuple[str, str]:
    """``(sse, kms_key_id)`` from an s3:// URL's query; anything unknown, repeated or inconsistent is refused,
    so a typo cannot silently leave pcaps unencrypted."""
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError as exc:
        raise ValueError(f"invalid object store URL {url!r}: cannot parse its options: {exc}") from exc
    options: dict[str, str] = {}
    for name, value in pairs:
        if name not in _S3_OPTIONS:
            known = ", ".join(sorted(_S3_OPTIONS))
            raise ValueError(f"invalid object store URL {url!r}: unknown option {name!r} (known: {known})")
        if name in options:
            raise ValueError(f"invalid object store URL {url!r}: option {name!r} is given twice")
        options[name] = value
    sse, kms_key_id = options.get("sse"), options.get("kms_key_id")
    if sse is not None and sse not in _SSE_ALGORITHMS:
        raise ValueError(
            f"invalid object store URL {url!r}: sse={sse!r} is not one of {', '.join(_SSE_ALGORITHMS)}"
        )
    if kms_key_id is not None and (sse != "aws:kms" or not kms_key_id):
        raise ValueError(
            f"invalid object store URL {url!r}: kms_key_id needs sse=aws:kms and a non-empty key id or ARN"
        )
    return sse or "", kms_key_id or ""
