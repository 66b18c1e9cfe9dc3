"""The agent process: builds its parts once from `AgentSettings`, serves AgentService and grpc.health.v1, and on
SIGTERM/SIGINT stops every capture and finishes its upload before it exits."""

from __future__ import annotations

import asyncio
import logging
import pwd
import signal
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

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
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]  # the stubs lack grpc_health.v1.aio
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port(settings.listen)
    if port == 0:
        raise OSError(f"cannot listen on {settings.listen}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "agent for node %s listening on %s, storing to %s",
        settings.node_name,
        settings.listen,
        settings.store_url,
    )
    if started is not None:
        started.set()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
        log.info("shutting down: stopping captures and finishing uploads")
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
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
