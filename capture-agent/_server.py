"""The agent process: builds its parts once from `AgentSettings`, serves AgentService and grpc.health.v1, and on
SIGTERM/SIGINT stops every capture and finishes its upload before it exits."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from podcap.api.v1 import agent_pb2_grpc
from podcap.storage import open_store

from ._captures import CaptureManager, Limits
from ._resolve import Resolver
from ._servicer import AgentServicer

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


async def serve(settings: AgentSettings, started: asyncio.Event | None = None) -> None:
    """Runs the agent until SIGTERM/SIGINT (or cancellation)."""
    captures = CaptureManager(
        resolver=Resolver(node_name=settings.node_name),
        store=open_store(settings.store_url),
        spool_dir=settings.spool_dir,
        tcpdump=settings.tcpdump,
        tcpdump_user=settings.tcpdump_user,
        limits=settings.limits,
    )
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
        await captures.shutdown()
        await server.stop(grace=5)
