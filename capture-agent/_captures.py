"""The captures running on this node: each one resolved, captured, uploaded and reported, start to finish.

A `CaptureJob` is the agent's record of one capture; the `CaptureManager` starts jobs, stops them on request or at
shutdown and lets callers watch them change. The pcap is spooled on the node and uploaded once tcpdump has
exited; a capture is COMPLETED only after the object store confirmed the upload.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import pwd
import shutil
import stat
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from podcap.storage import ObjectStore

from ._errors import AgentError, InvalidCaptureRequest, UnknownCapture
from ._resolve import Interface, Resolution, Resolver
from ._tcpdump import Tcpdump, TcpdumpStats, tcpdump_argv

log = logging.getLogger(__name__)

_SIZE_POLL_S = 0.2


class JobState(enum.StrEnum):
    RUNNING = "RUNNING"
    UPLOADING = "UPLOADING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


TERMINAL = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED})


@dataclass(frozen=True)
class CaptureSpec:
    """What the controller asked for."""

    capture_id: str
    pod_ips: Sequence[str]
    filter: str
    duration_s: float
    object_key: str
    max_packets: int = 0
    max_bytes: int = 0
    snaplen: int = 0


@dataclass(frozen=True)
class CaptureSnapshot:
    """A job as it stands, for the API."""

    spec: CaptureSpec
    state: JobState
    resolution: Resolution
    stats: TcpdumpStats = field(default_factory=TcpdumpStats)
    size: int = 0
    sha256: str = ""
    error: str = ""
    started_at: datetime | None = None
    ended_at: datetime | None = None


@dataclass
class CaptureJob:
    snapshot: CaptureSnapshot
    tcpdump: Tcpdump
    spool_file: Path
    stop_requested: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    def update(self, **changes: object) -> None:
        self.snapshot = replace(self.snapshot, **changes)  # type: ignore[arg-type]
        self.changed.set()
        self.changed = asyncio.Event()


@dataclass(frozen=True)
class Limits:
    """This node's bounds on what a capture may ask for."""

    max_duration_s: float = 3600.0
    default_snaplen: int = 262144
    max_snaplen: int = 262144


class CaptureManager:
    """Owns every capture job of this agent."""

    def __init__(
        self,
        resolver: Resolver,
        store: ObjectStore,
        spool_dir: Path,
        tcpdump: str = "tcpdump",
        tcpdump_user: str = "",
        limits: Limits = Limits(),
    ) -> None:
        self._resolver = resolver
        self._store = store
        self._spool_dir = spool_dir
        self._tcpdump = tcpdump
        self._user = _existing_user(tcpdump_user)
        self._spool_dir.mkdir(parents=True, exist_ok=True)
        if self._user:
            _check_reachable(self._spool_dir, self._user)
        self._limits = limits
        self._jobs: dict[str, CaptureJob] = {}
        self._starting: dict[str, asyncio.Lock] = {}

    def resolve(self, pod_ips: Sequence[str]) -> Resolution:
        return self._resolver.resolve(pod_ips)

    def interfaces(self) -> list[Interface]:
        return self._resolver.list_interfaces()

    async def start(self, spec: CaptureSpec) -> CaptureSnapshot:
        """Resolves the pod and starts tcpdump; returns once it listens. Idempotent on the capture id."""
        spec = self._checked(spec)
        lock = self._starting.setdefault(spec.capture_id, asyncio.Lock())
        async with lock:
            if (job := self._jobs.get(spec.capture_id)) is not None:
                return job.snapshot
            resolution = await asyncio.to_thread(self._resolver.resolve, spec.pod_ips)
            spool_file = self._prepare_spool(spec.capture_id)
            argv = tcpdump_argv(
                self._tcpdump, resolution.interface, spool_file, spec.snaplen, spec.filter, self._user
            )
            if spec.max_packets:
                argv[1:1] = ["-c", str(spec.max_packets)]
            try:
                tcpdump = await Tcpdump.start(argv)
            except AgentError:
                shutil.rmtree(spool_file.parent, ignore_errors=True)
                raise
            snapshot = CaptureSnapshot(
                spec=spec, state=JobState.RUNNING, resolution=resolution, started_at=datetime.now(UTC)
            )
            job = CaptureJob(snapshot=snapshot, tcpdump=tcpdump, spool_file=spool_file)
            self._jobs[spec.capture_id] = job
            job.task = asyncio.create_task(self._run(job), name=f"capture-{spec.capture_id}")
            log.info("capture %s: tcpdump listening on %s", spec.capture_id, resolution.interface)
            return job.snapshot

    def _checked(self, spec: CaptureSpec) -> CaptureSpec:
        if not spec.capture_id or "/" in spec.capture_id or spec.capture_id.startswith("."):
            raise InvalidCaptureRequest("capture_id must be a plain non-empty name")
        if not 0 < spec.duration_s <= self._limits.max_duration_s:
            raise InvalidCaptureRequest(
                f"duration must be above 0 s and at most {self._limits.max_duration_s:g} s on this node"
            )
        if spec.max_packets < 0 or spec.max_bytes < 0:
            raise InvalidCaptureRequest("max_packets and max_bytes may not be negative")
        if not 0 <= spec.snaplen <= self._limits.max_snaplen:
            raise InvalidCaptureRequest(f"snaplen must be between 0 and {self._limits.max_snaplen}")
        if not spec.object_key:
            raise InvalidCaptureRequest("object_key is required")
        return replace(spec, snaplen=spec.snaplen or self._limits.default_snaplen)

    def _prepare_spool(self, capture_id: str) -> Path:
        directory = self._spool_dir / capture_id
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self._user:
            # tcpdump -Z drops root after opening the device; it must still be able to write its pcap.
            entry = pwd.getpwnam(self._user)
            os.chown(directory, entry.pw_uid, entry.pw_gid)
        return directory / "capture.pcap"

    async def _run(self, job: CaptureJob) -> None:
        spec = job.snapshot.spec
        try:
            await self._capture_until_done(job)
            stats = await job.tcpdump.wait()
            job.update(state=JobState.UPLOADING, stats=stats, ended_at=datetime.now(UTC))
            stored = await asyncio.to_thread(self._store.upload_file, spec.object_key, job.spool_file)
            job.update(state=JobState.COMPLETED, size=stored.size, sha256=stored.sha256)
            shutil.rmtree(job.spool_file.parent, ignore_errors=True)
            log.info("capture %s: uploaded %d bytes to %s", spec.capture_id, stored.size, spec.object_key)
        except asyncio.CancelledError:
            await job.tcpdump.kill()
            job.update(state=JobState.CANCELLED, error="the agent shut down", ended_at=datetime.now(UTC))
            raise
        except Exception as exc:
            await job.tcpdump.kill()
            log.exception("capture %s failed", spec.capture_id)
            message = str(exc) if isinstance(exc, AgentError) else f"{type(exc).__name__}: {exc}"
            job.update(
                state=JobState.FAILED, error=message, ended_at=job.snapshot.ended_at or datetime.now(UTC)
            )

    async def _capture_until_done(self, job: CaptureJob) -> None:
        """Waits for the duration, an explicit stop, tcpdump's own end (-c) or the byte limit, then stops it."""
        spec = job.snapshot.spec
        loop = asyncio.get_running_loop()
        deadline = loop.time() + spec.duration_s
        exited = asyncio.create_task(job.tcpdump.exited())
        stopped = asyncio.create_task(job.stop_requested.wait())
        try:
            while not (exited.done() or stopped.done()):
                remaining = deadline - loop.time()
                if remaining <= 0 or _over(job.spool_file, spec.max_bytes):
                    break
                timeout = min(remaining, _SIZE_POLL_S) if spec.max_bytes else remaining
                await asyncio.wait({exited, stopped}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
            stopped.cancel()
        await job.tcpdump.stop()

    def _job(self, capture_id: str) -> CaptureJob:
        try:
            return self._jobs[capture_id]
        except KeyError:
            raise UnknownCapture(f"no capture {capture_id!r} on this node") from None

    def get(self, capture_id: str) -> CaptureSnapshot:
        return self._job(capture_id).snapshot

    def all(self) -> list[CaptureSnapshot]:
        return [job.snapshot for job in self._jobs.values()]

    async def stop(self, capture_id: str) -> CaptureSnapshot:
        job = self._job(capture_id)
        job.stop_requested.set()
        return job.snapshot

    async def watch(self, capture_id: str) -> AsyncIterator[CaptureSnapshot]:
        """The snapshot now and after each change, ending with the terminal one."""
        job = self._job(capture_id)
        while True:
            changed = job.changed
            snapshot = job.snapshot
            yield snapshot
            if snapshot.state in TERMINAL:
                return
            await changed.wait()

    async def shutdown(self) -> None:
        """Stops every running capture and lets it finish its upload, so nothing captured is lost."""
        for job in self._jobs.values():
            job.stop_requested.set()
        tasks = [job.task for job in self._jobs.values() if job.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


def _over(path: Path, max_bytes: int) -> bool:
    if not max_bytes:
        return False
    with contextlib.suppress(FileNotFoundError):
        return path.stat().st_size >= max_bytes
    return False


def _check_reachable(directory: Path, user: str) -> None:
    """tcpdump drops to `user` before it creates its file: every parent of the spool must be searchable by it."""
    entry = pwd.getpwnam(user)
    for path in (directory.resolve(), *directory.resolve().parents):
        st = path.stat()
        if st.st_uid == entry.pw_uid:
            bit = stat.S_IXUSR
        elif st.st_gid == entry.pw_gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            raise AgentError(
                f"tcpdump runs as {user!r} but cannot reach the spool directory {directory}: {path} is not "
                f"searchable by it (chmod o+x {path}, or choose another --spool-dir)"
            )


def _existing_user(name: str) -> str:
    if not name:
        return ""
    try:
        pwd.getpwnam(name)
    except KeyError:
        log.warning("user %r does not exist; tcpdump keeps the agent's privileges", name)
        return ""
    return name
