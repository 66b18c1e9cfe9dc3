"""Server-side encryption of pcaps, configured in the store URL, checked on what moto's S3 server stored.

Every way an object gets written is covered: a single PUT (small pcaps), a multipart upload (large ones), and the
agent's own uploader following a growing spool file. An encryption option the store cannot honour, or a typo in
one, refuses the URL rather than silently storing pcaps unencrypted.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from podcap.agent._upload import GrowingFileUploader
from podcap.storage import ObjectStore, open_store
from tests.support.s3 import S3Server

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

MiB = 1 << 20
SMALL, LARGE = 3000, 6 * MiB + 17  # one PUT; two parts of a multipart upload


def _encryption(client: S3Client, bucket: str, key: str) -> tuple[str | None, str | None]:
    head = client.head_object(Bucket=bucket, Key=f"captures/{key}")
    return head.get("ServerSideEncryption"), head.get("SSEKMSKeyId")


def _write(store: ObjectStore, key: str, data: bytes) -> None:
    upload = store.open_upload(key)
    for offset in range(0, len(data), MiB):
        upload.write(data[offset : offset + MiB])
    upload.complete()


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ("", (None, None)),
        ("?sse=AES256", ("AES256", None)),
        ("?sse=aws:kms", ("aws:kms", None)),
        ("?sse=aws:kms&kms_key_id=alias/podcap-pcaps", ("aws:kms", "alias/podcap-pcaps")),
        (
            "?kms_key_id=arn:aws:kms:eu-west-1:111122223333:key/1234abcd&sse=aws:kms",
            ("aws:kms", "arn:aws:kms:eu-west-1:111122223333:key/1234abcd"),
        ),
    ],
)
def test_objects_are_stored_with_the_encryption_the_url_asks_for(
    s3_server: S3Server, s3_bucket: tuple[str, str], options: str, expected: tuple[str | None, str | None]
) -> None:
    bucket, url = s3_bucket
    client = s3_server.client()
    store = open_store(url + options)
    assert store.url == url  # the options are not part of the keys or of messages
    for key, size in (("shop/small.pcap", SMALL), ("shop/large.pcap", LARGE)):
        data = random.Random(size).randbytes(size)
        _write(store, key, data)
        assert _encryption(client, bucket, key) == expected
        assert b"".join(store.iter_bytes(key)) == data  # reading needs no option: S3 decrypts


def test_the_agents_uploader_encrypts_what_it_uploads(
    s3_server: S3Server, s3_bucket: tuple[str, str], tmp_path: Path
) -> None:
    bucket, url = s3_bucket
    store = open_store(f"{url}?sse=AES256")
    spool = tmp_path / "capture.pcap"
    spool.write_bytes(random.Random(1).randbytes(LARGE))

    async def upload() -> None:
        done = asyncio.Event()
        done.set()  # tcpdump has exited: the spool is final
        await GrowingFileUploader(store, "shop/checkout/capture-1.pcap", spool, poll_interval=0.05).run(done)

    asyncio.run(upload())
    assert _encryption(s3_server.client(), bucket, "shop/checkout/capture-1.pcap") == ("AES256", None)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("s3://bucket/captures?sse=aes256", "sse='aes256' is not one of AES256, aws:kms"),
        ("s3://bucket/captures?sse=", "sse='' is not one of AES256, aws:kms"),
        ("s3://bucket/captures?encryption=AES256", "unknown option 'encryption' (known: kms_key_id, sse)"),
        ("s3://bucket/captures?sse=AES256&sse=aws:kms", "option 'sse' is given twice"),
        ("s3://bucket/captures?kms_key_id=alias/x", "kms_key_id needs sse=aws:kms"),
        ("s3://bucket/captures?sse=AES256&kms_key_id=alias/x", "kms_key_id needs sse=aws:kms"),
        ("s3://bucket/captures?sse=aws:kms&kms_key_id=", "kms_key_id needs sse=aws:kms and a non-empty key"),
        ("s3://bucket/captures?sse", "cannot parse its options"),
        ("file:///var/lib/podcap?sse=AES256", "file:// URLs take no options"),
        ("file:///var/lib/podcap?anything", "file:// URLs take no options"),
    ],
)
def test_bad_encryption_options_are_refused(url: str, message: str) -> None:
    with pytest.raises(ValueError, match="invalid object store URL") as refused:
        open_store(url)
    assert message in str(refused.value)
