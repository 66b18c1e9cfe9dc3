"""Both object stores, S3 over HTTP (moto's server) and a local directory, against the same expectations."""

import hashlib
import itertools
import os
import random
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from podcap.storage import ObjectNotFound, ObjectStore, StoreUnavailable, open_store
from tests.support.s3 import S3Server

MiB = 1 << 20
PART = 8 * MiB  # the S3 store's part size (storage/_s3.py)


@pytest.fixture(params=["s3", "localdir"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "s3":
        _, url = request.getfixturevalue("s3_bucket")
        return open_store(url)
    return open_store((tmp_path / "objects").as_uri())


def _payload(size: int, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(size)


def _odd_chunks(data: bytes) -> Iterator[bytes]:
    """Chunks of irregular sizes, from 1 byte to over a part, like a growing spool file read as it grows."""
    sizes = itertools.cycle([1, 4095, 65537, 3 * MiB + 11, 777, 5 * MiB + 3])
    offset = 0
    while offset < len(data):
        size = next(sizes)
        yield data[offset : offset + size]
        offset += size


def _read(store: ObjectStore, key: str, chunk_size: int = 1 << 20) -> bytes:
    return b"".join(store.iter_bytes(key, chunk_size))


def test_streamed_upload_round_trips_byte_for_byte(store: ObjectStore) -> None:
    data = _payload(12 * MiB + 12345)
    upload = store.open_upload("shop/checkout/capture-1.pcap")
    for chunk in _odd_chunks(data):
        upload.write(chunk)
    stored = upload.complete()

    assert stored.key == "shop/checkout/capture-1.pcap"
    assert stored.size == len(data) == store.stat(stored.key)
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert _read(store, stored.key, chunk_size=999_999) == data


def test_small_and_empty_objects(store: ObjectStore) -> None:
    for key, data in (("small.pcap", b"\xd4\xc3\xb2\xa1" + bytes(20)), ("empty.pcap", b"")):
        upload = store.open_upload(key)
        upload.write(data)
        stored = upload.complete()
        assert (stored.size, stored.sha256) == (len(data), hashlib.sha256(data).hexdigest())
        assert _read(store, key) == data


def test_upload_file_reads_the_file_in_chunks(store: ObjectStore, tmp_path: Path) -> None:
    data = _payload(7 * MiB + 1, seed=3)
    spool = tmp_path / "spool.pcap"
    spool.write_bytes(data)
    stored = store.upload_file("a/from-file.pcap", spool)
    assert (stored.size, stored.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert _read(store, "a/from-file.pcap") == data


def test_aborted_upload_leaves_nothing_behind(
    store: ObjectStore, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    on_s3 = "s3" in request.node.callspec.id
    upload = store.open_upload("shop/aborted.pcap")
    upload.write(_payload(PART + MiB))  # more than a part: on S3 a multipart upload is under way
    if on_s3:
        bucket, _ = request.getfixturevalue("s3_bucket")
        client = request.getfixturevalue("s3_server").client()
        assert len(client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])) == 1
    upload.abort()

    with pytest.raises(ObjectNotFound):
        store.stat("shop/aborted.pcap")
    if on_s3:
        assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
        assert client.list_objects_v2(Bucket=bucket).get("KeyCount") == 0
    else:
        assert [p for p in (tmp_path / "objects").rglob("*") if p.is_file()] == []


def test_s3_parts_sent_in_parallel_make_the_object_in_order(
    s3_server: S3Server, s3_bucket: tuple[str, str]
) -> None:
    bucket, url = s3_bucket
    store, client = open_store(url), s3_server.client()
    data = _payload(5 * PART + 4321, seed=9)
    upload = store.open_upload("shop/parallel.pcap")
    upload.write(data[: 5 * PART // 2])  # one write of two and a half parts, then many small ones
    for chunk in _odd_chunks(data[5 * PART // 2 :]):
        upload.write(chunk)
    stored = upload.complete()

    assert (stored.size, stored.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert _read(store, stored.key) == data
    # Six parts, listed in order on completion (S3 and moto refuse part lists that are not ascending).
    assert (
        client.head_object(Bucket=bucket, Key="captures/shop/parallel.pcap", PartNumber=1)["PartsCount"] == 6
    )
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_s3_part_failure_surfaces_as_store_unavailable(
    s3_server: S3Server, s3_bucket: tuple[str, str]
) -> None:
    bucket, url = s3_bucket
    upload = open_store(url).open_upload("shop/broken.pcap")
    upload.write(_payload(PART, seed=5))  # the multipart upload exists, its first part is on its way
    s3_server.stop()
    try:
        with pytest.raises(StoreUnavailable) as caught:
            for chunk in _odd_chunks(_payload(3 * PART, seed=6)):
                upload.write(chunk)
            upload.complete()
        assert caught.value.__cause__ is not None  # botocore's error, for the logs
        # The upload is broken for good: completing it says so again; aborting fails while the store is down.
        with pytest.raises(StoreUnavailable):
            upload.complete()
        with pytest.raises(StoreUnavailable):
            upload.abort()
    finally:
        s3_server.start()
    # moto restarted empty: with its bucket back, the upload it forgot is aborted without an error.
    s3_server.client().create_bucket(Bucket=bucket)
    upload.abort()
    with pytest.raises(ValueError, match="aborted"):
        upload.write(b"x")


def test_missing_objects(store: ObjectStore) -> None:
    with pytest.raises(ObjectNotFound):
        store.iter_bytes("no/such.pcap")
    with pytest.raises(ObjectNotFound):
        store.stat("no/such.pcap")
    store.delete("no/such.pcap")  # deleting what is not there is fine


def test_delete_removes_the_object(store: ObjectStore) -> None:
    upload = store.open_upload("gone.pcap")
    upload.write(b"x")
    upload.complete()
    store.delete("gone.pcap")
    with pytest.raises(ObjectNotFound):
        store.stat("gone.pcap")


@pytest.mark.parametrize("key", ["", "/abs.pcap", "a/../b.pcap", "..", "a//b.pcap", "a/./b", "a/", "a\\b"])
def test_bad_keys_are_refused(store: ObjectStore, key: str) -> None:
    with pytest.raises(ValueError, match="invalid object key"):
        store.open_upload(key)
    with pytest.raises(ValueError, match="invalid object key"):
        store.stat(key)
    with pytest.raises(ValueError, match="invalid object key"):
        store.presign_get(key, timedelta(minutes=5), "x.pcap")


def test_local_presign_is_the_file_url(tmp_path: Path) -> None:
    store = open_store((tmp_path / "objects").as_uri())
    upload = store.open_upload("ns/pod.pcap")
    upload.write(b"pcap")
    upload.complete()
    url = store.presign_get("ns/pod.pcap", timedelta(minutes=5), "ns_pod_2025.pcap")
    assert urlsplit(url).scheme == "file"
    with urllib.request.urlopen(url) as response:
        assert response.read() == b"pcap"


def test_local_upload_is_invisible_until_complete(tmp_path: Path) -> None:
    store = open_store((tmp_path / "objects").as_uri())
    upload = store.open_upload("ns/pod.pcap")
    upload.write(b"half a pcap")
    with pytest.raises(ObjectNotFound):
        store.stat("ns/pod.pcap")
    upload.complete()
    assert store.stat("ns/pod.pcap") == len(b"half a pcap")
    assert os.listdir(tmp_path / "objects" / "ns") == ["pod.pcap"]


def test_presigned_s3_url_downloads_as_attachment_and_expires(s3_bucket: tuple[str, str]) -> None:
    store = open_store(s3_bucket[1])
    data = _payload(300_000)
    upload = store.open_upload("shop/checkout.pcap")
    upload.write(data)
    upload.complete()

    url = store.presign_get("shop/checkout.pcap", timedelta(minutes=5), "shop_checkout_20250301T120000Z.pcap")
    with urllib.request.urlopen(url) as response:
        assert response.read() == data
        assert response.headers["Content-Disposition"] == (
            'attachment; filename="shop_checkout_20250301T120000Z.pcap"'
        )

    # moto (5.2) does not enforce X-Amz-Expires, so a sleep-then-403 test would prove nothing here; check
    # instead that the expiry is signed into the URL as SigV4 prescribes, which real S3 servers enforce.
    before = datetime.now(UTC).replace(microsecond=0)
    short = store.presign_get("shop/checkout.pcap", timedelta(seconds=1), "x.pcap")
    query = parse_qs(urlsplit(short).query)
    signed_at = datetime.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"] and query["X-Amz-Signature"]
    assert query["X-Amz-Expires"] == ["1"]
    assert before <= signed_at <= datetime.now(UTC)
    with pytest.raises(ValueError, match="7 days"):
        store.presign_get("shop/checkout.pcap", timedelta(days=8), "x.pcap")


def test_stopped_s3_server_gives_store_unavailable(s3_server: S3Server, s3_bucket: tuple[str, str]) -> None:
    store = open_store(s3_bucket[1])
    s3_server.stop()
    try:
        with pytest.raises(StoreUnavailable) as caught:
            store.stat("shop/any.pcap")
        assert caught.value.__cause__ is not None
        upload = store.open_upload("shop/any.pcap")
        upload.write(b"small")
        with pytest.raises(StoreUnavailable):
            upload.complete()
        with pytest.raises(StoreUnavailable):
            store.iter_bytes("shop/any.pcap")
    finally:
        s3_server.start()


def test_missing_bucket_gives_store_unavailable(s3_bucket: tuple[str, str]) -> None:
    store = open_store("s3://podcap-no-such-bucket/captures")
    upload = store.open_upload("a.pcap")
    upload.write(b"x")
    with pytest.raises(StoreUnavailable, match="NoSuchBucket"):
        upload.complete()


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/x",
        "gs://bucket/x",
        "s3:///no-bucket",
        "file://host/dir",
        "file:relative",
        "",
        "/tmp/x",
    ],
)
def test_open_store_rejects_unknown_urls(url: str) -> None:
    with pytest.raises(ValueError, match="object store URL"):
        open_store(url)


def test_open_store_urls() -> None:
    assert open_store("file:///var/lib/podcap/").url == "file:///var/lib/podcap"
