"""Retention: captures older than the configured period are removed, their pcaps first and then their rows.

pcaps hold whatever crossed a pod's interface, credentials and personal data included, so keeping them forever
is a liability; retention bounds how long they exist. Every replica runs a sweeper; the claim's ``FOR UPDATE
SKIP LOCKED`` (see ``podcap.storage.ExpiredCaptures``) splits the work between them, so no capture is removed
twice and no replica waits for another.

Per capture the order is what keeps anything from being lost track of: its objects are deleted from the store,
then its rows, in the transaction that holds the capture's lock. If the store fails, the capture's rows (and
so the keys of whatever objects remain) stay for the next sweep, which deletes again (deleting a missing object
is not an error). The audit trail is not the sweeper's to touch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy.orm import Session, sessionmaker

from podcap.storage import ExpiredCaptures, ObjectStore, StorageError, StoreUnavailable, context_key

__all__ = ["RetentionSettings", "RetentionSweeper", "SweepReport"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetentionSettings:
    """``ttl`` 0 keeps captures forever (the default); otherwise one is removed ``ttl`` after it ended."""

    ttl: timedelta = timedelta(0)
    sweep_interval: timedelta = timedelta(minutes=5)
    # Captures claimed (and locked) per transaction: small enough that a transaction stays short (on SQLite it
    # holds the database's write lock while the objects are deleted), large enough to amortise the claim.
    batch_size: int = 50

    def __post_init__(self) -> None:
        if self.ttl < timedelta(0):
            raise ValueError(f"retention must be 0 (keep forever) or positive, not {self.ttl}")
        if self.sweep_interval <= timedelta(0):
            raise ValueError(f"the retention sweep interval must be positive, not {self.sweep_interval}")
        if self.batch_size < 1:
            raise ValueError(f"the retention batch size must be at least 1, not {self.batch_size}")

    @property
    def enabled(self) -> bool:
        return self.ttl > timedelta(0)


@dataclass
class SweepReport:
    """What one sweep did: the captures and objects it removed, and why it stopped early if it did."""

    captures: list[str] = field(default_factory=list)
    objects: list[str] = field(default_factory=list)
    left: dict[str, str] = field(default_factory=dict)  # capture id -> why it was left for the next sweep
    store_unavailable: bool = False


class RetentionSweeper:
    """Removes expired captures every ``sweep_interval``, from a worker thread (the DB driver and boto3 block)."""

    def __init__(
        self, sessions: sessionmaker[Session], store: ObjectStore, settings: RetentionSettings
    ) -> None:
        self._sessions = sessions
        self._store = store
        self._settings = settings
        self._stopping = threading.Event()  # read by the sweeping thread
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Starts sweeping (a first sweep right away), unless retention is off."""
        if not self._settings.enabled:
            log.info("retention off: captures are kept until deleted")
            return
        log.info(
            "retention: captures are removed %s after they ended (sweeping every %s)",
            self._settings.ttl,
            self._settings.sweep_interval,
        )
        self._task = asyncio.create_task(self._run(), name="retention-sweeper")

    async def close(self) -> None:
        """Stops sweeping. A sweep under way finishes the capture it is removing and commits first: its thread
        cannot be cancelled, and the engine must not be disposed of under it."""
        self._stopping.set()
        self._wake.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        interval = self._settings.sweep_interval.total_seconds()
        while not self._stopping.is_set():
            try:
                await asyncio.to_thread(self.sweep)
            except Exception:
                log.exception("retention sweep failed; trying again in %.0fs", interval)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)

    def sweep(self, now: datetime | None = None) -> SweepReport:
        """Removes every capture that ended ``ttl`` before ``now`` (blocking), batch by batch, until none is left
        or the store fails."""
        cutoff = (now or datetime.now(UTC)) - self._settings.ttl
        report = SweepReport()
        while not self._stopping.is_set():
            claimed = self._sweep_batch(cutoff, report)
            if report.store_unavailable or claimed < self._settings.batch_size:
                break
        if report.captures:
            log.info(
                "retention: removed %d captures (%d objects) that ended before %s",
                len(report.captures),
                len(report.objects),
                cutoff.isoformat(timespec="seconds"),
            )
        return report

    def _sweep_batch(self, cutoff: datetime, report: SweepReport) -> int:
        """Claims one batch and removes what it can of it in one transaction; returns how many were claimed."""
        with self._sessions.begin() as session:
            expired = ExpiredCaptures(session)
            batch = expired.claim(cutoff, self._settings.batch_size, exclude=report.left.keys())
            removed: list[str] = []
            for index, capture in enumerate(batch):
                if self._stopping.is_set():
                    break
                try:
                    deleted_keys = [
                        key for key in capture.object_keys if self._delete_object(capture.id, key)
                    ]
                except StoreUnavailable as exc:
                    # The store is down: the rest of the batch would fail the same way, slowly. Its rows, and
                    # so the keys of the objects it still holds, stay for the next sweep.
                    report.store_unavailable = True
                    for left in batch[index:]:
                        report.left[left.id] = str(exc)
                    log.warning(
                        "retention: object store unavailable, %d expired captures left for the next sweep "
                        "(first %s): %s",
                        len(batch) - index,
                        capture.id,
                        exc,
                    )
                    break
                except StorageError as exc:
                    # This capture only (the store refused this delete): skip it, keep the others going.
                    report.left[capture.id] = str(exc)
                    log.warning("retention: capture %s left for the next sweep: %s", capture.id, exc)
                    continue
                removed.append(capture.id)
                report.objects.extend(deleted_keys)
            deleted = expired.delete(removed)
            if deleted != len(removed):  # cannot happen while the rows are locked; say so if it does
                log.warning(
                    "retention: %d of %d claimed captures were already gone",
                    len(removed) - deleted,
                    len(removed),
                )
        report.captures.extend(removed)
        return len(batch)

    def _delete_object(self, capture_id: str, key: str) -> bool:
        """Deletes one object (gone already is fine); False for a key that cannot name an object in the store."""
        try:
            self._store.delete(key)
            self._store.delete(context_key(key))  # the agent's network context, stored beside the pcap
        except ValueError as exc:
            # A key like "../x" is refused by every store, for uploads too, so no object can exist under it:
            # there is nothing to lose track of. Never delete outside the store for it.
            log.warning("retention: capture %s names an invalid object key, skipped: %s", capture_id, exc)
            return False
        return True
