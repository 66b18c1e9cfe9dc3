"""The S3 object store: pcaps in any S3-compatible server (AWS, MinIO, Ceph RGW), through boto3.

This is the only module that imports boto3. boto3 is configured the way a user configures it anyway: the
default credential chain, and endpoint, region and credentials from the environment or ``~/.aws`` (botocore
reads ``AWS_ENDPOINT_URL_S3`` and friends itself). Every botocore error is translated here into the storage
error tree.

Uploads are multipart, so a capture streams to S3 while it grows. An agent that dies mid-upload leaves an
incomplete multipart upload behind; buckets should carry an ``AbortIncompleteMultipartUpload`` lifecycle rule.
"""

import hashlib
from collections.abc import Iterator
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

# S3 refuses parts under 5 MiB (but the last) and more than 10,000 parts. Doubling the part size every 1,000
# parts keeps memory at 5 MiB for ordinary captures and still reaches S3's 5 TiB object limit.
_MIN_PART = 5 << 20
_PARTS_PER_SIZE = 1000

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
    """A multipart upload, started lazily: objects smaller than one part are sent with a single PUT."""

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
        self._buffer = bytearray()
        self._hash = hashlib.sha256()
        self._size = 0
        self._upload_id: str | None = None
        self._parts: list[CompletedPartTypeDef] = []
        self._done = False
        # What boto3's own upload_file does: unless the user turned flexible checksums off (e.g. for an older
        # S3-compatible server, AWS_REQUEST_CHECKSUM_CALCULATION=when_required), declare CRC32 when creating
        # the upload and hand each part's CRC32 back on completion, as S3 then requires.
        # (getattr: the botocore stubs lag behind this setting.)
        setting = getattr(self._client.meta.config, "request_checksum_calculation", None)
        self._checksum: dict[str, Any] = {} if setting == "when_required" else {"ChecksumAlgorithm": "CRC32"}

    def _part_size(self) -> int:
        return _MIN_PART << (len(self._parts) // _PARTS_PER_SIZE)

    def write(self, data: bytes) -> None:
        if self._done:
            raise ValueError(f"upload of {self._key!r} is already completed or aborted")
        self._hash.update(data)
        self._size += len(data)
        self._buffer += data
        while len(self._buffer) >= self._part_size():
            size = self._part_size()
            # One copy of the part, not two (slicing a bytearray copies before bytes() copies again).
            with memoryview(self._buffer) as view:
                part = bytes(view[:size])
            self._send_part(part)
            del self._buffer[:size]

    def _send_part(self, data: bytes) -> None:
        with _translated(self._what):
            if self._upload_id is None:
                created = self._client.create_multipart_upload(
                    Bucket=self._bucket, Key=self._s3_key, **self._checksum, **self._encryption
                )
                self._upload_id = created["UploadId"]
            number = len(self._parts) + 1
            part = self._client.upload_part(
                Bucket=self._bucket,
                Key=self._s3_key,
                UploadId=self._upload_id,
                PartNumber=number,
                Body=data,
                **self._checksum,
            )
        completed: CompletedPartTypeDef = {"PartNumber": number, "ETag": part["ETag"]}
        if self._checksum and "ChecksumCRC32" in part:
            completed["ChecksumCRC32"] = part["ChecksumCRC32"]
        self._parts.append(completed)

    def complete(self) -> StoredObject:
        if self._done:
            raise ValueError(f"upload of {self._key!r} is already completed or aborted")
        if self._upload_id is None:
            with _translated(self._what):
                self._client.put_object(
                    Bucket=self._bucket, Key=self._s3_key, Body=bytes(self._buffer), **self._encryption
                )
        else:
            if self._buffer:
                self._send_part(bytes(self._buffer))
                self._buffer.clear()
            with _translated(self._what):
                self._client.complete_multipart_upload(
                    Bucket=self._bucket,
                    Key=self._s3_key,
                    UploadId=self._upload_id,
                    MultipartUpload={"Parts": self._parts},
                )
            self._upload_id = None  # completed: nothing left for abort() to throw away
        self._done = True
        self._buffer.clear()
        return StoredObject(key=self._key, size=self._size, sha256=self._hash.hexdigest())

    def abort(self) -> None:
        # No more writes whatever happens below; but the upload id is kept until S3 confirmed the abort, so
        # that an abort that failed while the store was down can be called again once it is back.
        self._done = True
        self._buffer.clear()
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
