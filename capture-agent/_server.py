"""The agent process: builds its parts once from `AgentSettings`, serves AgentService and grpc.health.v1, and on
SIGTERM/SIGINT stops every capture and finishes its upload before it exits."""

from __future__ import annotations

import asyncio
import logging
import pwd
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from podcap.api.serving import Health, listen, until_signalled
from podcap.api.v1 import agent_pb2_grpc
from podcap.storage import open_store

from ._captures import CaptureManager
from ._model import Limits
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


async def serve(settings: AgentSettings, started: asyncio.Event | None = None) -> None:
    """Runs the agent until SIGTERM/SIGINT (or cancellation)."""
    user = _existing_user(settings.tcpdump_user)
    captures = CaptureManager(
        resolver=Resolver(node_name=settings.node_name),
        store=open_store(settings.store_url),
        spool=Spool(settings.spool_dir, user),
        tcpdump=settings.tcpdump,
        tcpdump_user=user,
        limits=settings.limits,
        retry=settings.retry,
    )
    await captures.recover()
    server = grpc.aio.server()
    agent_pb2_grpc.add_AgentServiceServicer_to_server(AgentServicer(captures), server)
    health = Health(server, SERVICE_NAME)
    listen(server, settings.listen)
    await server.start()
    await health.serving(True)
    log.info(
        "agent for node %s listening on %s, storing to %s",
        settings.node_name,
        settings.listen,
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
    """The user tcpdump drops to, if it exists here; otherwise tcpdump keeps the agent's privileges (logged)."""
    if not name:
        return ""
    try:
        pwd.getpwnam(name)
    except KeyError:
        log.warning("user %r does not exist; tcpdump keeps the agent's privileges", name)
        return ""
    return name
