"""Uploading a spool file while it grows, through outages and cancellations, with S3 over HTTP and a directory.

Every upload is checked the way a user would: the object's bytes and SHA-256 equal the spool file's, and no
multipart upload is left behind in the bucket to be billed for.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import re
import socket
import struct
import subprocess
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import pytest

from podcap.agent._pcapfile import count_pcap_packets
from podcap.agent._priority import BACKGROUND_NICE
from podcap.agent._upload import GrowingFileUploader, RetryPolicy
from podcap.storage import ObjectNotFound, ObjectStore, StoredObject, StoreUnavailable, open_store
from tests.support.s3 import S3Server

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

KiB = 1 << 10
MiB = 1 << 20
PART = 8 * MiB  # the S3 store's part size (storage/_s3.py), for files of a known number of parts
KEY = "shop/checkout/capture-1.pcap"
# Small delays keep the tests quick; no jitter, so the delays can be checked exactly.
FAST = RetryPolicy(first_delay=0.05, max_delay=0.4, multiplier=2.0, jitter=0.0)

_T = TypeVar("_T")
Retries = list[tuple[int, Exception, float]]
_PART_REQUEST = re.compile(rb"PUT [^ ]*[?&]partNumber=")


# --- helpers -------------------------------------------------------------------------------------------------


def _append(path: Path, size: int, *, seed: int = 0, burst: int = 512 * KiB, pause: float = 0.0) -> None:
    """Append ``size`` random bytes in bursts, flushed one by one, as ``tcpdump -U`` appends packets."""
    rng = random.Random(seed)
    with path.open("ab") as out:
        for offset in range(0, size, burst):
            out.write(rng.randbytes(min(burst, size - offset)))
            out.flush()
            time.sleep(pause)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(MiB):
            digest.update(chunk)
    return digest.hexdigest()


def _assert_object_is_the_spool(store: ObjectStore, stored: StoredObject, spool: Path) -> None:
    """The object's size, recorded SHA-256 and actual content all match the spool file (read in chunks)."""
    assert stored.key == KEY
    assert stored.size == spool.stat().st_size == store.stat(KEY)
    assert stored.sha256 == _sha256_file(spool)
    content = hashlib.sha256()
    with spool.open("rb") as source:
        for chunk in store.iter_bytes(KEY, chunk_size=MiB):
            assert chunk == source.read(len(chunk))
            content.update(chunk)
        assert source.read() == b""
    assert content.hexdigest() == stored.sha256


def _wait_for(condition: Callable[[], _T], timeout: float = 20.0) -> _T:
    """Poll ``condition`` until it returns something truthy (blocking: call it from a thread)."""
    deadline = time.monotonic() + timeout
    while not (value := condition()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return value


def _uploads(client: S3Client, bucket: str) -> list[str]:
    """Upload ids of the bucket's multipart uploads still in progress."""
    return [u["UploadId"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


def _parts(client: S3Client, bucket: str) -> int:
    """How many parts the bucket's multipart uploads in progress hold."""
    return sum(
        len(client.list_parts(Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"]).get("Parts", []))
        for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    )


def _lowered_threads() -> int:
    """How many of this process's threads run at the background nice value: below tcpdump."""
    count = 0
    for stat in Path("/proc/self/task").glob("*/stat"):
        with contextlib.suppress(OSError):  # a thread that exited meanwhile
            # The 19th field is the nice value; the command name before it may hold spaces, not ")".
            count += int(stat.read_text().rpartition(")")[2].split()[16]) >= BACKGROUND_NICE
    return count


def _recorder(retries: Retries) -> Callable[[int, Exception, float], None]:
    return lambda attempt, exc, delay: retries.append((attempt, exc, delay))


@dataclass(frozen=True)
class _Target:
    store: ObjectStore
    leftovers: Callable[[], list[str]]  # S3: multipart uploads in progress; directory: hidden temporary files


@pytest.fixture(params=["s3", "localdir"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> _Target:
    if request.param == "s3":
        bucket, url = request.getfixturevalue("s3_bucket")
        client = request.getfixturevalue("s3_server").client()
        return _Target(open_store(url), lambda: _uploads(client, bucket))
    objects = tmp_path / "objects"
    return _Target(open_store(objects.as_uri()), lambda: [p.name for p in objects.rglob(".*.part")])


# --- following a growing file --------------------------------------------------------------------------------


def test_s3_parts_go_out_while_the_file_grows(
    s3_server: S3Server, s3_bucket: tuple[str, str], tmp_path: Path
) -> None:
    bucket, url = s3_bucket
    store, client, spool = open_store(url), s3_server.client(), tmp_path / "capture.pcap"
    parts_seen_while_writing: list[int] = []

    def writer() -> None:
        # Half of the ~20 MiB first; then, with the writer still going, S3 must already hold parts of it.
        _append(spool, 10 * MiB, seed=1, pause=0.05)
        parts_seen_while_writing.append(_wait_for(lambda: _parts(client, bucket)))
        _append(spool, 10 * MiB + 12345, seed=2, pause=0.05)

    async def main() -> StoredObject:
        done = asyncio.Event()
        task = asyncio.create_task(GrowingFileUploader(store, KEY, spool, poll_interval=0.05).run(done))
        await asyncio.to_thread(writer)  # the spool does not even exist when the uploader starts
        done.set()
        return await task

    stored = asyncio.run(main())
    assert parts_seen_while_writing[0] >= 1
    _assert_object_is_the_spool(store, stored, spool)
    assert _uploads(client, bucket) == []


def test_local_store_follows_the_file_and_publishes_atomically(tmp_path: Path) -> None:
    objects, spool = tmp_path / "objects", tmp_path / "capture.pcap"
    store = open_store(objects.as_uri())
    seen_while_writing: list[tuple[int, bool]] = []

    def temporary_bytes() -> int:
        return sum(p.stat().st_size for p in objects.rglob(".*.part"))

    def visible() -> bool:
        try:
            store.stat(KEY)
        except ObjectNotFound:
            return False
        return True

    def writer() -> None:
        _append(spool, 6 * MiB, seed=3, pause=0.02)
        seen_while_writing.append((_wait_for(lambda: temporary_bytes() >= 6 * MiB), visible()))
        _append(spool, 6 * MiB + 7, seed=4, pause=0.02)

    async def main() -> StoredObject:
        done = asyncio.Event()
        task = asyncio.create_task(GrowingFileUploader(store, KEY, spool, poll_interval=0.05).run(done))
        await asyncio.to_thread(writer)
        done.set()
        return await task

    stored = asyncio.run(main())
    # While tcpdump wrote, the bytes were already in the store's hidden file, but nothing under the key.
    assert seen_while_writing == [(True, False)]
    _assert_object_is_the_spool(store, stored, spool)
    assert sorted(p.name for p in objects.rglob("*") if p.is_file()) == ["capture-1.pcap"]


# --- outages -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("when", ["before", "while"])
def test_s3_outage_is_retried_with_backoff_until_the_upload_completes(
    when: str, s3_server: S3Server, s3_bucket: tuple[str, str], tmp_path: Path
) -> None:
    bucket, url = s3_bucket
    store, client, spool = open_store(url), s3_server.client(), tmp_path / "capture.pcap"
    _append(spool, PART + MiB, seed=5)  # a part to send, whether or not the writer is done
    retries: Retries = []

    async def main() -> StoredObject:
        done = asyncio.Event()
        uploader = GrowingFileUploader(
            store, KEY, spool, retry=FAST, poll_interval=0.05, on_retry=_recorder(retries)
        )
        if when == "before":
            await asyncio.to_thread(s3_server.stop)
        task = asyncio.create_task(uploader.run(done))
        if when == "while":
            assert await asyncio.to_thread(_wait_for, lambda: _parts(client, bucket))
            await asyncio.to_thread(s3_server.stop)
            await asyncio.to_thread(_append, spool, PART, seed=6)  # the next part meets the outage
        assert await asyncio.to_thread(_wait_for, lambda: len(retries) >= 2)
        await asyncio.to_thread(_append, spool, 3 * MiB, seed=7)  # tcpdump writes on through the outage
        await asyncio.to_thread(s3_server.start)
        # moto keeps everything in memory, so the restarted server has no bucket (nor the old multipart
        # upload): recreate it, as an operator would. Until then the uploader meets NoSuchBucket, which is
        # retried like any other outage.
        await asyncio.to_thread(client.create_bucket, Bucket=bucket)
        done.set()
        return await task

    stored = asyncio.run(main())
    assert [attempt for attempt, _, _ in retries] == list(range(1, len(retries) + 1))
    assert [delay for _, _, delay in retries] == [min(0.4, 0.05 * 2**i) for i in range(len(retries))]
    assert all(isinstance(exc, StoreUnavailable) for _, exc, _ in retries)
    _assert_object_is_the_spool(store, stored, spool)
    assert _uploads(client, bucket) == []


class _Relay:
    """A TCP relay in front of the S3 server that a test can cut: an outage in which the server keeps its state.

    While cut it closes every connection, open or new, as a load balancer in front of a failing S3 would.
    While holding parts it keeps every UploadPart request to itself until released (or cut): the parts are
    then in flight for as long as the test needs, and ``held`` says how many are at once.
    """

    def __init__(self, port: int) -> None:
        self._upstream = ("127.0.0.1", port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.endpoint = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._up = threading.Event()
        self._up.set()
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._holding = False
        self._released = threading.Condition(self._lock)
        self.held = 0  # UploadPart requests held right now
        self.most_held = 0
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                downstream, _ = self._listener.accept()
            except TimeoutError:
                continue
            if not self._up.is_set():
                downstream.close()
                continue
            try:
                upstream = socket.create_connection(self._upstream)
            except OSError:
                downstream.close()
                continue
            with self._lock:
                self._sockets |= {downstream, upstream}
            for source, sink, requests in ((downstream, upstream, True), (upstream, downstream, False)):
                thread = threading.Thread(target=self._pipe, args=(source, sink, requests), daemon=True)
                self._threads.append(thread)
                thread.start()

    def _pipe(self, source: socket.socket, sink: socket.socket, requests: bool) -> None:
        try:
            while data := source.recv(256 * KiB):
                # botocore sends a request's line and headers in one piece, before its body.
                if requests and _PART_REQUEST.match(data):
                    self._hold()
                sink.sendall(data)
        except OSError:
            pass
        finally:
            self._drop(source, sink)

    def _hold(self) -> None:
        with self._released:
            self.held += 1
            self.most_held = max(self.most_held, self.held)
            self._released.wait_for(lambda: not self._holding)
            self.held -= 1
        if not self._up.is_set():
            raise OSError("cut")

    def hold_parts(self) -> None:
        with self._released:
            self._holding = True

    def release(self) -> None:
        with self._released:
            self._holding = False
            self._released.notify_all()

    def _drop(self, *sockets: socket.socket) -> None:
        for sock in sockets:
            with self._lock:
                if sock not in self._sockets:
                    continue
                self._sockets.discard(sock)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in recv on it
            sock.close()

    def cut(self) -> None:
        self._up.clear()
        self.release()
        with self._lock:
            sockets = list(self._sockets)
        self._drop(*sockets)

    def restore(self) -> None:
        self._up.set()

    def close(self) -> None:
        self._closing.set()
        self.cut()
        for thread in self._threads:
            thread.join(timeout=5)
        self._listener.close()


@pytest.fixture
def relay(s3_server: S3Server) -> Iterator[_Relay]:
    relay = _Relay(s3_server.port)
    try:
        yield relay
    finally:
        relay.close()


def test_upload_abandoned_in_an_outage_is_aborted_once_s3_is_back(
    relay: _Relay,
    s3_server: S3Server,
    s3_bucket: tuple[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bucket, url = s3_bucket
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", relay.endpoint)  # the uploader goes through the relay
    store, client, spool = open_store(url), s3_server.client(), tmp_path / "capture.pcap"
    _append(spool, 2 * PART + 4 * MiB, seed=8)
    retries: Retries = []

    async def main() -> StoredObject:
        done = asyncio.Event()
        uploader = GrowingFileUploader(
            store, KEY, spool, retry=FAST, poll_interval=0.05, on_retry=_recorder(retries)
        )
        task = asyncio.create_task(uploader.run(done))
        assert await asyncio.to_thread(_wait_for, lambda: _parts(client, bucket) >= 2)
        relay.cut()
        await asyncio.to_thread(_append, spool, PART, seed=9)  # the third part fails, and so does its abort
        assert await asyncio.to_thread(_wait_for, lambda: len(retries) >= 2)
        # The server kept the first upload: it could not be aborted while S3 was unreachable.
        assert len(await asyncio.to_thread(_uploads, client, bucket)) == 1
        relay.restore()
        done.set()
        return await task

    stored = asyncio.run(main())
    _assert_object_is_the_spool(store, stored, spool)
    assert _uploads(client, bucket) == []


def test_s3_parts_go_out_in_parallel_at_background_priority_and_in_order(
    relay: _Relay,
    s3_server: S3Server,
    s3_bucket: tuple[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bucket, url = s3_bucket
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", relay.endpoint)
    store, client, spool = open_store(url), s3_server.client(), tmp_path / "capture.pcap"
    _append(spool, 6 * PART + 777, seed=13, burst=MiB)  # seven parts, the last one short
    lowered: list[int] = []

    async def main() -> StoredObject:
        done = asyncio.Event()
        done.set()
        relay.hold_parts()
        task = asyncio.create_task(GrowingFileUploader(store, KEY, spool).run(done))
        # One part after the other would never have two in flight; the store sends four at a time.
        assert await asyncio.to_thread(_wait_for, lambda: relay.held == 4)
        lowered.append(_lowered_threads())
        relay.release()
        return await task

    stored = asyncio.run(main())
    # The uploader's worker and the four part threads it started all run at the background nice value.
    assert lowered[0] >= 5
    assert relay.most_held == 4  # and never more than four parts (their memory) at once
    _assert_object_is_the_spool(store, stored, spool)
    # Seven parts completed in order (moto, like S3, refuses a part list that is not ascending).
    assert client.head_object(Bucket=bucket, Key=f"captures/{KEY}")["ETag"].strip('"').endswith("-7")
    assert _uploads(client, bucket) == []


def test_s3_abort_waits_for_the_parts_in_flight_and_leaves_no_upload(
    relay: _Relay, s3_server: S3Server, s3_bucket: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket, url = s3_bucket
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", relay.endpoint)
    store, client = open_store(url), s3_server.client()
    upload = store.open_upload(KEY)
    relay.hold_parts()
    upload.write(random.Random(14).randbytes(3 * PART))  # three parts, all in flight
    assert _wait_for(lambda: relay.held == 3)

    aborting = threading.Thread(target=upload.abort)
    aborting.start()
    aborting.join(timeout=0.5)  # time enough for an abort that does not wait for its parts to be done
    returned_while_parts_in_flight = not aborting.is_alive()
    relay.release()
    aborting.join(timeout=60)

    assert not returned_while_parts_in_flight
    assert not aborting.is_alive()
    assert _uploads(client, bucket) == []
    with pytest.raises(ObjectNotFound):
        store.stat(KEY)
    with pytest.raises(ValueError, match="aborted"):
        upload.write(b"more")


def test_parts_failing_in_flight_are_retried_and_the_file_stored(
    relay: _Relay,
    s3_server: S3Server,
    s3_bucket: tuple[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bucket, url = s3_bucket
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", relay.endpoint)
    store, client, spool = open_store(url), s3_server.client(), tmp_path / "capture.pcap"
    _append(spool, 3 * PART + 5, seed=15)
    retries: Retries = []

    async def main() -> StoredObject:
        done = asyncio.Event()
        uploader = GrowingFileUploader(
            store, KEY, spool, retry=FAST, poll_interval=0.05, on_retry=_recorder(retries)
        )
        relay.hold_parts()
        task = asyncio.create_task(uploader.run(done))
        assert await asyncio.to_thread(_wait_for, lambda: relay.held == 3)
        relay.cut()  # the three parts in flight fail, and the abort of their upload with them
        assert await asyncio.to_thread(_wait_for, lambda: retries)
        relay.restore()
        await asyncio.to_thread(_append, spool, PART, seed=16)  # tcpdump wrote on meanwhile
        done.set()
        return await task

    stored = asyncio.run(main())
    assert isinstance(retries[0][1], StoreUnavailable)
    _assert_object_is_the_spool(store, stored, spool)
    assert _uploads(client, bucket) == []  # the failed attempt's upload was aborted once S3 was back


def test_attempt_limit_raises_the_last_storage_error(s3_bucket: tuple[str, str], tmp_path: Path) -> None:
    # s3_bucket points boto3 at the test server; the bucket named here does not exist there.
    store = open_store("s3://podcap-no-such-bucket/captures")
    spool = tmp_path / "capture.pcap"
    _append(spool, 100 * KiB)
    retries: Retries = []
    policy = RetryPolicy(first_delay=0.01, max_delay=1.0, jitter=0.0, max_attempts=3)
    uploader = GrowingFileUploader(store, KEY, spool, retry=policy, on_retry=_recorder(retries))
    done = asyncio.Event()
    done.set()

    with pytest.raises(StoreUnavailable, match="NoSuchBucket"):
        asyncio.run(uploader.run(done))
    assert [(attempt, delay) for attempt, _, delay in retries] == [(1, 0.01), (2, 0.02)]
    assert spool.stat().st_size == 100 * KiB


def test_retry_delays_grow_to_the_cap_with_bounded_jitter() -> None:
    policy = RetryPolicy(first_delay=0.5, max_delay=30.0, multiplier=2.0, jitter=0.1)
    for failures, base in [(1, 0.5), (2, 1.0), (3, 2.0), (7, 30.0), (50, 30.0)]:
        assert all(0.9 * base <= policy.delay(failures) <= 1.1 * base for _ in range(100))
    with pytest.raises(ValueError, match="jitter"):
        RetryPolicy(jitter=1.0)


# --- cancellation, recovery, failures of the spool itself -------------------------------------------------------


def test_cancellation_aborts_the_upload_and_keeps_the_spool(target: _Target, tmp_path: Path) -> None:
    spool = tmp_path / "capture.pcap"
    _append(spool, 12 * MiB, seed=10)
    before = _sha256_file(spool)

    async def main() -> None:
        done = asyncio.Event()  # tcpdump is still running when the agent shuts down
        task = asyncio.create_task(
            GrowingFileUploader(target.store, KEY, spool, poll_interval=0.05).run(done)
        )
        assert await asyncio.to_thread(_wait_for, target.leftovers)  # an upload is under way
        task.cancel()
        await task

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(main())
    assert target.leftovers() == []
    with pytest.raises(ObjectNotFound):
        target.store.stat(KEY)
    assert _sha256_file(spool) == before


@pytest.mark.parametrize("size", [24, 2 * PART + 123])
def test_recovery_uploads_a_finished_spool_from_scratch(target: _Target, tmp_path: Path, size: int) -> None:
    spool = tmp_path / "capture.pcap"
    _append(spool, size, seed=11)
    done = asyncio.Event()
    done.set()  # an agent restart: tcpdump is long gone
    stored = asyncio.run(GrowingFileUploader(target.store, KEY, spool).run(done))
    _assert_object_is_the_spool(target.store, stored, spool)
    assert target.leftovers() == []


def test_missing_spool_file_is_not_retried(tmp_path: Path) -> None:
    objects = tmp_path / "objects"
    store = open_store(objects.as_uri())
    done = asyncio.Event()
    done.set()
    with pytest.raises(FileNotFoundError):
        asyncio.run(GrowingFileUploader(store, KEY, tmp_path / "gone.pcap", retry=FAST).run(done))
    assert [p for p in objects.rglob("*") if p.is_file()] == []


def test_memory_stays_bounded_for_a_large_file(
    s3_server: S3Server, s3_bucket: tuple[str, str], tmp_path: Path
) -> None:
    bucket, url = s3_bucket
    store, spool = open_store(url), tmp_path / "capture.pcap"
    _append(spool, 128 * MiB, seed=12, burst=MiB)
    done = asyncio.Event()
    done.set()

    tracemalloc.start()
    try:
        stored = asyncio.run(GrowingFileUploader(store, KEY, spool).run(done))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    # A read buffer of 1 MiB, one part being filled and at most four being sent (8 MiB each): 41 MiB, and
    # what botocore reads of each part in flight to sign and checksum it (1 MiB at a time), whatever the size
    # of the file (here 128 MiB).
    assert peak < 52 * MiB, f"peak {peak / MiB:.1f} MiB"
    _assert_object_is_the_spool(store, stored, spool)
    assert _uploads(s3_server.client(), bucket) == []


# --- counting packets in a pcap --------------------------------------------------------------------------------


def _write_pcap(path: Path, count: int, *, order: str = "<", nano: bool = False, seed: int = 0) -> None:
    """A classic pcap of ``count`` Ethernet frames of random sizes, in the given byte order and precision."""
    rng = random.Random(seed)
    magic = 0xA1B23C4D if nano else 0xA1B2C3D4
    with path.open("wb") as out:
        out.write(struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, 65535, 1))
        for i in range(count):
            frame = rng.randbytes(rng.randint(42, 1514))
            out.write(struct.pack(order + "IIII", 1_700_000_000 + i, i % 1_000_000, len(frame), len(frame)))
            out.write(frame)


def _capinfos_count(path: Path) -> int:
    output = subprocess.run(
        ["capinfos", "-c", "-M", str(path)], check=True, capture_output=True, text=True
    ).stdout
    match = re.search(r"Number of packets:\s*(\d+)", output)
    assert match, output
    return int(match.group(1))


@pytest.mark.parametrize(("order", "nano"), [("<", False), (">", False), ("<", True), (">", True)])
def test_count_pcap_packets_matches_capinfos(tmp_path: Path, order: str, nano: bool) -> None:
    path = tmp_path / "generated.pcap"
    _write_pcap(path, 1234, order=order, nano=nano)
    assert count_pcap_packets(path) == _capinfos_count(path) == 1234


@pytest.mark.parametrize("precision", ["micro", "nano"])
def test_count_pcap_packets_on_files_written_by_tcpdump(tmp_path: Path, precision: str) -> None:
    source, written = tmp_path / "generated.pcap", tmp_path / "tcpdump.pcap"
    _write_pcap(source, 777, order=">")
    subprocess.run(
        [
            "tcpdump",
            "-r",
            str(source),
            "-w",
            str(written),
            "-Z",
            "root",
            f"--time-stamp-precision={precision}",
        ],
        check=True,
        capture_output=True,
    )
    assert count_pcap_packets(written) == _capinfos_count(written) == 777

    # tcpdump killed mid-write: a last record cut short is not a packet.
    with written.open("r+b") as f:
        f.truncate(written.stat().st_size - 10)
    assert count_pcap_packets(written) == 776
    with written.open("r+b") as f:
        f.truncate(24 + 8)
    assert count_pcap_packets(written) == 0
    with written.open("r+b") as f:
        f.truncate(10)
    assert count_pcap_packets(written) == 0


def test_count_pcap_packets_refuses_what_is_not_a_classic_pcap(tmp_path: Path) -> None:
    source, pcapng = tmp_path / "generated.pcap", tmp_path / "capture.pcapng"
    _write_pcap(source, 3)
    subprocess.run(["editcap", "-F", "pcapng", str(source), str(pcapng)], check=True, capture_output=True)
    with pytest.raises(ValueError, match="pcapng"):
        count_pcap_packets(pcapng)
    (tmp_path / "text").write_bytes(b"hello, world\n" * 4)
    with pytest.raises(ValueError, match="not a pcap"):
        count_pcap_packets(tmp_path / "text")
    corrupt = tmp_path / "corrupt.pcap"
    corrupt.write_bytes(source.read_bytes()[:24] + struct.pack("<IIII", 0, 0, 1 << 30, 1 << 30))
    with pytest.raises(ValueError, match="corrupt"):
        count_pcap_packets(corrupt)
