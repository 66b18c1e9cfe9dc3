"""The controller process: builds its parts once from `ControllerSettings`, migrates the database, serves
CaptureService and grpc.health.v1, and resumes following every capture an earlier run left unfinished."""

from __future__ import annotations

import asyncio
import gc
import logging
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from podcap.api.serving import Health, listen, until_signalled
from podcap.api.v1 import capture_pb2_grpc
from podcap.storage import create_engine_for, make_sessionmaker, migrate, open_store

from ._agents import AgentClients
from ._captures import Captures, CaptureSettings
from ._inventory import Inventory
from ._servicer import CaptureServicer

log = logging.getLogger(__name__)

SERVICE_NAME = "podcap.api.v1.CaptureService"


@dataclass(frozen=True)
class ControllerSettings:
    """Everything the controller is configured with, built once at the entry point."""

    listen: str
    db_url: str
    store_url: str
    kubeconfig: Path | None = None
    inventory_file: Path | None = None
    agent_namespace: str = "podcap-system"
    agent_port: int = 7443
    agent_call_timeout: float = 15.0
    captures: CaptureSettings = field(default_factory=CaptureSettings)


def build_inventory(settings: ControllerSettings) -> Inventory:
    """The static file when one is given, else the Kubernetes API (kubeconfig, or in-cluster)."""
    if settings.inventory_file is not None:
        from ._static_inventory import StaticInventory

        return StaticInventory.from_file(settings.inventory_file)
    from ._kube import KubernetesInventory

    if settings.kubeconfig is not None:
        return KubernetesInventory.from_kubeconfig(
            settings.kubeconfig, agent_namespace=settings.agent_namespace, agent_port=settings.agent_port
        )
    return KubernetesInventory.in_cluster(
        agent_namespace=settings.agent_namespace, agent_port=settings.agent_port
    )


async def serve(settings: ControllerSettings, started: asyncio.Event | None = None) -> None:
    """Runs the controller until SIGTERM/SIGINT (or cancellation)."""
    engine = create_engine_for(settings.db_url)
    await asyncio.to_thread(migrate, engine)
    agents = AgentClients(call_timeout=settings.agent_call_timeout)
    captures = Captures(
        sessions=make_sessionmaker(engine),
        inventory=build_inventory(settings),
        agents=agents,
        store=open_store(settings.store_url),
        settings=settings.captures,
    )
    server = grpc.aio.server()
    capture_pb2_grpc.add_CaptureServiceServicer_to_server(CaptureServicer(captures), server)
    health = Health(server, SERVICE_NAME)
    listen(server, settings.listen)
    await server.start()
    await captures.start()
    await health.serving(True)
    # Everything built so far lives as long as the process: keep it out of the collector's full passes, which
    # otherwise cost tens of milliseconds each on a loaded node (see docs/bench.md, ListCaptures).
    gc.freeze()
    log.info("controller listening on %s", settings.listen)
    if started is not None:
        started.set()
    try:
        await until_signalled()
    finally:
        await health.serving(False)
        await server.stop(grace=5)
        await captures.close()
        await agents.close()
        engine.dispose()
