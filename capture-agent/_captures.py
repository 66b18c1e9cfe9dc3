"""The captures on this node: each one resolved, captured, uploaded and reported, start to finish, within bounds.

A `CaptureJob` is the agent's record of one capture; the `CaptureManager` starts jobs within the node's limits,
stops them on request or at shutdown, and lets callers watch them change. The pcap is spooled on the node and
uploaded while it grows; a capture is COMPLETED, and downloadable, as soon as the object store confirmed the
upload. Its summary follows with its own state (PENDING until made): summaries run one at a time on the node, in
one low-priority thread whose tsharks (`Limits.summary_tsharks`) bound the memory they take however many captures
end together. Its network context (_context.py) is read once tcpdump listens and again once it ended, in
low-priority threads beside the upload, and stored next to the pcap before the capture is COMPLETED; it never
fails a capture and waits at most `_CONTEXT_S` for it. A job's spool directory outlives the agent: the next agent start recovers it and finishes the
upload, or only the summary.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from podcap.storage import ObjectStore, StoredObject, context_key

from ._confine import confined
from ._context import NetworkContext, Reading, Target, Tools, digest, read_context
from ._errors import (
    AgentError,
    CaptureError,
    HostNetworkPod,
    InvalidCaptureRequest,
    NodeLimitReached,
    PcapGone,
    UnknownCapture,
)
from ._exchanges import summarise_with_exchanges
from ._model import TERMINAL, CaptureSnapshot, CaptureSpec, JobState, Limits, Programs
from ._pcapfile import count_pcap_packets
from ._priority import CpuPacer, lower_this_thread
from ._resolve import Interface, Resolution, Resolver
from ._spool import Ended, Spool, SpoolEntry
from ._summary import Summary
from ._tcpdump import Tcpdump, TcpdumpStats, tcpdump_argv
from ._upload import GrowingFileUploader, RetryPolicy

log = logging.getLogger(__name__)

_POLL_S = 0.2
_NETNS_CHECK_S = 1.0
# How often a running capture's counts (packets, bytes, kernel drops) are refreshed for whoever watches it.
_PROGRESS_S = 1.0
# A live stream's reads of the spool file: as large as a gRPC message comfortably holds.
_STREAM_READ = 256 * 1024
# The most a capture's end waits for its network context (read and stored): tools have their own timeouts
# (_context.TOOL_TIMEOUT_S); this bounds the sum, so a stuck source costs the context, never the capture.
_CONTEXT_S = 15.0


@dataclass
class CaptureJob:
    snapshot: CaptureSnapshot
    spool: SpoolEntry
    tcpdump: Tcpdump | None = None
    stop_requested: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    context_start: asyncio.Future[Reading] | None = None  # the network context read once tcpdump listens

    def update(self, **changes: object) -> None:
        self.snapshot = replace(self.snapshot, **changes)  # type: ignore[arg-type]
        self.changed.set()
        self.changed = asyncio.Event()


class CaptureManager:
    """Owns every capture job of this agent."""

    def __init__(
        self,
        resolver: Resolver,
        store: ObjectStore,
        spool: Spool,
        programs: Programs | None = None,
        tcpdump_user: str = "",
        limits: Limits | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        """`programs`: the absolute paths to run (default: found on PATH now); `tcpdump_user`: the existing user
        tcpdump and tshark run as ("" keeps root's uid, still without root's capabilities)."""
        self._resolver = resolver
        self._store = store
        self._spool = spool
        self._programs = programs or Programs.find()
        # NAT rules and conntrack need CAP_NET_ADMIN (iptables' legacy backend a raw socket too); nothing more.
        launch = confined(self._programs.setpriv, tcpdump_user, ["net_admin", "net_raw"])
        self._tools = Tools(self._programs, tuple(launch))
        self._user = tcpdump_user
        self._limits = limits or Limits()
        self._retry = retry or RetryPolicy()
        self._jobs: dict[str, CaptureJob] = {}
        # Starts in progress, by capture id: set when each is over. Starts run side by side (resolution and
        # tcpdump's start take tens of ms each); only a repeat of the same id waits for the first.
        self._starting: dict[str, asyncio.Event] = {}
        # One thread, so one summary at a time node-wide; at low priority, which its tsharks inherit.
        self._summaries = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="summary", initializer=lower_this_thread
        )
        # Network context readings: two at a time (a capture's start and another's end), at low priority, which
        # the tools they run (conntrack, iptables-save) inherit.
        self._contexts = ThreadPoolExecutor(
            max_workers=2, thread_name_prefix="context", initializer=lower_this_thread
        )
        self._shutting_down = False

    def resolve(self, pod_ips: Sequence[str], pod_interface: str = "") -> Resolution:
        return self._resolver.resolve(pod_ips, pod_interface=pod_interface)

    def interfaces(self) -> list[Interface]:
        return self._resolver.list_interfaces()

    async def start(self, spec: CaptureSpec) -> CaptureSnapshot:
        """Resolves the pod and starts tcpdump; returns once it listens. Idempotent on the capture id.

        Many starts proceed at once; a repeat of an id being started waits for that start and answers as a repeat
        of a finished one does. The checks that admit a start (the id is free, the node has room, counting the
        starts in progress) and the claim on the id happen with no await between them, so nothing can slip in.

        All or nothing: if any step fails (or the caller is cancelled) once the spool entry exists, tcpdump is
        killed if it was started and the entry removed, so the same capture id can be started again.
        """
        spec = self._checked(spec)
        capture_id = spec.capture_id
        while (starting := self._starting.get(capture_id)) is not None:
            await starting.wait()
        if (job := self._jobs.get(capture_id)) is not None:
            return job.snapshot
        self._check_room()
        self._starting[capture_id] = done = asyncio.Event()
        try:
            job = await self._start_job(spec)
        finally:
            del self._starting[capture_id]
            done.set()
        return job.snapshot

    async def _start_job(self, spec: CaptureSpec) -> CaptureJob:
        """The start itself, once admitted: resolution, spool entry, tcpdump listening, the start record."""
        resolution, filter_expr = await asyncio.to_thread(self._resolve_target, spec)
        entry = self._spool.create(spec.capture_id)
        tcpdump: Tcpdump | None = None
        try:
            argv = tcpdump_argv(
                self._programs.tcpdump,
                resolution.interface,
                entry.pcap,
                spec.snaplen,
                filter_expr,
                self._user,
                max_packets=spec.max_packets,
                setpriv=self._programs.setpriv,
                buffer_kib=spec.buffer_size // 1024,
            )
            tcpdump = await Tcpdump.start(argv)
            snapshot = CaptureSnapshot(
                spec=spec, state=JobState.RUNNING, resolution=resolution, started_at=datetime.now(UTC)
            )
            await asyncio.to_thread(
                entry.record_started,
                {
                    "spec": asdict(spec),
                    "resolution": asdict(resolution),
                    "started_at": snapshot.started_at,
                    "tcpdump_pid": tcpdump.pid,
                    "argv": argv,
                },
            )
        except BaseException:
            await _undo_start(spec.capture_id, entry, tcpdump)
            raise
        job = CaptureJob(snapshot=snapshot, spool=entry, tcpdump=tcpdump)
        # Read while StartCapture answers: it never waits for the context.
        job.context_start = self._read_context(Target.of(resolution, spec.pod_ips), full=False)
        self._jobs[spec.capture_id] = job
        job.task = asyncio.create_task(self._run(job), name=f"capture-{spec.capture_id}")
        log.info("capture %s: tcpdump listening on %s", spec.capture_id, resolution.interface)
        return job

    def _resolve_target(self, spec: CaptureSpec) -> tuple[Resolution, str]:
        """The device to listen on and the filter to give tcpdump (narrowed to the pod for hostNetwork pods)."""
        try:
            return self._resolver.resolve(spec.pod_ips, pod_interface=spec.pod_interface), spec.filter
        except HostNetworkPod as exc:
            if not spec.host_network:
                raise
            host = f"host {exc.ip}"
            narrowed = f"{host} and ({spec.filter})" if spec.filter.strip() else host
            resolution = Resolution(
                interface=exc.interface,
                ifindex=0,
                strategy="host-network (node interface, filtered to the pod IP)",
                netns="",
                pod_interface=exc.interface,
                pod_ifindex=0,
                pod_mac="",
                pod_ip=exc.ip,
            )
            return resolution, narrowed

    def _checked(self, spec: CaptureSpec) -> CaptureSpec:
        limits = self._limits
        if not spec.capture_id or "/" in spec.capture_id or spec.capture_id.startswith("."):
            raise InvalidCaptureRequest("capture_id must be a plain non-empty name")
        if not 0 < spec.duration_s <= limits.max_duration_s:
            raise InvalidCaptureRequest(
                f"duration must be above 0 s and at most {limits.max_duration_s:g} s on this node"
            )
        if spec.max_packets < 0 or spec.max_bytes < 0:
            raise InvalidCaptureRequest("max_packets and max_bytes may not be negative")
        if not 0 <= spec.snaplen <= limits.max_snaplen:
            raise InvalidCaptureRequest(f"snaplen must be between 0 and {limits.max_snaplen}")
        if not (0 <= spec.buffer_size <= limits.max_buffer_size and spec.buffer_size % 1024 == 0):
            raise InvalidCaptureRequest(
                f"the capture buffer must be a whole number of KiB up to {limits.max_buffer_size >> 20} MiB on "
                f"this node (0 for the default, {limits.default_buffer_size >> 20} MiB)"
            )
        if not spec.object_key:
            raise InvalidCaptureRequest("object_key is required")
        return replace(
            spec,
            snaplen=spec.snaplen or limits.default_snaplen,
            buffer_size=spec.buffer_size or limits.default_buffer_size,
        )

    def _check_room(self) -> None:
        """RESOURCE_EXHAUSTED, with the numbers, when this node may not take another capture now."""
        limits = self._limits
        running = sum(1 for job in self._jobs.values() if job.snapshot.state == JobState.RUNNING)
        running += len(self._starting)  # each start in progress is about to run
        if running >= limits.max_concurrent:
            raise NodeLimitReached(
                f"this node already runs {running} captures (at most {limits.max_concurrent})"
            )
        spooled = self._spool.total_bytes()
        if spooled >= limits.max_spool_bytes:
            raise NodeLimitReached(
                f"the spool holds {spooled} bytes not yet uploaded (at most {limits.max_spool_bytes})"
            )
        free = self._spool.free_bytes()
        if free < limits.min_free_bytes:
            raise NodeLimitReached(
                f"only {free} bytes free on the spool's disk (captures need at least {limits.min_free_bytes})"
            )

    async def _run(self, job: CaptureJob) -> None:
        spec = job.snapshot.spec
        context: asyncio.Task[NetworkContext | None] | None = None
        writer_done = asyncio.Event()
        uploader = GrowingFileUploader(
            self._store,
            spec.object_key,
            job.spool.pcap,
            retry=self._retry,
            on_retry=self._on_retry(job),
            pacer=CpuPacer(),
        )
        upload: asyncio.Task[StoredObject] = asyncio.create_task(
            uploader.run(writer_done), name=f"upload-{spec.capture_id}"
        )
        try:
            problem = await self._capture_until_done(job)
            stats, failure = await self._finish_tcpdump(job)
            context = asyncio.create_task(self._record_context(job), name=f"context-{spec.capture_id}")
            failure = problem or failure
            ended = datetime.now(UTC)
            interruption = _cut_short(job, ended, "the agent shut down") if self._shutting_down else ""
            record = Ended(
                **asdict(stats), ended_at=ended.isoformat(), error=failure, interruption=interruption
            )
            await asyncio.to_thread(job.spool.record_ended, record)
            job.update(state=JobState.UPLOADING, stats=stats, ended_at=ended, interruption=interruption)
            writer_done.set()
            await self._finish_upload(job, upload, failure, context)
        except asyncio.CancelledError:
            if context is not None:
                context.cancel()
            upload.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await upload
            if job.tcpdump is not None:
                await job.tcpdump.kill()
            raise
        except Exception as exc:
            if context is not None:
                context.cancel()
            upload.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await upload
            if job.tcpdump is not None:
                await job.tcpdump.kill()
            log.exception("capture %s failed", spec.capture_id)
            message = str(exc) if isinstance(exc, AgentError) else f"{type(exc).__name__}: {exc}"
            job.update(
                state=JobState.FAILED, error=message, ended_at=job.snapshot.ended_at or datetime.now(UTC)
            )

    async def _finish_upload(
        self,
        job: CaptureJob,
        upload: asyncio.Task[StoredObject],
        failure: str,
        context: asyncio.Task[NetworkContext | None] | None = None,
    ) -> None:
        """Waits for the confirmed upload (and the network context, read meanwhile): then the capture is done and
        downloadable, and its summary follows."""
        stored = await upload
        await asyncio.to_thread(job.spool.record_stored, stored)  # a restart now only has the summary to make
        network = await context if context is not None else None
        state = JobState.FAILED if failure else JobState.COMPLETED
        job.update(
            state=state,
            size=stored.size,
            sha256=stored.sha256,
            error=failure,
            summary=Summary(pending=True),
            context=network,
        )
        log.info(
            "capture %s: %s, %d bytes stored at %s",
            job.snapshot.spec.capture_id,
            state,
            stored.size,
            stored.key,
        )
        await self._finish_summary(job)

    async def _finish_summary(self, job: CaptureJob) -> None:
        """Summarises the stored pcap, then frees its spool; at shutdown the spool keeps it for the next start."""
        if self._shutting_down:
            return
        summary = await self._summarise(job.spool.pcap)
        await asyncio.to_thread(job.spool.remove)
        job.update(summary=summary)

    async def _summarise(self, pcap: Path) -> Summary:
        """What is inside the pcap; a summary that cannot be made never costs the capture."""
        cancel = threading.Event()
        work = functools.partial(
            summarise_with_exchanges,
            pcap,
            cancel=cancel,
            workers=self._limits.summary_tsharks,
            user=self._user,
            tshark=self._programs.tshark,
            setpriv=self._programs.setpriv,
        )
        try:
            return await asyncio.get_running_loop().run_in_executor(self._summaries, work)
        except asyncio.CancelledError:
            cancel.set()  # the worker thread cannot be cancelled, but its tsharks can
            raise
        except Exception as exc:  # a missing file after a crash, say: the pcap itself is what matters
            log.warning("cannot summarise %s: %s", pcap, exc)
            return Summary(error=f"no summary: {exc}")

    def _read_context(self, target: Target, *, full: bool) -> asyncio.Future[Reading]:
        work = functools.partial(read_context, target, self._tools, full=full)
        return asyncio.get_running_loop().run_in_executor(self._contexts, work)

    async def _record_context(self, job: CaptureJob) -> NetworkContext | None:
        """The capture's network context, read at its end and stored as JSON next to the pcap, or None when it
        cannot be had within _CONTEXT_S (logged: the capture itself is what matters)."""
        snapshot = job.snapshot
        spec = snapshot.spec
        key = context_key(spec.object_key)
        try:
            async with asyncio.timeout(_CONTEXT_S):
                start = None
                if job.context_start is not None:
                    with contextlib.suppress(Exception):  # read_context raises for nothing it reads; be sure
                        start = await job.context_start
                end = await self._read_context(Target.of(snapshot.resolution, spec.pod_ips), full=True)
                network, record = digest(spec.object_key, start, end)
                record["capture_id"] = spec.capture_id
                data = json.dumps(record, indent=1).encode()
                await asyncio.to_thread(_put, self._store, key, data)
                return network
        except Exception as exc:  # TimeoutError included
            log.warning("capture %s: no network context: %s", spec.capture_id, exc or type(exc).__name__)
            return None

    def _on_retry(self, job: CaptureJob) -> Callable[[int, Exception, float], None]:
        def report(attempt: int, exc: Exception, delay: float) -> None:
            log.warning(
                "capture %s: upload attempt %d failed (%s); retrying in %.1fs",
                job.snapshot.spec.capture_id,
                attempt,
                exc,
                delay,
            )
            job.update(error=f"upload attempt {attempt} failed ({exc}); retrying in {delay:.1f}s")

        return report

    async def _capture_until_done(self, job: CaptureJob) -> str:
        """Waits for the duration, a stop, tcpdump's own end (-c), a byte limit or a vanished pod, then stops
        tcpdump. Returns why the capture cannot be COMPLETED, or ""."""
        assert job.tcpdump is not None
        spec = job.snapshot.spec
        loop = asyncio.get_running_loop()
        deadline = loop.time() + spec.duration_s
        next_netns_check = loop.time() + _NETNS_CHECK_S
        next_progress = loop.time()
        exited = asyncio.create_task(job.tcpdump.exited())
        stopped = asyncio.create_task(job.stop_requested.wait())
        problem = ""
        try:
            while not (exited.done() or stopped.done()):
                now = loop.time()
                if now >= deadline or _over(job.spool.pcap, spec.max_bytes):
                    break
                if self._spool.total_bytes() >= self._limits.max_spool_bytes:
                    problem = f"the node's spool limit of {self._limits.max_spool_bytes} bytes was reached"
                    break
                if job.snapshot.resolution.netns and now >= next_netns_check:
                    next_netns_check = now + _NETNS_CHECK_S
                    if not await asyncio.to_thread(self._resolver.netns_alive, job.snapshot.resolution):
                        problem = "the pod's network namespace vanished during the capture (pod deleted?)"
                        break
                self._show_progress(job)
                if now >= next_progress:
                    next_progress = now + _PROGRESS_S
                    job.tcpdump.ask_for_counts()
                await asyncio.wait(
                    {exited, stopped},
                    timeout=min(deadline - now, _POLL_S),
                    return_when=asyncio.FIRST_COMPLETED,
                )
        finally:
            exited.cancel()
            stopped.cancel()
        await job.tcpdump.stop()  # after a buffer timeout: what arrived before the stop is in the pcap
        return problem

    @staticmethod
    def _show_progress(job: CaptureJob) -> None:
        """Publishes the counts tcpdump last gave (asked for every _PROGRESS_S), and the pcap's size, if they
        changed: a watcher of a running capture sees them within a poll of tcpdump's answer."""
        assert job.tcpdump is not None
        counts = job.tcpdump.running_stats
        if counts is None:
            return
        try:
            size = job.spool.pcap.stat().st_size
        except FileNotFoundError:
            size = 0
        if counts != job.snapshot.stats:  # changes once per ask at most: no flood of reports
            job.update(stats=counts, size=size)

    async def _finish_tcpdump(self, job: CaptureJob) -> tuple[TcpdumpStats, str]:
        """tcpdump's statistics, and why it failed if it did (its pcap so far is kept and uploaded all the same)."""
        assert job.tcpdump is not None
        try:
            return await job.tcpdump.wait(), ""
        except CaptureError as exc:
            stats = job.tcpdump.stats()
            if job.snapshot.resolution.netns and not await asyncio.to_thread(
                self._resolver.netns_alive, job.snapshot.resolution
            ):
                return stats, f"the pod's network namespace vanished during the capture ({exc})"
            return stats, str(exc)

    async def recover(self) -> None:
        """Finishes what an earlier agent left in the spool: leftover tcpdumps are ended, pcaps uploaded."""
        for entry in self._spool.entries():
            try:
                record = entry.started()
            except (FileNotFoundError, ValueError) as exc:
                log.warning("spool %s has no readable record (%s); removing it", entry.directory, exc)
                entry.remove()
                continue
            spec = CaptureSpec.from_record(record["spec"])
            resolution = Resolution(**record["resolution"])
            _end_leftover(record.get("tcpdump_pid"), entry.pcap)
            ended = entry.ended()
            started_at = datetime.fromisoformat(record["started_at"])
            if ended is None:
                ended = await asyncio.to_thread(_ended_with_the_agent, spec, entry, started_at)
                entry.record_ended(ended)
                log.warning("capture %s: %s", spec.capture_id, ended.interruption)
            stats = TcpdumpStats(ended.packets, ended.packets_received, ended.kernel_drops, ended.drops_known)
            snapshot = CaptureSnapshot(
                spec=spec,
                state=JobState.UPLOADING,
                resolution=resolution,
                stats=stats,
                started_at=started_at,
                ended_at=datetime.fromisoformat(ended.ended_at),
                interruption=ended.interruption,
            )
            job = CaptureJob(snapshot=snapshot, spool=entry)
            self._jobs[spec.capture_id] = job
            if (stored := entry.stored()) is not None:
                job.snapshot = replace(
                    snapshot,
                    state=JobState.FAILED if ended.error else JobState.COMPLETED,
                    size=stored.size,
                    sha256=stored.sha256,
                    error=ended.error,
                    summary=Summary(pending=True),
                )
                job.task = asyncio.create_task(self._finish_summary(job), name=f"summary-{spec.capture_id}")
                log.info("capture %s: recovered from the spool, stored already, summarising", spec.capture_id)
                continue
            job.task = asyncio.create_task(
                self._recover_upload(job, ended.error), name=f"recover-{spec.capture_id}"
            )
            log.info("capture %s: recovered from the spool, uploading", spec.capture_id)

    async def _recover_upload(self, job: CaptureJob, failure: str) -> None:
        spec = job.snapshot.spec
        done = asyncio.Event()
        done.set()
        uploader = GrowingFileUploader(
            self._store, spec.object_key, job.spool.pcap, retry=self._retry, on_retry=self._on_retry(job)
        )
        task = asyncio.create_task(uploader.run(done), name=f"upload-{spec.capture_id}")
        try:
            await self._finish_upload(job, task, failure)
        except asyncio.CancelledError:
            task.cancel()
            raise
        except Exception as exc:
            log.exception("capture %s: recovery failed", job.snapshot.spec.capture_id)
            job.update(state=JobState.FAILED, error=f"recovering the spooled pcap failed: {exc}")

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
        """The snapshot now and after each change, ending once it is settled (terminal, and summarised)."""
        job = self._job(capture_id)
        while True:
            changed = job.changed
            snapshot = job.snapshot
            yield snapshot
            if snapshot.settled or (self._shutting_down and snapshot.state in TERMINAL):
                return  # at shutdown a summary still to make is left to the next start
            await changed.wait()

    async def stream(self, capture_id: str) -> AsyncIterator[bytes]:
        """The capture's pcap as tcpdump writes it, from its file header on, ending once tcpdump has ended and
        everything it wrote was sent.

        Read from the spool file at the reader's pace (a gRPC stream waits for a slow reader), so tcpdump, which
        writes to the file, never waits for a reader and nothing is held in memory. The file stays readable
        through its open descriptor after the spool removes it; a stream opened after that raises PcapGone.
        """
        job = self._job(capture_id)
        source = None
        try:
            while True:
                changed = job.changed
                writing = job.snapshot.state == JobState.RUNNING
                if source is None:
                    try:
                        source = await asyncio.to_thread(job.spool.pcap.open, "rb", buffering=0)
                    except FileNotFoundError:
                        if not writing:
                            raise PcapGone(
                                f"capture {capture_id!r} is no longer on this node: download it instead"
                            ) from None
                if source is not None:
                    while chunk := await asyncio.to_thread(source.read, _STREAM_READ):
                        yield chunk
                if not writing:
                    return  # read after tcpdump ended: that was the whole pcap
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), timeout=_POLL_S)
        finally:
            if source is not None:
                source.close()

    async def shutdown(self, grace_s: float) -> None:
        """Stops every capture and gives uploads `grace_s` to finish; what is left stays in the spool.

        Summaries are not waited for: a stored pcap's summary is made by the next start, from the spool."""
        self._shutting_down = True
        for job in self._jobs.values():
            job.stop_requested.set()
        tasks = [job.task for job in self._jobs.values() if job.task is not None and not job.task.done()]
        summarising = [job.task for job in self._jobs.values() if job.snapshot.state in TERMINAL and job.task]
        for task in summarising:
            task.cancel()
        self._summaries.shutdown(wait=False, cancel_futures=True)
        for job in self._jobs.values():
            job.update()  # wakes watchers of stored captures, whose summaries now wait for the next start
        if not tasks:
            self._contexts.shutdown(wait=False, cancel_futures=True)
            return
        # The captures being stopped still read their context (bounded by _CONTEXT_S) within the grace.
        _, pending = await asyncio.wait(tasks, timeout=grace_s)
        self._contexts.shutdown(wait=False, cancel_futures=True)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if pending:
            log.warning(
                "%d uploads unfinished at shutdown; the next start uploads them from the spool", len(pending)
            )


def _put(store: ObjectStore, key: str, data: bytes) -> None:
    upload = store.open_upload(key)
    try:
        upload.write(data)
        upload.complete()
    except BaseException:
        upload.abort()
        raise


def _cut_short(job: CaptureJob, ended: datetime, why: str) -> str:
    """What a person needs to know about a capture that ended before its time, or "" if it ran its course."""
    spec, started = job.snapshot.spec, job.snapshot.started_at
    if started is None:
        return ""
    ran = (ended - started).total_seconds()
    if ran >= spec.duration_s:
        return ""
    return f"cut short: {why} {ran:.1f} s into this {spec.duration_s:g} s capture; the pcap covers {_span(started, ended)}"


def _ended_with_the_agent(spec: CaptureSpec, entry: SpoolEntry, started: datetime) -> Ended:
    """A capture whose tcpdump ended with an earlier agent (killed or crashed): its packets are counted from the
    pcap, its end is the pcap's last write, and the kernel's drop count, which only tcpdump knew, is unknown."""
    try:
        packets = count_pcap_packets(entry.pcap)
        last_write = datetime.fromtimestamp(entry.pcap.stat().st_mtime, UTC)
    except (OSError, ValueError) as exc:
        log.warning("capture %s: cannot read the spooled pcap: %s", spec.capture_id, exc)
        packets, last_write = 0, datetime.now(UTC)
    ended = max(last_write, started)
    ran = (ended - started).total_seconds()
    interruption = (
        f"cut short: the agent stopped (killed or crashed) about {ran:.1f} s into this {spec.duration_s:g} s "
        f"capture, and tcpdump with it; the pcap covers {_span(started, ended)}; kernel drops unknown "
        "(tcpdump's statistics ended with it)"
    )
    return Ended(packets, packets, 0, ended.isoformat(), drops_known=False, interruption=interruption)


def _span(start: datetime, end: datetime) -> str:
    return f"{start:%Y-%m-%d %H:%M:%S} to {end:%H:%M:%S} UTC"


async def _undo_start(capture_id: str, entry: SpoolEntry, tcpdump: Tcpdump | None) -> None:
    """Undoes a start that failed half-way. Whatever fails here is logged, never raised: the caller re-raises
    the error that made the start fail, and that is the one to report."""
    if tcpdump is not None:
        try:
            await tcpdump.kill()
        except Exception:
            log.exception("capture %s: cannot end the tcpdump of a failed start", capture_id)
    await asyncio.to_thread(entry.remove)


def _over(path: Path, max_bytes: int) -> bool:
    if not max_bytes:
        return False
    with contextlib.suppress(FileNotFoundError):
        return path.stat().st_size >= max_bytes
    return False


def _end_leftover(pid: object, pcap: Path) -> None:
    """Kills a tcpdump that outlived its agent, but only if that pid still is our tcpdump writing this pcap."""
    if not isinstance(pid, int) or pid <= 0:
        return
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return
    if str(pcap).encode() in cmdline:
        log.warning("ending tcpdump %d left behind by an earlier agent", pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
