"""Who may do what: authentication of callers, authorisation per namespace and action, and the audit trail.

podcap is a wiretap with root on every node, so every call names its caller, and every capture, diagnosis, stop,
delete, download and download-URL decision (allowed or denied) is appended to the audit trail *before* the
action: if the entry cannot be written, the action does not happen. Reading (get, list, watch) is authorised but not
audited.

Two seams, each with implementations in this package: an `Authenticator` turns a bearer token into a
`Principal` (a static token file, `_tokens.py`; Kubernetes TokenReview, `_kube.py`; or no authentication at all
for a loopback-only local run), and an `Authorizer` says whether a principal may perform an `Action` in a
namespace (the token file's grants; Kubernetes SubjectAccessReview on the virtual resource `pods/capture`).
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from podcap.storage import AuditLog, StorageError

from ._errors import Forbidden, Unauthenticated, Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")


class Action(enum.StrEnum):
    """What a caller can be allowed to do with captures in a namespace."""

    CAPTURE = "capture"
    READ = "read"
    DOWNLOAD = "download"
    STOP = "stop"
    DELETE = "delete"


class Audited(enum.StrEnum):
    """The decisions written to the audit trail (a download URL and a live stream are their own entries, both
    authorised as DOWNLOAD)."""

    CAPTURE = "capture"
    STOP = "stop"
    DELETE = "delete"
    DOWNLOAD = "download"
    DOWNLOAD_URL = "download-url"
    STREAM = "stream"  # the live pcap of a running capture, authorised as DOWNLOAD
    DIAGNOSE = "diagnose"  # connections made from inside a pod by `podcap diagnose`, authorised as CAPTURE


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: the name recorded as requester and actor, and its groups (Kubernetes)."""

    name: str
    groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class Caller:
    """A principal and where its call came from (gRPC's peer string, e.g. ``ipv4:10.0.0.7:51234``)."""

    principal: Principal
    peer: str = ""


class Authenticator(Protocol):
    async def authenticate(self, token: str) -> Principal:
        """The principal a bearer token belongs to; raises Unauthenticated (``token`` may be empty)."""
        ...


class Authorizer(Protocol):
    async def allowed(self, principal: Principal, action: Action, namespace: str) -> bool: ...

    async def namespaces(self, principal: Principal, action: Action) -> frozenset[str] | None:
        """The namespaces where the principal may do ``action``; None means every namespace."""
        ...


ANONYMOUS = Principal("anonymous")


class NoAuthentication:
    """Everyone is ``anonymous`` and may do everything: only for a controller on loopback (local runs)."""

    async def authenticate(self, token: str) -> Principal:
        return ANONYMOUS

    async def allowed(self, principal: Principal, action: Action, namespace: str) -> bool:
        return True

    async def namespaces(self, principal: Principal, action: Action) -> frozenset[str] | None:
        return None


def bearer_token(authorization: str) -> str:
    """The token of an ``authorization: Bearer TOKEN`` header; empty when there is none."""
    scheme, _, token = authorization.strip().partition(" ")
    if not authorization:
        return ""
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("the authorization header must be 'Bearer TOKEN'")
    return token.strip()


class AccessControl:
    """Authentication, authorisation and the audit trail, as the use cases need them."""

    def __init__(
        self, authenticator: Authenticator, authorizer: Authorizer, sessions: sessionmaker[Session]
    ) -> None:
        self._authenticator = authenticator
        self._authorizer = authorizer
        self._sessions = sessions

    async def authenticate(self, authorization: str, peer: str, audited: Audited | None = None) -> Caller:
        """The caller of a request with this ``authorization`` header; a failed attempt at an audited action is
        itself audited (actor ``-``, result ``unauthenticated``) before it is refused."""
        try:
            principal = await self._authenticator.authenticate(bearer_token(authorization))
        except Unauthenticated as exc:
            if audited is not None:
                await self.audit(
                    Caller(Principal("-"), peer), audited, result="unauthenticated", detail=str(exc)
                )
            raise
        return Caller(principal, peer)

    async def allows(self, caller: Caller, action: Action, namespace: str) -> bool:
        return await self._authorizer.allowed(caller.principal, action, namespace)

    async def refused(self, caller: Caller, action: Action, namespaces: str | Sequence[str]) -> str | None:
        """The first of `namespaces` (one, or every namespace a `between` capture covers) where the caller may
        not do `action`; None when it may in all of them."""
        for namespace in (namespaces,) if isinstance(namespaces, str) else namespaces:
            if not await self.allows(caller, action, namespace):
                return namespace
        return None

    async def require(self, caller: Caller, action: Action, namespace: str | Sequence[str]) -> None:
        """Authorises an action that is not audited (reading), in one namespace or in each of several."""
        refused = await self.refused(caller, action, namespace)
        if refused is not None:
            raise denial(caller, action, refused)

    async def check(
        self,
        caller: Caller,
        action: Action,
        namespace: str | Sequence[str],
        audited: Audited,
        *,
        capture_id: str = "",
        detail: str = "",
        precondition: Callable[[], None] | None = None,
    ) -> None:
        """Authorises an audited action and appends the decision; raises Forbidden after recording a denial.

        `precondition` (the capture's state allows the action, say) runs once the caller is known to be allowed
        and before the entry is written: a request that it refuses has not acted, so it gets no `allowed` entry
        (and a caller who may not act learns nothing about the capture's state).

        With several namespaces the caller must be allowed in each; the entry names the one refused, else the
        first."""
        refused = await self.refused(caller, action, namespace)
        if refused is None and precondition is not None:
            precondition()
        first = namespace if isinstance(namespace, str) else namespace[0]
        await self.audit(
            caller,
            audited,
            result="allowed" if refused is None else "denied",
            namespace=first if refused is None else refused,
            capture_id=capture_id,
            detail=detail,
        )
        if refused is not None:
            raise denial(caller, action, refused)

    async def readable_namespaces(self, caller: Caller) -> frozenset[str] | None:
        return await self.namespaces(caller, Action.READ)

    async def namespaces(self, caller: Caller, action: Action) -> frozenset[str] | None:
        """Where the caller may do `action`: None means every namespace; a set may also be empty when the
        authoriser cannot enumerate (Kubernetes RBAC), so ask `allows` per namespace unless it is None."""
        return await self._authorizer.namespaces(caller.principal, action)

    async def audit(
        self,
        caller: Caller,
        audited: Audited,
        *,
        result: str,
        namespace: str = "",
        capture_id: str = "",
        detail: str = "",
    ) -> None:
        """Appends one entry and commits it; if that fails, the caller gets UNAVAILABLE and nothing happens."""

        def write(session: Session) -> None:
            AuditLog(session).append(
                actor=caller.principal.name,
                action=audited.value,
                result=result,
                namespace=namespace,
                capture_id=capture_id,
                peer=caller.peer,
                detail=detail,
            )

        try:
            await self._tx(write)
        except (SQLAlchemyError, StorageError) as exc:
            log.error("audit trail write failed, refusing %s by %s: %s", audited, caller.principal.name, exc)
            raise Unavailable(
                f"the audit trail cannot be written ({type(exc).__name__}); nothing was done"
            ) from exc

    async def _tx(self, work: Callable[[Session], T]) -> T:
        def run() -> T:
            with self._sessions.begin() as session:
                return work(session)

        return await asyncio.to_thread(run)


def denial(caller: Caller, action: Action, namespace: str) -> Forbidden:
    return Forbidden(f"{caller.principal.name} may not {action.value} captures in namespace {namespace!r}")
