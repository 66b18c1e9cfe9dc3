"""The agent process: builds its parts once from `AgentSettings`, serves AgentService and grpc.health.v1, and on
SIGTERM/SIGINT stops every capture and finishes its upload before it exits.

An agent runs tcpdump as root-equivalent on its node, so in a cluster it serves only mutual TLS (`tls`): the
handshake refuses any client without a certificate from the controller's CA, and `RequirePeerName` refuses a
certificate from that CA that does not name the controller. Without `tls` it serves plaintext, for local runs.
"""

from __future__ import annotations

import asyncio
import logging
import pwd
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from podcap.api.malformed import RejectMalformed
from podcap.api.serving import (
    Health,
    RequirePeerName,
    TlsFiles,
    listen,
    server_credentials,
    server_options,
    until_signalled,
)
from podcap.api.v1 import agent_pb2_grpc
from podcap.storage import open_store

from ._captures import CaptureManager
from ._model import Limits, Programs
from ._resolve import Resolver
from ._servicer import AgentServicer
from ._spool import Spool
from ._upload import RetryPolicy

log = logging.getLogger(__name__)

SERVICE_NAME = "podcap.api.v1.AgentService"


@dataclass(frozen=True)
class AgentSettings:
    """Everything the agent is configured with, built once at the entry point."""

    node_name: str
    listen: str
    store_url: str
    spool_dir: Path = Path("/var/lib/podcap/spool")
    tcpdump: str = "tcpdump"
    tcpdump_user: str = "tcpdump"
    limits: Limits = field(default_factory=Limits)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    # Mutual TLS: our certificate and key, and the CA whose certificates may call us. None: plaintext.
    tls: TlsFiles | None = None
    # The name (SAN, or CN without SANs) the caller's certificate must carry; only used with `tls`.
    controller_name: str = "podcap-controller"


async def serve(settings: AgentSettings, started: asyncio.Event | None = None) -> None:
    """Runs the agent until SIGTERM/SIGINT (or cancellation).

    Refuses to start (SystemExit with the reason) when setpriv, tcpdump or tshark cannot be found: they are
    looked up on PATH here, once, and always run by their absolute paths.
    """
    try:
        programs = Programs.find(tcpdump=settings.tcpdump)
    except FileNotFoundError as exc:
        raise SystemExit(f"podcap agent: cannot start: {exc}") from None
    log.info("running %s, %s and %s", programs.setpriv, programs.tcpdump, programs.tshark)
    user = _existing_user(settings.tcpdump_user)
    captures = CaptureManager(
        resolver=Resolver(node_name=settings.node_name),
        store=open_store(settings.store_url),
        spool=Spool(settings.spool_dir, user),
        programs=programs,
        tcpdump_user=user,
        limits=settings.limits,
        retry=settings.retry,
    )
    credentials = server_credentials(settings.tls) if settings.tls is not None else None
    await captures.recover()
    server = grpc.aio.server(
        # The peer check comes first: a caller who may not call is refused as such, whatever it sent.
        interceptors=[
            *([RequirePeerName(settings.controller_name)] if settings.tls is not None else []),
            RejectMalformed(),
        ],
        options=server_options(),
    )
    agent_pb2_grpc.add_AgentServiceServicer_to_server(AgentServicer(captures), server)
    health = Health(server, SERVICE_NAME)
    listen(server, settings.listen, credentials)
    await server.start()
    await health.serving(True)
    log.info(
        "agent for node %s listening on %s (%s), storing to %s",
        settings.node_name,
        settings.listen,
        f"mutual TLS, callers named {settings.controller_name}" if settings.tls is not None else "plaintext",
        settings.store_url,
    )
    if started is not None:
        started.set()
    try:
        await until_signalled()
        log.info("shutting down: stopping captures and finishing uploads")
    finally:
        await health.serving(False)
        await captures.shutdown(settings.limits.shutdown_grace_s)
        await server.stop(grace=5)


def _existing_user(name: str) -> str:
    """The user tcpdump and tshark run as, if it exists here; otherwise tcpdump keeps the agent's privileges and
    tshark root's uid (without capabilities), logged."""
    if not name:
        return ""
    try:
        pwd.getpwnam(name)
    except KeyError:
        log.warning("user %r does not exist; tcpdump keeps the agent's privileges, tshark runs as root", name)
        return ""
    return name
