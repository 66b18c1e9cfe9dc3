"""Uploading a spool file while tcpdump still writes it, and never giving up on it while the store is down.

tcpdump ``-w FILE -U`` appends packet by packet; following the file as it grows sends S3 parts during the
capture, so the upload completes moments after tcpdump exits instead of starting then. The spool file is the
source of truth: a failed upload (store unreachable, bucket missing, disk full) is thrown away and started
again from byte 0 after a backoff, for as long as it takes, because an :class:`~podcap.storage.Upload` cannot
be resumed and a pcap must not be lost. Nothing here deletes the spool file; the caller does, once
:meth:`GrowingFileUploader.run` has returned the stored object.

The spool is read once, front to back, in blocks of up to ``read_size`` (1 MiB): the upload hashes each block
and cuts it into parts as it passes, and an S3 upload sends a few parts at a time from threads of its own, so
it keeps up with tcpdump whenever the store can and what is left when tcpdump exits is about the last part.
The store blocks, so every file read and store call runs in one worker thread per uploader, one at a time,
at background priority (``lower_this_thread``: nice 19 and the lowest best-effort IO, which the S3 upload's
part threads inherit): when the node is busy, the tcpdump whose file it reads gets the CPU and the disk
first. That order is what makes cancellation safe: the abort queued behind a write still in flight runs
after it, and the S3 upload's abort waits for its parts in flight before aborting, instead of racing them
and leaving the multipart upload behind. While tcpdump still writes, a ``pacer`` (``CpuPacer``) also holds
that thread to a tenth of a core for as long as the node's CPU is contended; once tcpdump has exited, the
rest goes at full speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar, TypeVarTuple

from podcap.storage import ObjectStore, StorageError, StoredObject, Upload

from ._priority import CpuPacer, lower_this_thread

__all__ = ["GrowingFileUploader", "RetryPolicy"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_Ts = TypeVarTuple("_Ts")

# One worker call moves blocks for at most this long, then lets a call queued behind it (an abort) run.
_DRAIN_S = 0.25


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff between upload attempts.

    ``max_attempts`` 0 means no limit: the spool stays until the upload is confirmed. A positive value
    makes :meth:`GrowingFileUploader.run` raise the last storage error after that many failed attempts.
    """

    first_delay: float = 0.5
    max_delay: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.1  # each delay is scaled by a random factor in [1 - jitter, 1 + jitter]
    max_attempts: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.first_delay <= self.max_delay:
            raise ValueError("retry delays must satisfy 0 <= first_delay <= max_delay")
        if self.multiplier < 1:
            raise ValueError("the retry multiplier must be at least 1")
        if not 0 <= self.jitter < 1:
            raise ValueError("retry jitter must be in [0, 1)")
        if self.max_attempts < 0:
            raise ValueError("max_attempts must be 0 (no limit) or positive")

    def delay(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th failed attempt (1 for the first)."""
        base = min(self.max_delay, self.first_delay * self.multiplier ** max(0, failures - 1))
        # Jitter spreads the retries of many agents that lost the same store at the same moment; it has
        # nothing to do with security.
        return base * (1 + self.jitter * random.uniform(-1, 1))  # noqa: S311


class GrowingFileUploader:
    """Uploads a spool file while tcpdump appends to it, and completes it once tcpdump has exited."""

    def __init__(
        self,
        store: ObjectStore,
        key: str,
        path: Path,
        *,
        retry: RetryPolicy = RetryPolicy(),
        read_size: int = 1 << 20,
        poll_interval: float = 0.2,
        on_retry: Callable[[int, Exception, float], None] | None = None,
        pacer: CpuPacer | None = None,
    ) -> None:
        if read_size <= 0 or poll_interval <= 0:
            raise ValueError("read_size and poll_interval must be positive")
        self._store = store
        self._key = key
        self._path = path
        self._retry = retry
        self._read_size = read_size
        self._poll_interval = poll_interval
        self._on_retry = on_retry
        self._pacer = pacer
        # Uploads whose abort failed (the store was down): aborted again once the store answers, so a
        # multipart upload is not left to the bucket's lifecycle rule when we can clean it up ourselves.
        self._unaborted: list[Upload] = []  # touched only in the worker thread

    async def run(self, writer_done: asyncio.Event) -> StoredObject:
        """Follow the spool file until ``writer_done`` is set, upload the rest, and return the stored object.

        With ``writer_done`` already set (an agent restart found a finished spool file) the whole file is
        uploaded from scratch. Storage errors are retried per the :class:`RetryPolicy`; an unreadable spool
        file raises its OSError. On cancellation the upload in flight is aborted and the spool file stays.
        """
        worker = _Worker(f"upload-{self._key}")
        try:
            return await self._run(worker, writer_done)
        finally:
            worker.close()

    async def _run(self, worker: _Worker, writer_done: asyncio.Event) -> StoredObject:
        failures = 0
        while True:
            attempt = _Attempt(self._store, self._key, self._path, self._read_size)
            try:
                stored = await self._follow(worker, attempt, writer_done)
            except StorageError as exc:
                await asyncio.shield(worker.call(self._discard, attempt))
                failures += 1
                target = f"{self._store.url}/{self._key}"
                if self._retry.max_attempts and failures >= self._retry.max_attempts:
                    log.error(
                        "upload of %s to %s failed %d times, giving up: %s", self._path, target, failures, exc
                    )
                    await asyncio.shield(worker.call(self._abort_unaborted))
                    raise
                delay = self._retry.delay(failures)
                log.warning(
                    "upload of %s to %s failed (attempt %d), retrying in %.2f s: %s",
                    self._path,
                    target,
                    failures,
                    delay,
                    exc,
                )
                if self._on_retry is not None:
                    self._on_retry(failures, exc, delay)
                await asyncio.sleep(delay)
            except BaseException:
                # Cancelled (agent shutdown) or the spool file is unreadable: leave nothing in the store.
                await asyncio.shield(worker.call(self._discard, attempt))
                await asyncio.shield(worker.call(self._abort_unaborted))
                raise
            else:
                await worker.call(self._abort_unaborted)
                return stored

    async def _follow(self, worker: _Worker, attempt: _Attempt, writer_done: asyncio.Event) -> StoredObject:
        """One attempt: open an upload, feed it everything the file holds until the writer is done, complete."""
        await worker.call(attempt.open)
        while True:
            # Read the flag before draining: once it was set, the drain that follows reaches the final end.
            done = writer_done.is_set()
            while await worker.call(attempt.drain, done, None if done else self._pacer):
                pass  # stopped for a moment with more to read, so that a call queued behind it can run
            if done:
                return await worker.call(attempt.complete)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll_interval):
                    await writer_done.wait()

    def _discard(self, attempt: _Attempt) -> None:
        """Close the attempt's file and abort its upload; an abort failure is logged and tried again later."""
        attempt.close()
        if attempt.upload is not None:
            self._abort_quietly(attempt.upload, keep=True)

    def _abort_unaborted(self) -> None:
        pending, self._unaborted = self._unaborted, []
        for upload in pending:
            self._abort_quietly(upload, keep=False)

    def _abort_quietly(self, upload: Upload, *, keep: bool) -> None:
        # Best effort: the store is often down when this runs, and its error must not hide the one that led
        # here. S3 buckets should carry an AbortIncompleteMultipartUpload rule for what is left.
        try:
            upload.abort()
        except StorageError as exc:
            if keep:
                self._unaborted.append(upload)
            log.warning("could not abort an upload to %s/%s: %s", self._store.url, self._key, exc)


class _Attempt:
    """One upload of the spool file from byte 0; every method runs in the uploader's worker thread."""

    def __init__(self, store: ObjectStore, key: str, path: Path, read_size: int) -> None:
        self._store = store
        self._key = key
        self._path = path
        self._read_size = read_size
        self.upload: Upload | None = None
        self._source: io.FileIO | None = None

    def open(self) -> None:
        self.upload = self._store.open_upload(self._key)

    def pump(self, writer_done: bool) -> bool:
        """Move up to ``read_size`` new bytes from the file to the upload; False once it has caught up.

        A short read is the end of what the writer has written so far: stopping there until the next poll,
        instead of reading again at once, keeps the reads large while tcpdump appends packet by packet.
        """
        assert self.upload is not None
        if self._source is None:
            try:
                self._source = self._path.open("rb", buffering=0)
            except FileNotFoundError:
                if writer_done:
                    raise
                return False  # the writer has not created it yet
        # A regular file has no sticky end-of-file: reading again after b"" returns what was appended since.
        chunk = self._source.read(self._read_size)
        # Even with nothing new: an S3 part that failed in the background says so here, and the retry can
        # start while tcpdump is quiet.
        self.upload.write(chunk)
        return len(chunk) == self._read_size

    def drain(self, writer_done: bool, pacer: CpuPacer | None) -> bool:
        """`pump` until the file is caught up (False) or ``_DRAIN_S`` has passed (True), pacing each block.

        One call for many blocks: at 0.5 GB/s a hop to this thread and back per 1 MiB block cost the event
        loop several % of a core. The time bound keeps a queued abort from waiting long behind it."""
        until = time.monotonic() + _DRAIN_S
        while self.pump(writer_done):
            if pacer is not None:
                pacer.after_block()
            if time.monotonic() >= until:
                return True
        return False

    def complete(self) -> StoredObject:
        assert self.upload is not None
        self.close()
        stored = self.upload.complete()
        self.upload = None
        return stored

    def close(self) -> None:
        if self._source is not None:
            self._source.close()
            self._source = None


class _Worker:
    """A single thread, at background priority, that runs blocking calls in the order they were made."""

    def __init__(self, name: str) -> None:
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=name, initializer=lower_this_thread
        )

    async def call(self, fn: Callable[[*_Ts], _T], *args: *_Ts) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        # Never block the event loop; after a second cancellation a queued abort may still be running.
        self._executor.shutdown(wait=False)
