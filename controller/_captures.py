"""The capture use cases: create, follow, stop, read and download captures, and the one state machine they share.

PENDING -> RUNNING -> UPLOADING -> COMPLETED | FAILED | CANCELLED, per target (one pod) and rolled up per capture.
Every transition is written before it is acted on: the row exists (PENDING) before the agent is asked to start,
and a terminal state is never left. After the agent has started, a follower task mirrors the agent's reports
into SQL; at start-up the controller follows again every capture that was not terminal, so a restart loses none.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import re
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from google.protobuf import json_format
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, object_session, sessionmaker

from podcap.api.v1 import agent_pb2, common_pb2
from podcap.storage import (
    TERMINAL_STATES,
    CaptureRepository,
    CaptureRow,
    CaptureState,
    Claim,
    EventRow,
    ObjectStore,
    TargetLeases,
    TargetRow,
    context_key,
)

from . import _quotas
from ._access import AccessControl, Action, Audited, Caller, denial
from ._agents import AgentCapture, AgentClients, AgentRefused, CaptureUnknownToAgent
from ._errors import (
    CaptureNotFound,
    ControllerError,
    InvalidRequest,
    LimitExceeded,
    NotFound,
    Unavailable,
    WrongState,
)
from ._inventory import Inventory, Pod
from ._pods import capturable_pods
from ._validation import CaptureEnd, CaptureLimitsCaps, CaptureRequest, validate
from ._verdicts import End, verdicts

log = logging.getLogger(__name__)

T = TypeVar("T")

_AGENT_STATES = {
    common_pb2.CAPTURE_STATE_RUNNING: CaptureState.RUNNING,
    common_pb2.CAPTURE_STATE_UPLOADING: CaptureState.UPLOADING,
    common_pb2.CAPTURE_STATE_COMPLETED: CaptureState.COMPLETED,
    common_pb2.CAPTURE_STATE_FAILED: CaptureState.FAILED,
    common_pb2.CAPTURE_STATE_CANCELLED: CaptureState.CANCELLED,
}
_ORDER = [CaptureState.PENDING, CaptureState.RUNNING, CaptureState.UPLOADING]
_WATCH_POLL_S = 1.0
# A target FAILED for a lost agent is still followed, slowly, this long after: an agent that comes back uploads the
# pcap from its spool, and nothing a node captured may be lost track of.
_LATE_RESULT_WINDOW = timedelta(days=1)
_LOST_AGENT_RETRY_S = 30.0
_CAPTURE_ID = re.compile(r"[0-9a-f]{32}")
# What a person may paste instead of a whole id, as with git: a unique prefix.
_CAPTURE_ID_PREFIX = re.compile(r"[0-9a-f]{4,31}")


def roll_up(states: list[CaptureState]) -> CaptureState:
    """A capture's state from its targets': the least advanced while any runs, else the worst outcome."""
    running = [s for s in states if s not in TERMINAL_STATES]
    if running:
        return min(running, key=_ORDER.index)
    for outcome in (CaptureState.FAILED, CaptureState.CANCELLED):
        if outcome in states:
            return outcome
    return CaptureState.COMPLETED


@dataclass(frozen=True)
class Download:
    url: str
    expires_at: datetime
    filename: str


@dataclass(frozen=True)
class Page:
    captures: list[CaptureRow]
    next_token: str


@dataclass(frozen=True)
class CaptureSettings:
    caps: CaptureLimitsCaps = field(default_factory=CaptureLimitsCaps)
    download_url_ttl: timedelta = timedelta(minutes=5)
    # Each replica follows the targets it holds a lease on; a dead replica's leases expire and others take over.
    replica_id: str = field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    )
    lease_ttl: timedelta = timedelta(seconds=15)
    agent_lost_after: timedelta = timedelta(seconds=60)
    quotas: _quotas.Quotas = field(default_factory=_quotas.Quotas)


class _Changes:
    """Wakes the watchers of a capture when this replica changes it (other replicas' changes are polled)."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}

    def event(self, capture_id: str) -> asyncio.Event:
        return self._events.setdefault(capture_id, asyncio.Event())

    def notify(self, capture_id: str) -> None:
        if (event := self._events.pop(capture_id, None)) is not None:
            event.set()


class Captures:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        inventory: Inventory,
        agents: AgentClients,
        store: ObjectStore,
        access: AccessControl,
        settings: CaptureSettings = CaptureSettings(),
    ) -> None:
        self._sessions = sessions
        self._access = access
        self._inventory = inventory
        self._agents = agents
        self._store = store
        self._settings = settings
        self._changes = _Changes()
        self._following: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._reconciler: asyncio.Task[None] | None = None

    async def _tx(self, work: Callable[[CaptureRepository], T]) -> T:
        """Runs `work` in one transaction, in a worker thread (the DB driver blocks)."""

        def run() -> T:
            with self._sessions.begin() as session:
                return work(CaptureRepository(session))

        return await asyncio.to_thread(run)

    async def create(self, request: CaptureRequest, caller: Caller) -> CaptureRow:
        """Validates, authorises, applies the quotas and audits; then writes the capture PENDING and starts it."""
        # In a worker thread: libpcap's compile can take seconds (a long filter, a `host NAME` lookup).
        request = await asyncio.to_thread(validate, request, self._settings.caps)
        requester = caller.principal.name
        # A between capture needs CAPTURE in every end's namespace; the denial names the first one refused.
        ends = list(dict.fromkeys(end.namespace for end in request.between)) or [request.namespace]
        refused = await self._access.refused(caller, Action.CAPTURE, ends)
        if refused is not None:
            await self._audit_create(caller, request, "denied", namespace=refused)
            raise denial(caller, Action.CAPTURE, refused)
        if request.request_id:
            existing = await self._tx(lambda repo: repo.find_by_request(requester, request.request_id))
            if existing is not None:
                existing = _same_request(existing, request)
                await self._audit_create(caller, request, "allowed", existing.id, "a retry, same capture")
                return existing
        pods = await self._target_pods(request)
        quotas, now = self._settings.quotas, datetime.now(UTC)
        if quotas.enabled:
            try:
                request = await self._tx(
                    lambda repo: _quotas.apply(quotas, repo, requester, request, len(pods), now)
                )
            except LimitExceeded as exc:
                await self._audit_create(caller, request, "denied", note=str(exc))
                raise
        nodes = sorted({pod.node for pod in pods})
        addresses = dict(
            zip(
                nodes,
                await asyncio.gather(*(asyncio.to_thread(self._inventory.agent_address, n) for n in nodes)),
                strict=True,
            )
        )
        capture_id = uuid.uuid4().hex
        await self._audit_create(caller, request, "allowed", capture_id)
        row = _new_row(capture_id, request, requester, pods, addresses)
        for target in row.targets:
            target.lease_owner = self._settings.replica_id
            target.lease_expires_at = row.created_at + self._settings.lease_ttl

        def insert(session: Session) -> None:
            repo = CaptureRepository(session)
            if quotas.enabled:
                # Again, under a lock: concurrent requests must not pass together a quota that each passed alone.
                repo.lock_quotas(f"user:{requester}", f"namespace:{request.namespace}")
                _quotas.apply(quotas, repo, requester, request, len(pods), now)
            session.add(row)
            session.flush()  # the capture row before the history rows that refer to it
            for target in [None, *row.targets]:
                _event(row, target, CaptureState.PENDING, row.created_at)

        try:
            await self._session(insert)
        except IntegrityError:
            # A concurrent retry with the same request_id won the insert: answer with its capture.
            existing = await self._tx(lambda repo: repo.find_by_request(requester, request.request_id))
            if existing is None:
                raise
            return _same_request(existing, request)
        outcomes = await asyncio.gather(
            *(self._dispatch(row, target) for target in row.targets),
            return_exceptions=True,
        )
        errors = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
        if len(errors) == len(outcomes):
            if all(isinstance(error, AgentRefused) for error in errors):
                await self._forget_refused(row, caller, request, errors)
            first = errors[0]
            raise (first.for_caller() if isinstance(first, AgentRefused) else first) from None
        return await self._get(row.id)

    async def _forget_refused(
        self, row: CaptureRow, caller: Caller, request: CaptureRequest, errors: list[BaseException]
    ) -> None:
        """Every agent refused before starting anything: the request is answered with the refusal (to correct or to
        retry), and the capture, which never ran, is removed rather than left FAILED in the list. The audit trail
        keeps the `allowed` entry and adds a `refused` one saying why."""
        await self._session(lambda session: CaptureRepository(session).delete(row.id))
        self._changes.notify(row.id)
        why = "; ".join(str(e.for_caller()) if isinstance(e, AgentRefused) else str(e) for e in errors)
        await self._audit_create(caller, request, "refused", row.id, why)

    async def _audit_create(
        self,
        caller: Caller,
        request: CaptureRequest,
        result: str,
        capture_id: str = "",
        note: str = "",
        namespace: str = "",
    ) -> None:
        if request.between:
            names = [str(end) for end in request.between]
            target = (
                f"between {', '.join(names[:-1])} and {names[-1]}" if names[1:] else f"between {names[0]}"
            )
        elif request.pod:
            target = f"pod {request.pod}"
        else:
            target = f"pods matching {request.label_selector!r}"
        detail = (
            f"{target}, filter {request.filter!r}, {request.duration.total_seconds():g}s"
            + (f", max_bytes {request.max_bytes}" if request.max_bytes else "")
            + (f", reason {request.reason!r}" if request.reason else "")
            + (f"; {note}" if note else "")
        )
        # A between capture is audited in every namespace it covers, so each namespace's trail shows it.
        covered = dict.fromkeys([request.namespace, *(end.namespace for end in request.between)])
        for each in [namespace] if namespace else covered:
            await self._access.audit(
                caller,
                Audited.CAPTURE,
                result=result,
                namespace=each,
                capture_id=capture_id,
                detail=detail,
            )

    async def _target_pods(self, request: CaptureRequest) -> list[Pod]:
        """The pod, or every capturable pod the selector matches (NOT_FOUND when there is none), or the pods of
        the between ends."""
        if request.between:
            return await self._between_pods(request)
        if request.pod:
            pod = await asyncio.to_thread(self._inventory.get_pod, request.namespace, request.pod)
            _check_capturable(pod, request)
            return [pod]
        matched = await asyncio.to_thread(
            self._inventory.list_pods, request.namespace, request.label_selector
        )
        pods = [pod for pod in matched if _capturable(pod, request)]
        if not pods:
            raise NotFound(
                f"no running pod in namespace {request.namespace} matches {request.label_selector!r}"
                + (
                    f" ({len(matched)} match but are not running, hostNetwork or without an IP)"
                    if matched
                    else ""
                )
            )
        limit = self._settings.caps.max_targets
        if len(pods) > limit:
            raise LimitExceeded(
                f"{request.label_selector!r} matches {len(pods)} running pods; at most {limit} per capture"
            )
        return sorted(pods, key=lambda pod: pod.name)

    async def _between_pods(self, request: CaptureRequest) -> list[Pod]:
        """Every end's pods in the order of the ends: a pod (NOT_FOUND if missing, FAILED_PRECONDITION if it
        cannot be captured), or every ready endpoint pod of a Service (NOT_FOUND for no such Service,
        FAILED_PRECONDITION when none of its ready endpoints is a pod). A pod reached twice is captured once."""
        pods: dict[tuple[str, str], Pod] = {}
        for end in request.between:
            for pod in await self._end_pods(end):
                _check_capturable(pod, request)
                pods.setdefault((pod.namespace, pod.name), pod)
        if len(pods) < 2:
            ends = ", ".join(str(end) for end in request.between)
            raise InvalidRequest(f"a between capture needs at least two pods; {ends} is only {len(pods)}")
        limit = self._settings.caps.max_targets
        if len(pods) > limit:
            raise LimitExceeded(f"the between ends cover {len(pods)} pods; at most {limit} per capture")
        return list(pods.values())

    async def _end_pods(self, end: CaptureEnd) -> list[Pod]:
        if end.pod:
            return [await asyncio.to_thread(self._inventory.get_pod, end.namespace, end.pod)]
        service = await asyncio.to_thread(self._inventory.get_service, end.namespace, end.service)
        names = sorted({endpoint.pod for endpoint in service.endpoints if endpoint.pod})
        if not names:
            raise WrongState(
                f"service {end.namespace}/{end.service} has no ready endpoint that is a pod"
                + (f" ({len(service.endpoints)} ready endpoints are no pods)" if service.endpoints else "")
            )
        return list(
            await asyncio.gather(
                *(asyncio.to_thread(self._inventory.get_pod, end.namespace, name) for name in names)
            )
        )

    async def _dispatch(self, row: CaptureRow, target: TargetRow) -> None:
        """Asks the pod's agent to start; the target's row was written PENDING before."""
        try:
            report = await self._start_on_agent(row, target)
        except AgentRefused as exc:
            await self._record_failure(row.id, target.index, str(exc.on(target.node).for_caller()))
            raise exc.on(target.node) from exc
        except ControllerError as exc:
            await self._record_failure(row.id, target.index, str(exc))
            raise
        settled = await self._record(row.id, target.index, report)
        self._follow(row.id, target.index, target.agent_address, None if settled else report)

    async def _start_on_agent(self, row: CaptureRow, target: TargetRow) -> AgentCapture:
        """StartCapture for one target, from what its rows say; the agent answers a repeat with the same capture."""
        return await self._agents.start(
            target.agent_address,
            _agent_capture_id(row.id, target.index),
            agent_pb2.PodRef(namespace=target.namespace, name=target.pod, ips=target.pod_ip.split(",")),
            row.filter,
            timedelta(milliseconds=row.duration_ms),
            capture_limits(row),
            target.object_key,
            pod_interface=row.pod_interface,
            host_network=row.host_network,
        )

    async def get(self, capture_id: str, caller: Caller) -> CaptureRow:
        """The capture, if the caller may read captures in its namespace (in each, for a between capture)."""
        row = await self._get(capture_id)
        await self._access.require(caller, Action.READ, capture_namespaces(row))
        return row

    async def _get(self, capture_id: str) -> CaptureRow:
        """The capture by its id or a unique prefix of it (at least 4 hex digits)."""
        if _CAPTURE_ID_PREFIX.fullmatch(capture_id):
            matches = await self._tx(lambda repo: repo.ids_starting_with(capture_id, limit=2))
            if len(matches) > 1:
                raise InvalidRequest(
                    f"{capture_id!r} is the start of more than one capture id: give more of it"
                )
            capture_id = matches[0] if matches else capture_id
        elif not _CAPTURE_ID.fullmatch(capture_id):
            # Never echo a long or odd string: the message travels in a gRPC header with a size limit.
            raise InvalidRequest(
                f"{capture_id[:40]!r} is not a capture id (32 lower-case hex digits, or a unique prefix of 4 or more)"
            )
        row = await self._tx(lambda repo: repo.get(capture_id))
        if row is None:
            raise CaptureNotFound(f"capture {capture_id!r} not found")
        if row.deleted_at is not None:
            raise CaptureNotFound(
                f"capture {capture_id!r} was deleted at {row.deleted_at:%Y-%m-%d %H:%M:%S}Z"
            )
        return row

    async def history(self, capture_id: str) -> list[EventRow]:
        """Every transition of the capture and its targets, oldest first."""
        query = select(EventRow).where(EventRow.capture_id == capture_id).order_by(EventRow.id)
        return await self._session(lambda session: list(session.scalars(query)))

    async def delete(self, capture_id: str, caller: Caller) -> None:
        """Removes the capture's objects and marks its row deleted (kept for the audit trail)."""
        row = await self._get(capture_id)
        capture_id = row.id

        def deletable() -> None:
            if row.state not in TERMINAL_STATES:
                raise WrongState(f"capture {capture_id} is {row.state.value}; stop it before deleting it")

        await self._access.check(
            caller,
            Action.DELETE,
            capture_namespaces(row),
            Audited.DELETE,
            capture_id=capture_id,
            precondition=deletable,
        )
        requester = caller.principal.name
        for target in row.targets:
            if target.object_key:
                await asyncio.to_thread(self._store.delete, target.object_key)
                await asyncio.to_thread(self._store.delete, context_key(target.object_key))

        def mark(repo: CaptureRepository) -> None:
            locked = repo.get_for_update(capture_id)
            if locked is None or locked.deleted_at is not None:
                return
            now = datetime.now(UTC)
            locked.deleted_at, locked.updated_at = now, now
            _event(locked, None, locked.state, now, f"deleted by {requester}; its pcaps were removed")

        await self._tx(mark)
        self._changes.notify(capture_id)

    async def page(
        self,
        caller: Caller,
        namespace: str,
        pod: str,
        state: CaptureState | None,
        page_size: int,
        page_token: str,
        *,
        requester: str = "",
        created_after: datetime | None = None,
        created_before: datetime | None = None,
    ) -> Page:
        size = min(max(page_size, 1), 500) if page_size else 50
        after = _decode_token(page_token) if page_token else None
        readable: frozenset[str] | None = None
        if namespace:
            await self._access.require(caller, Action.READ, namespace)
        else:
            readable = await self._access.readable_namespaces(caller)
            if readable is not None and not readable:
                raise denial(caller, Action.READ, "*")
        rows = await self._tx(
            lambda repo: repo.list(
                namespace=namespace,
                namespaces=readable,
                pod=pod,
                state=state,
                limit=size + 1,
                after=after,
                requester=requester,
                created_after=created_after,
                created_before=created_before,
            )
        )
        more = len(rows) > size
        rows = rows[:size]
        token = _encode_token(rows[-1]) if more else ""
        # SQL filters on a capture's own namespace; a between capture may cover others the caller may not read,
        # and is then left out (the page may come out shorter; the token still moves past it).
        kept = [
            row
            for row in rows
            if len(namespaces := capture_namespaces(row)) == 1
            or await self._access.refused(caller, Action.READ, namespaces[1:]) is None
        ]
        return Page(kept, token)

    async def pods(self, caller: Caller, namespace: str) -> list[Pod]:
        """ListPods: the running pods the caller may capture (`_pods.py`)."""
        return await capturable_pods(self._inventory, self._access, caller, namespace)

    async def watch(self, capture_id: str, caller: Caller) -> AsyncIterator[CaptureRow]:
        """The capture now and after every change, ending once it is terminal and every summary is in."""
        capture_id = (await self.get(capture_id, caller)).id
        last: datetime | None = None
        while True:
            changed = self._changes.event(capture_id)
            row = await self._get(capture_id)
            if row.updated_at != last:
                last = row.updated_at
                yield row
            if row.state in TERMINAL_STATES and not any(t.summary_pending for t in row.targets):
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout=_WATCH_POLL_S)

    async def stop(self, capture_id: str, caller: Caller) -> CaptureRow:
        """Ends a capture early; what was captured is kept, and who stopped it when is recorded with it."""
        row = await self._get(capture_id)
        capture_id = row.id

        def stoppable() -> None:
            if row.state in TERMINAL_STATES:
                raise WrongState(f"capture {capture_id} is already {row.state.value}")

        await self._access.check(
            caller,
            Action.STOP,
            capture_namespaces(row),
            Audited.STOP,
            capture_id=capture_id,
            precondition=stoppable,
        )
        stopper = caller.principal.name

        def mark(repo: CaptureRepository) -> None:
            locked = repo.get_for_update(capture_id)
            if locked is None or locked.state in TERMINAL_STATES or locked.stopped_at is not None:
                return
            now = datetime.now(UTC)
            locked.stopped_by, locked.stopped_at, locked.updated_at = stopper, now, now
            _event(locked, None, locked.state, now, f"stop requested by {stopper}")
            for target in locked.targets:
                if target.state == CaptureState.PENDING:
                    # Not started yet (its agent unreachable, say): it never will be. A start already on its way
                    # may still reach the agent: then it is stopped there, and what it stored is taken as a late
                    # result, so nothing is lost track of.
                    target.state, target.ended_at, target.awaiting_agent = CaptureState.CANCELLED, now, True
                    target.error = f"cancelled by {stopper} before it started"
                    _event(locked, target, CaptureState.CANCELLED, now, target.error)
            _roll_up(locked, now)

        await self._tx(mark)
        for target in row.targets:
            if target.state == CaptureState.RUNNING:
                await self._agents.stop(target.agent_address, _agent_capture_id(row.id, target.index))
        return await self._get(capture_id)

    async def _stored_target(
        self, capture_id: str, index: int, caller: Caller, audited: Audited
    ) -> tuple[CaptureRow, TargetRow]:
        """The target whose pcap is to be handed out, once the caller is authorised and the decision audited."""
        row = await self._get(capture_id)
        capture_id = row.id

        def stored() -> None:
            if not 0 <= index < len(row.targets):
                raise InvalidRequest(
                    f"capture {capture_id} has no target {index} (it has {len(row.targets)})"
                )
            target = row.targets[index]
            # A FAILED target may still have stored what it captured before it failed (its pod vanished, say).
            if not (
                target.state == CaptureState.COMPLETED
                or (target.state in (CaptureState.FAILED, CaptureState.CANCELLED) and target.sha256)
            ):
                raise WrongState(
                    f"capture {capture_id} is {target.state.value}; its pcap can be downloaded once COMPLETED"
                )

        await self._access.check(
            caller,
            Action.DOWNLOAD,
            capture_namespaces(row),
            audited,
            capture_id=capture_id,
            detail=f"target {index}",
            precondition=stored,
        )
        return row, row.targets[index]

    async def download_url(self, capture_id: str, index: int, caller: Caller) -> Download:
        row, target = await self._stored_target(capture_id, index, caller, Audited.DOWNLOAD_URL)
        ttl = self._settings.download_url_ttl
        filename = pcap_filename(target, row.created_at)
        url = await asyncio.to_thread(self._store.presign_get, target.object_key, ttl, filename)
        return Download(url=url, expires_at=datetime.now(UTC) + ttl, filename=filename)

    async def download(self, capture_id: str, index: int, caller: Caller) -> AsyncIterator[bytes]:
        _, target = await self._stored_target(capture_id, index, caller, Audited.DOWNLOAD)
        chunks: Iterator[bytes] = await asyncio.to_thread(self._store.iter_bytes, target.object_key)
        try:
            while (chunk := await asyncio.to_thread(next, chunks, b"")) != b"":
                yield chunk
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                await asyncio.to_thread(close)

    async def stream_packets(self, capture_id: str, index: int, caller: Caller) -> AsyncIterator[bytes]:
        """One target's pcap while it is captured, straight from its node (the same bytes the store gets), once
        the caller may download it; ends when the pcap is complete."""
        row = await self._get(capture_id)

        def streamable() -> None:
            if not 0 <= index < len(row.targets):
                raise InvalidRequest(f"capture {row.id} has no target {index} (it has {len(row.targets)})")
            target = row.targets[index]
            if target.state == CaptureState.PENDING:
                raise WrongState(f"capture {row.id} has not started on its node yet; retry in a moment")
            if target.state in TERMINAL_STATES:
                raise WrongState(
                    f"capture {row.id} has ended ({target.state.value}): "
                    + ("download its pcap instead" if target.sha256 else "it stored no pcap")
                )

        await self._access.check(
            caller,
            Action.DOWNLOAD,
            capture_namespaces(row),
            Audited.STREAM,
            capture_id=row.id,
            detail=f"target {index}",
            precondition=streamable,
        )
        target = row.targets[index]
        async for chunk in self._agents.stream_pcap(target.agent_address, _agent_capture_id(row.id, index)):
            yield chunk

    async def start(self) -> None:
        """Starts the reconciler: it follows every non-terminal target that no live replica follows."""
        await self._reconcile_once()
        self._reconciler = asyncio.create_task(self._reconcile(), name="reconciler")

    async def _reconcile(self) -> None:
        period = self._settings.lease_ttl.total_seconds() / 3
        while True:
            await asyncio.sleep(period)
            try:
                await self._reconcile_once()
            except Exception:
                log.exception("reconciling failed; trying again in %.1fs", period)

    async def _reconcile_once(self) -> None:
        """Renews this replica's leases, drops followers whose lease another replica took, claims free targets."""
        me, ttl = self._settings.replica_id, self._settings.lease_ttl

        def work(session: Session) -> tuple[set[tuple[str, int]], list[Claim]]:
            now = datetime.now(UTC)
            leases = TargetLeases(session)
            held = leases.renew(me, now + ttl)
            claimed = [
                c
                for c in leases.claimable(me, now)
                if leases.claim(c.capture_id, c.index, me, now + ttl, now)
            ]
            return held, claimed

        held, claimed = await self._session(work)
        for key, task in list(self._following.items()):
            if key not in held and not any((c.capture_id, c.index) == key for c in claimed):
                task.cancel()
        for claim in claimed:
            log.info("following capture %s target %d (lease taken)", claim.capture_id, claim.index)
            self._follow(claim.capture_id, claim.index, claim.agent_address)

    async def close(self) -> None:
        """Stops following and hands this replica's leases over at once."""
        if self._reconciler is not None:
            self._reconciler.cancel()
            await asyncio.gather(self._reconciler, return_exceptions=True)
        tasks = list(self._following.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        me = self._settings.replica_id
        await self._session(lambda session: TargetLeases(session).release(me, datetime.now(UTC)))

    async def _session(self, work: Callable[[Session], T]) -> T:
        def run() -> T:
            with self._sessions.begin() as session:
                return work(session)

        return await asyncio.to_thread(run)

    def _follow(
        self, capture_id: str, index: int, address: str, recorded: AgentCapture | None = None
    ) -> None:
        key = (capture_id, index)
        if key in self._following and not self._following[key].done():
            return
        task = asyncio.create_task(
            self._follow_target(capture_id, index, address, recorded), name=f"follow-{capture_id}"
        )
        self._following[key] = task
        task.add_done_callback(lambda _: self._following.pop(key, None))

    async def _follow_target(
        self, capture_id: str, index: int, address: str, recorded: AgentCapture | None = None
    ) -> None:
        """Mirrors the agent's reports into SQL until the target is settled (terminal, its summary in); gives up
        on a lost agent.

        `recorded` is the report last written (the start's answer): a report equal to it changes nothing and
        costs no transaction. A watch opens with the capture as it stands, which is what the start has just
        answered, and SQL transactions are what a burst of creates queues for (bench/burst.py)."""
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self._settings.agent_lost_after.total_seconds()
        delay, longest = 0.2, 5.0
        restarted = False
        while True:
            try:
                async for report in self._agents.watch(address, _agent_capture_id(capture_id, index)):
                    give_up_at = loop.time() + self._settings.agent_lost_after.total_seconds()
                    if report == recorded:
                        continue
                    if await self._record(capture_id, index, report):
                        return
                    recorded = report
            except CaptureUnknownToAgent as exc:
                if not restarted and await self._restart_pending(capture_id, index):
                    restarted = (
                        True  # never confirmed started (the controller died first): start it now, once
                    )
                    continue
                await self._record_failure(capture_id, index, f"the agent lost the capture: {exc}")
                return
            except Unavailable as exc:
                if loop.time() >= give_up_at:
                    # FAILED now, for whoever waits; still listening, slowly, for what the agent stored meanwhile.
                    if not await self._record_failure(
                        capture_id, index, f"{exc}; gave up waiting for it", lost=True
                    ):
                        return
                    longest = min(
                        _LOST_AGENT_RETRY_S, max(5.0, self._settings.agent_lost_after.total_seconds())
                    )
                else:
                    log.warning("capture %s: %s; retrying", capture_id, exc)
            except Exception:
                log.exception("capture %s: following the agent failed", capture_id)
                await self._record_failure(capture_id, index, "the controller failed to follow the agent")
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, longest)

    async def _restart_pending(self, capture_id: str, index: int) -> bool:
        """Starts a target that is still PENDING (its StartCapture died with a controller); True if it started."""
        row = await self._tx(lambda repo: repo.get(capture_id))
        if row is None or row.targets[index].state != CaptureState.PENDING:
            return False
        log.info("capture %s target %d was never confirmed started; starting it now", capture_id, index)
        try:
            report = await self._start_on_agent(row, row.targets[index])
        except ControllerError as exc:
            await self._record_failure(
                capture_id, index, f"starting it after a controller restart failed: {exc}"
            )
            return False
        await self._record(capture_id, index, report)
        return True

    async def _record(self, capture_id: str, index: int, report: AgentCapture) -> bool:
        """Writes an agent report; True once the target is settled: terminal, and its summary in.

        A terminal target takes nothing but its summary from later reports: its state and figures are final."""

        def write(repo: CaptureRepository) -> tuple[bool, str]:
            """Whether the target is settled, and the agent to tell to stop (a start that raced a cancel)."""
            row = repo.get_for_update(capture_id)
            if row is None:
                return True, ""
            target = row.targets[index]
            if target.state in TERMINAL_STATES:
                stop_at = ""
                if target.awaiting_agent:
                    if _record_late_result(row, target, report):
                        stop_at = target.agent_address
                elif target.summary_pending and report.HasField("summary"):
                    _record_summary(row, target, report.summary)
                    row.updated_at = datetime.now(UTC)
                return not (target.summary_pending or target.awaiting_agent), stop_at
            now = datetime.now(UTC)
            state = _AGENT_STATES.get(report.state, target.state)
            if state != target.state:
                _event(row, target, state, now, report.error if state in TERMINAL_STATES else "")
            target.state = state
            if report.resolution.interface:
                target.interface = report.resolution.interface
                target.resolution = json_format.MessageToJson(report.resolution, indent=None)
            target.packets = report.stats.packets
            target.packets_received = report.stats.packets_received
            target.kernel_drops = report.stats.kernel_drops
            target.drops_unknown = report.stats.kernel_drops_unknown
            target.bytes = report.stats.bytes
            target.sha256 = report.sha256
            target.error = report.error
            target.interruption = report.interruption
            if report.HasField("summary"):
                _record_summary(row, target, report.summary)
            _record_context(target, report)
            if report.HasField("start_time"):
                target.started_at = report.start_time.ToDatetime(UTC)
            if target.state in TERMINAL_STATES:
                target.ended_at = report.end_time.ToDatetime(UTC) if report.HasField("end_time") else now
            _roll_up(row, now)
            return target.state in TERMINAL_STATES and not target.summary_pending, ""

        done, stop_at = await self._tx(write)
        self._changes.notify(capture_id)
        if stop_at:
            try:
                await self._agents.stop(stop_at, _agent_capture_id(capture_id, index))
            except ControllerError as exc:  # the next report asks again
                log.warning("capture %s: stopping a cancelled target's tcpdump failed: %s", capture_id, exc)
        return done

    async def _record_failure(self, capture_id: str, index: int, error: str, *, lost: bool = False) -> bool:
        """Fails the target (a terminal one keeps its state and figures); True while it still waits for a late
        result from its agent: with `lost`, the agent was unreachable for too long, but an agent that comes back
        will upload what it captured, and that result is taken (`_record_late_result`), for a day."""

        def write(repo: CaptureRepository) -> bool:
            row = repo.get_for_update(capture_id)
            if row is None:
                return False
            now = datetime.now(UTC)
            target = row.targets[index]
            if target.state not in TERMINAL_STATES:
                target.state, target.error, target.ended_at = CaptureState.FAILED, error, now
                target.awaiting_agent = lost
                _event(row, target, CaptureState.FAILED, now, error)
                _roll_up(row, now)
                _record_verdicts(row)  # this target has no pcap: the others' may be all there is
                return lost
            if target.awaiting_agent:
                ended = target.ended_at or now
                if lost and now - ended < _LATE_RESULT_WINDOW:
                    return True
                target.awaiting_agent = False
                why = error if not lost else f"no word from the agent in {_LATE_RESULT_WINDOW}"
                _event(row, target, target.state, now, f"no late result: {why}")
                row.updated_at = now
            elif target.summary_pending:  # stored, but its summary will not come: say so rather than wait
                summary = json_format.Parse(target.summary, common_pb2.CaptureSummary())
                summary.state = common_pb2.SUMMARY_STATE_INCOMPLETE
                summary.error = f"no summary: {error}"
                _record_summary(row, target, summary)
                row.updated_at = now
            return False

        waiting = await self._tx(write)
        self._changes.notify(capture_id)
        return waiting


def _record_late_result(row: CaptureRow, target: TargetRow, report: AgentCapture) -> bool:
    """A report for a target already ended without its agent: FAILED as lost (the agent came back), or CANCELLED
    before it started (a start on its way got there first). Once the agent has finished, what it stored becomes
    the target's pcap (downloadable; the state stays, as terminal states are final), in its history. True when
    the agent is still capturing for a cancelled target and must be told to stop."""
    agent_state = _AGENT_STATES.get(report.state)
    if agent_state not in TERMINAL_STATES:
        return target.state == CaptureState.CANCELLED and agent_state == CaptureState.RUNNING
    now = datetime.now(UTC)
    target.awaiting_agent = False
    if report.sha256:
        target.packets, target.packets_received = report.stats.packets, report.stats.packets_received
        target.kernel_drops, target.drops_unknown = (
            report.stats.kernel_drops,
            report.stats.kernel_drops_unknown,
        )
        target.bytes, target.sha256, target.interruption = (
            report.stats.bytes,
            report.sha256,
            report.interruption,
        )
        if report.HasField("summary"):
            _record_summary(row, target, report.summary)
        _record_context(target, report)
        how = (
            "the agent came back and"
            if target.state == CaptureState.FAILED
            else "the start reached the agent first; it"
        )
        detail = (
            f"late result: {how} stored the pcap ({report.stats.packets} packets, {report.stats.bytes} bytes); "
            "it can be downloaded"
        )
    else:
        detail = f"late result: the agent stored nothing ({report.error or 'no reason given'})"
    target.error = f"{target.error}; {detail}" if target.error else detail
    _event(row, target, target.state, now, detail)
    row.error = _capture_error(row)
    row.updated_at = now
    return False


def _record_context(target: TargetRow, report: AgentCapture) -> None:
    """The agent's digest of the network around the capture (it comes with the report that ends it)."""
    if report.HasField("context"):
        target.context = json_format.MessageToJson(report.context, indent=None)


def _record_summary(row: CaptureRow, target: TargetRow, summary: common_pb2.CaptureSummary) -> None:
    target.summary = json_format.MessageToJson(summary, indent=None)
    target.summary_pending = summary.state == common_pb2.SUMMARY_STATE_PENDING
    _record_verdicts(row)


def _record_verdicts(row: CaptureRow) -> None:
    """Once every target is terminal and summarised (or has no pcap): the capture's verdicts, from all of them."""
    if all(t.state in TERMINAL_STATES and not t.summary_pending for t in row.targets):
        ends = [
            End(
                f"{t.namespace}/{t.pod}@{t.node}",
                tuple(ip for ip in t.pod_ip.split(",") if ip),
                json_format.Parse(t.summary, common_pb2.CaptureSummary()) if t.summary else None,
            )
            for t in row.targets
        ]
        row.verdicts = json.dumps(
            [json_format.MessageToDict(v) for v in verdicts(ends)], separators=(",", ":")
        )


def _event(
    row: CaptureRow, target: TargetRow | None, state: CaptureState, at: datetime, detail: str = ""
) -> None:
    """Appends one transition to the capture's history, in the transaction that makes it."""
    event = EventRow(
        capture_id=row.id,
        target_index=None if target is None else target.index,
        state=state,
        at=at,
        detail=detail,
    )
    session = object_session(row)
    assert session is not None, "history is written in the transaction of the change"
    session.add(event)


def _roll_up(row: CaptureRow, now: datetime) -> None:
    state = roll_up([t.state for t in row.targets])
    if state != row.state:
        _event(row, None, state, now)
    row.state = state
    row.updated_at = now
    starts = [t.started_at for t in row.targets if t.started_at is not None]
    if starts and row.started_at is None:
        row.started_at = min(starts)
    if row.state in TERMINAL_STATES:
        row.ended_at = now
        row.error = _capture_error(row)


def _capture_error(row: CaptureRow) -> str:
    return "; ".join(f"{t.namespace}/{t.pod}: {t.error}" for t in row.targets if t.error)


def _check_capturable(pod: Pod, request: CaptureRequest) -> None:
    name = f"{pod.namespace}/{pod.name}"
    if pod.phase != "Running":
        raise WrongState(f"pod {name} is {pod.phase or 'not running'}; only a Running pod can be captured")
    if pod.host_network and not request.host_network:
        raise WrongState(
            f"pod {name} uses hostNetwork: it has no veth of its own to capture on. Ask again with host_network "
            "(CLI: --host-network) to capture on the node interface holding its IP, filtered to that address; "
            "that sees the node's traffic to and from that address, not only this pod's"
        )
    if request.host_network and request.pod and not pod.host_network:
        raise WrongState(
            f"pod {name} is not a hostNetwork pod: it has a network namespace and a veth of its own, which podcap "
            "captures without host_network (CLI: drop --host-network)"
        )
    if not pod.ips:
        raise WrongState(f"pod {name} has no IP address yet")
    if not pod.node:
        raise WrongState(f"pod {name} is not scheduled on a node")


def _capturable(pod: Pod, request: CaptureRequest) -> bool:
    try:
        _check_capturable(pod, request)
    except WrongState:
        return False
    return True


def _new_row(
    capture_id: str, request: CaptureRequest, requester: str, pods: list[Pod], agents: dict[str, str]
) -> CaptureRow:
    now = datetime.now(UTC)
    row = CaptureRow(
        id=capture_id,
        request_id=request.request_id or None,
        requester=requester,
        reason=request.reason,
        namespace=request.namespace,
        pod=request.pod,
        label_selector=request.label_selector,
        filter=request.filter,
        duration_ms=int(request.duration.total_seconds() * 1000),
        max_packets=request.max_packets,
        max_bytes=request.max_bytes,
        snaplen=request.snaplen,
        buffer_size=request.buffer_size,
        pod_interface=request.pod_interface,
        host_network=request.host_network,
        between=json.dumps([_end_json(end) for end in request.between]) if request.between else "",
        state=CaptureState.PENDING,
        error="",
        created_at=now,
        updated_at=now,
    )
    row.targets = [
        TargetRow(
            namespace=pod.namespace,
            pod=pod.name,
            node=pod.node,
            pod_ip=",".join(pod.ips),
            pod_uid=pod.uid,
            pod_context=pod_context(pod),
            agent_address=agents[pod.node],
            state=CaptureState.PENDING,
            object_key=f"{capture_id}/{pod.namespace}_{pod.name}.pcap",
        )
        for pod in pods
    ]
    return row


def capture_limits(row: CaptureRow) -> common_pb2.CaptureLimits:
    return common_pb2.CaptureLimits(
        max_packets=row.max_packets, max_bytes=row.max_bytes, snaplen=row.snaplen, buffer_size=row.buffer_size
    )


def pod_context(pod: Pod) -> str:
    """What the pod was when it was captured, kept with the capture so it survives the pod (JSON)."""
    return json.dumps(
        {
            "phase": pod.phase,
            "node": pod.node,
            "ips": list(pod.ips),
            "hostNetwork": pod.host_network,
            "uid": pod.uid,
            "labels": pod.labels,
            "containers": [
                {"name": c.name, "ready": c.ready, "restartCount": c.restart_count, "state": c.state}
                for c in pod.containers
            ],
        },
        sort_keys=True,
    )


def _same_request(existing: CaptureRow, request: CaptureRequest) -> CaptureRow:
    """An idempotent retry returns the capture it created; a different body under the same id is refused."""
    same = (
        existing.namespace == request.namespace
        and existing.pod == request.pod
        and existing.label_selector == request.label_selector
        and existing.filter == request.filter
        and existing.duration_ms == int(request.duration.total_seconds() * 1000)
        and (existing.max_packets, existing.max_bytes, existing.snaplen, existing.buffer_size)
        == (request.max_packets, request.max_bytes, request.snaplen, request.buffer_size)
        and (existing.pod_interface, existing.host_network) == (request.pod_interface, request.host_network)
        and capture_ends(existing) == list(request.between)
    )
    if not same:
        raise InvalidRequest(f"request_id {request.request_id!r} was already used for a different capture")
    return existing


def _end_json(end: CaptureEnd) -> dict[str, str]:
    if end.pod:
        return {"namespace": end.namespace, "pod": end.pod}
    return {"namespace": end.namespace, "service": end.service}


def capture_ends(row: CaptureRow) -> list[CaptureEnd]:
    """The ends a between capture was asked for (CaptureRow.between); none for any other capture."""
    return [CaptureEnd(**end) for end in json.loads(row.between)] if row.between else []


def capture_namespaces(row: CaptureRow) -> list[str]:
    """Every namespace the capture covers, its own first: one, except for a between capture, whose pods may be in
    several. Acting on a capture or reading it needs the permission in each of them."""
    ends = [end.namespace for end in capture_ends(row)]
    return list(dict.fromkeys([row.namespace, *ends, *(target.namespace for target in row.targets)]))


def _agent_capture_id(capture_id: str, index: int) -> str:
    return f"{capture_id}-{index}"


def pcap_filename(target: TargetRow, created_at: datetime) -> str:
    """`<namespace>_<pod>_<start>.pcap`, the name a downloaded pcap gets."""
    start = (target.started_at or created_at).strftime("%Y%m%dT%H%M%SZ")
    return f"{target.namespace}_{target.pod}_{start}.pcap"


def _encode_token(row: CaptureRow) -> str:
    return base64.urlsafe_b64encode(f"{row.created_at.isoformat()}|{row.id}".encode()).decode()


def _decode_token(token: str) -> tuple[datetime, str]:
    try:
        created, capture_id = base64.urlsafe_b64decode(token.encode()).decode().split("|", 1)
        when = datetime.fromisoformat(created)
    except (ValueError, UnicodeError) as exc:
        raise InvalidRequest("page_token is not one this server issued") from exc
    if when.tzinfo is None:
        raise InvalidRequest("page_token is not one this server issued")
    return when, capture_id
