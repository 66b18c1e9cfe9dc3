"""The S3 object store: pcaps in any S3-compatible server (AWS, MinIO, Ceph RGW), through boto3.

This is the only module that imports boto3. boto3 is configured the way a user configures it anyway: the
default credential chain, and endpoint, region and credentials from the environment or ``~/.aws`` (botocore
reads ``AWS_ENDPOINT_URL_S3`` and friends itself). Every botocore error is translated here into the storage
error tree.

Uploads are multipart, a few parts in flight at once, so a capture streams to S3 while it grows and the upload
keeps up with it whenever the store can. An agent that dies mid-upload leaves an incomplete multipart upload
behind; buckets should carry an ``AbortIncompleteMultipartUpload`` lifecycle rule.
"""

import hashlib
from collections.abc import Iterator
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError,
    CredentialRetrievalError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
)

from ._errors import ObjectNotFound, StorageError, StoreUnavailable
from ._objectstore import StoredObject, check_key, upload_path

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

__all__ = ["S3Store"]

# S3 refuses parts under 5 MiB (but the last) and more than 10,000 parts. 8 MiB parts (boto3's own
# multipart_chunksize), doubled every 1,000 parts, reach past S3's 5 TiB object limit within 10,000 parts.
_MIN_PART = 8 << 20
_PARTS_PER_SIZE = 1000
# Parts sent at once by one upload: enough to keep a store busy while a part's request waits on its answer,
# few enough that an upload holds at most (this + 1) parts in memory.
_PARTS_IN_FLIGHT = 4

_MAX_PRESIGN_SECONDS = 7 * 24 * 3600  # SigV4's limit; S3 refuses longer-lived URLs when they are used

# Short connect timeout so a dead endpoint fails a call in seconds; standard retries back off on throttling,
# 5xx and dropped connections before an error reaches the caller (who has its own, longer retry loop).
_CONFIG = Config(
    connect_timeout=5,
    read_timeout=30,
    retries={"mode": "standard", "max_attempts": 3},
    signature_version="s3v4",
)

_NOT_FOUND = frozenset({"NoSuchKey", "NotFound", "404"})
# Errors that mean "this store cannot serve us right now": retry later or fix the configuration.
_UNAVAILABLE_CODES = frozenset(
    {
        "NoSuchBucket",
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "RequestTimeTooSkewed",
        "SlowDown",
        "RequestTimeout",
        "403",
    }
)
_UNAVAILABLE_ERRORS = (
    ConnectionError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
    CredentialRetrievalError,
)


@contextmanager
def _translated(what: str) -> Iterator[None]:
    """Run a boto3 call, raising only storage errors (with botocore's error as ``__cause__``)."""
    try:
        yield
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
        message = f"{what}: {code or status} {error.get('Message', '')}".rstrip()
        if code in _NOT_FOUND:
            raise ObjectNotFound(message) from exc
        if code in _UNAVAILABLE_CODES or status >= 500:
            raise StoreUnavailable(message) from exc
        raise StorageError(message) from exc
    except _UNAVAILABLE_ERRORS as exc:
        raise StoreUnavailable(f"{what}: {exc}") from exc
    except BotoCoreError as exc:
        raise StorageError(f"{what}: {exc}") from exc


def _safe_filename(filename: str) -> str:
    # The name goes into a quoted Content-Disposition parameter: keep it to characters every browser and
    # curl -J take literally.
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "_" for c in filename)
    return safe or "capture.pcap"


class S3Store:
    """Objects under ``s3://bucket/prefix``."""

    def __init__(self, bucket: str, prefix: str = "", *, sse: str = "", kms_key_id: str = "") -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        # Server-side encryption of every object written; reading needs nothing (S3 decrypts, given kms:Decrypt).
        self._encryption: dict[str, Any] = {}
        if sse:
            self._encryption["ServerSideEncryption"] = sse
        if kms_key_id:
            self._encryption["SSEKMSKeyId"] = kms_key_id
        # A session per store: boto3's default session is not safe to share across threads; clients are.
        self._client: S3Client = boto3.session.Session().client("s3", config=_CONFIG)

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def open_upload(self, key: str) -> "S3Upload":
        return S3Upload(
            self._client,
            self.bucket,
            key,
            self._key(key),
            what=f"upload to {self.url}/{key}",
            encryption=self._encryption,
        )

    def upload_file(self, key: str, path: Path) -> StoredObject:
        return upload_path(self, key, path)

    def iter_bytes(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        self.stat(key)  # fail now, not at the first chunk, when the object is missing
        return self._chunks(self._key(key), chunk_size)

    def _chunks(self, s3_key: str, chunk_size: int) -> Iterator[bytes]:
        with _translated(f"download of {self.url}/{s3_key}"):
            body = self._client.get_object(Bucket=self.bucket, Key=s3_key)["Body"]
            try:
                yield from body.iter_chunks(chunk_size)
            finally:
                body.close()

    def stat(self, key: str) -> int:
        s3_key = self._key(key)
        with _translated(f"stat of {self.url}/{key}"):
            return self._client.head_object(Bucket=self.bucket, Key=s3_key)["ContentLength"]

    def presign_get(self, key: str, expires: timedelta, filename: str) -> str:
        params = {
            "Bucket": self.bucket,
            "Key": self._key(key),
            "ResponseContentDisposition": f'attachment; filename="{_safe_filename(filename)}"',
        }
        seconds = max(1, int(expires.total_seconds()))
        if seconds > _MAX_PRESIGN_SECONDS:
            raise ValueError(f"presigned URLs expire after at most 7 days, not {expires}")
        with _translated(f"presigning {self.url}/{key}"):
            return self._client.generate_presigned_url("get_object", Params=params, ExpiresIn=seconds)

    def delete(self, key: str) -> None:
        s3_key = self._key(key)
        with _translated(f"delete of {self.url}/{key}"):
            self._client.delete_object(Bucket=self.bucket, Key=s3_key)


class S3Upload:
    """A multipart upload whose parts go out in parallel, started lazily: objects under one part are one PUT.

    The caller's thread hashes and cuts the bytes into parts as they are written (each byte copied once, into
    its part) and hands every full part to a small pool of threads, at most ``_PARTS_IN_FLIGHT`` at a time:
    :meth:`write` blocks while they are all busy, which bounds the memory of an upload to that many parts
    plus the one being filled, and makes a reader that outruns the store wait for it. The pool's threads are
    started by the thread that writes, so they inherit its CPU and IO priority.

    One thread at a time calls the methods (the part threads only ever run ``upload_part``). A part that
    failed raises its storage error from the next :meth:`write` (even of no bytes) or :meth:`complete`;
    :meth:`abort` first waits for the parts in flight, so no part lands in a multipart upload after it was
    aborted.
    """

    def __init__(
        self,
        client: "S3Client",
        bucket: str,
        key: str,
        s3_key: str,
        *,
        what: str,
        encryption: dict[str, Any] | None = None,
    ) -> None:
        self._client = client
        # Encryption is set when the object is created: on the single PUT, or on the multipart upload's start.
        self._encryption = encryption or {}
        self._bucket = bucket
        self._key = key
        self._s3_key = s3_key
        self._what = what  # for error messages
        # The bytes of the part being filled, as written (the last one may be a view of the rest of a write).
        self._pending: list[bytes | memoryview] = []
        self._pending_size = 0
        self._hash = hashlib.sha256()
        self._size = 0
        self._upload_id: str | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._in_flight: set[Future[CompletedPartTypeDef]] = set()
        self._parts: list[CompletedPartTypeDef] = []
        self._next_part = 1
        self._failure: BaseException | None = None
        self._done = False
        # What boto3's own upload_file does: unless the user turned flexible checksums off (e.g. for an older
        # S3-compatible server, AWS_REQUEST_CHECKSUM_CALCULATION=when_required), declare CRC32 when creating
        # the upload and hand each part's CRC32 back on completion, as S3 then requires.
        # (getattr: the botocore stubs lag behind this setting.)
        setting = getattr(self._client.meta.config, "request_checksum_calculation", None)
        self._checksum: dict[str, Any] = {} if setting == "when_required" else {"ChecksumAlgorithm": "CRC32"}

    def _part_size(self) -> int:
        return _MIN_PART << ((self._next_part - 1) // _PARTS_PER_SIZE)

    def _check_open(self) -> None:
        if self._done:
            raise ValueError(f"upload of {self._key!r} is already completed or aborted")
        self._collect(block=False)

    def write(self, data: bytes) -> None:
        self._check_open()
        # The one pass over the bytes that podcap makes: size and SHA-256 of the object, as they go by.
        self._hash.update(data)
        self._size += len(data)
        rest: bytes | memoryview = data
        while self._pending_size + len(rest) >= (size := self._part_size()):
            take = size - self._pending_size
            if take == len(rest):
                self._pending.append(rest)
                rest = b""
            else:
                view = memoryview(rest)
                self._pending.append(view[:take])
                rest = view[take:]
            self._pending_size = size
            self._send_pending()
        if rest:
            self._pending.append(rest)
            self._pending_size += len(rest)

    def _take_pending(self) -> bytes:
        """The part being filled, as one bytes object (a single written ``bytes`` is passed on as it is)."""
        pending, self._pending, self._pending_size = self._pending, [], 0
        if len(pending) == 1 and isinstance(pending[0], bytes):
            return pending[0]
        return b"".join(pending)

    def _send_pending(self) -> None:
        """Send the part being filled once a slot is free; the first part creates the multipart upload."""
        if self._upload_id is None:
            with _translated(self._what):
                created = self._client.create_multipart_upload(
                    Bucket=self._bucket, Key=self._s3_key, **self._checksum, **self._encryption
                )
            self._upload_id = created["UploadId"]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=_PARTS_IN_FLIGHT, thread_name_prefix="s3-part")
        while len(self._in_flight) >= _PARTS_IN_FLIGHT:
            self._collect(block=True)
        data = self._take_pending()  # joined only now: never one part more in memory than in flight
        number, self._next_part = self._next_part, self._next_part + 1
        self._in_flight.add(self._pool.submit(self._upload_part, self._upload_id, number, data))

    def _upload_part(self, upload_id: str, number: int, data: bytes) -> "CompletedPartTypeDef":
        # In a pool thread: touches nothing of self that the writing thread changes.
        with _translated(self._what):
            part = self._client.upload_part(
                Bucket=self._bucket,
                Key=self._s3_key,
                UploadId=upload_id,
                PartNumber=number,
                Body=data,
                **self._checksum,
            )
        completed: CompletedPartTypeDef = {"PartNumber": number, "ETag": part["ETag"]}
        if self._checksum and "ChecksumCRC32" in part:
            completed["ChecksumCRC32"] = part["ChecksumCRC32"]
        return completed

    def _collect(self, *, block: bool, every: bool = False) -> None:
        """Take in the parts that finished (waiting for one, or for all); raise the error of one that failed."""
        if block and self._in_flight:
            finished, _ = wait(self._in_flight, return_when=ALL_COMPLETED if every else FIRST_COMPLETED)
        else:
            finished = {future for future in self._in_flight if future.done()}
        self._in_flight -= finished
        for future in finished:
            error = future.exception()
            if error is None:
                self._parts.append(future.result())
            elif self._failure is None:
                self._failure = error
        if self._failure is not None:
            # Every later call fails the same way, until abort() throws the upload away.
            raise self._failure

    def complete(self) -> StoredObject:
        self._check_open()
        if self._upload_id is None:
            with _translated(self._what):
                self._client.put_object(
                    Bucket=self._bucket, Key=self._s3_key, Body=self._take_pending(), **self._encryption
                )
        else:
            if self._pending:
                self._send_pending()
            self._collect(block=True, every=True)
            with _translated(self._what):
                self._client.complete_multipart_upload(
                    Bucket=self._bucket,
                    Key=self._s3_key,
                    UploadId=self._upload_id,
                    MultipartUpload={"Parts": sorted(self._parts, key=lambda part: part["PartNumber"])},
                )
            self._upload_id = None  # completed: nothing left for abort() to throw away
        self._done = True
        self._stop_pool()
        return StoredObject(key=self._key, size=self._size, sha256=self._hash.hexdigest())

    def abort(self) -> None:
        # No more writes whatever happens below; but the upload id is kept until S3 confirmed the abort, so
        # that an abort that failed while the store was down can be called again once it is back.
        self._done = True
        self._pending, self._pending_size = [], 0
        # A part still being sent could land after the abort and keep the upload (and its bill) alive, as S3
        # documents: let every part finish (or fail) first, then abort.
        if self._in_flight:
            wait(self._in_flight)
            self._in_flight.clear()
        self._stop_pool()
        if self._upload_id is None:
            return
        with _translated(f"aborting {self._what}"):
            try:
                self._client.abort_multipart_upload(
                    Bucket=self._bucket, Key=self._s3_key, UploadId=self._upload_id
                )
            except ClientError as exc:
                # Already gone: an earlier abort whose answer was lost, or a server that lost its state.
                if exc.response.get("Error", {}).get("Code") != "NoSuchUpload":
                    raise
        self._upload_id = None

    def _stop_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)  # every part has finished by now; the idle threads exit
            self._pool = None
