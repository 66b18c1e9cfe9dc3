"""The controller process: builds its parts once from `ControllerSettings`, migrates the database, serves
CaptureService and grpc.health.v1, and resumes following every capture an earlier run left unfinished."""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import logging
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from podcap.api.malformed import RejectMalformed
from podcap.api.serving import Health, TlsFiles, listen, server_options, until_signalled
from podcap.api.v1 import capture_pb2_grpc
from podcap.storage import create_engine_for, make_sessionmaker, migrate, open_store

from ._access import AccessControl, Authenticator, Authorizer, NoAuthentication
from ._agents import AgentClients
from ._captures import Captures, CaptureSettings
from ._diagnose import Diagnoses
from ._inventory import Inventory
from ._retention import RetentionSettings, RetentionSweeper
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
    # Mutual TLS to the agents: our client certificate and key, the CA that signs the agents. None: plaintext.
    agent_tls: TlsFiles | None = None
    # The name the agents' certificates carry (they are dialled by pod IP, so the address cannot be checked).
    agent_server_name: str = "podcap-agent"
    # Who may call: "none" (everyone is anonymous and may do anything; loopback only), "tokens" (bearer tokens
    # and grants from `token_file`) or "kubernetes" (TokenReview and SubjectAccessReview).
    auth: str = "none"
    token_file: Path | None = None
    # TLS for the public API (server certificate chain and key, PEM); None: plaintext (loopback only with tokens).
    api_tls_cert: Path | None = None
    api_tls_key: Path | None = None
    captures: CaptureSettings = field(default_factory=CaptureSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)


def check_exposure(settings: ControllerSettings) -> None:
    """Refuses configurations that would expose captures or credentials: no authentication beyond loopback,
    bearer tokens in plaintext beyond loopback."""
    loopback = _is_loopback(settings.listen)
    if settings.auth == "none" and not loopback:
        raise ValueError(
            f"refusing to serve {settings.listen} without authentication: --no-auth is for loopback addresses "
            "only; use --auth-tokens FILE or --auth-kubernetes"
        )
    if settings.auth != "none" and settings.api_tls_cert is None and not loopback:
        raise ValueError(
            f"refusing to accept bearer tokens in plaintext on {settings.listen}: give --tls-cert and --tls-key"
        )


def _is_loopback(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_access(settings: ControllerSettings) -> tuple[Authenticator, Authorizer]:
    """The authenticator and authorizer `settings.auth` names."""
    if settings.auth == "tokens":
        from ._tokens import TokenFile

        if settings.token_file is None:
            raise ValueError("token authentication needs a token file")
        tokens = TokenFile.load(settings.token_file)
        return tokens, tokens
    if settings.auth == "kubernetes":
        from ._kube import KubernetesAccess

        access = (
            KubernetesAccess.from_kubeconfig(settings.kubeconfig)
            if settings.kubeconfig is not None
            else KubernetesAccess.in_cluster()
        )
        return access, access
    if settings.auth != "none":
        raise ValueError(f"unknown authentication {settings.auth!r}: none, tokens or kubernetes")
    log.warning("no authentication: every caller is 'anonymous' and may do anything (loopback only)")
    nobody = NoAuthentication()
    return nobody, nobody


def api_credentials(settings: ControllerSettings) -> grpc.ServerCredentials | None:
    """TLS for the public API when a certificate is configured (clients are not asked for one)."""
    if settings.api_tls_cert is None or settings.api_tls_key is None:
        return None
    chain, key = settings.api_tls_cert.read_bytes(), settings.api_tls_key.read_bytes()
    return grpc.ssl_server_credentials([(key, chain)])


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
    check_exposure(settings)
    authenticator, authorizer = build_access(settings)
    credentials = api_credentials(settings)
    engine = create_engine_for(settings.db_url)
    await asyncio.to_thread(migrate, engine)
    sessions = make_sessionmaker(engine)
    access = AccessControl(authenticator, authorizer, sessions)
    agents = AgentClients(
        call_timeout=settings.agent_call_timeout,
        tls=settings.agent_tls,
        server_name=settings.agent_server_name,
    )
    inventory = build_inventory(settings)
    captures = Captures(
        sessions=sessions,
        inventory=inventory,
        agents=agents,
        store=open_store(settings.store_url),
        access=access,
        settings=settings.captures,
    )
    diagnoses = Diagnoses(captures, inventory, agents, access, settings.captures.caps)
    server = grpc.aio.server(interceptors=[RejectMalformed()], options=server_options())
    capture_pb2_grpc.add_CaptureServiceServicer_to_server(
        CaptureServicer(captures, access, diagnoses), server
    )
    health = Health(server, SERVICE_NAME)
    listen(server, settings.listen, credentials)
    await server.start()
    await captures.start()
    sweeper = RetentionSweeper(sessions, open_store(settings.store_url), settings.retention)
    sweeper.start()
    await health.serving(True)
    # Everything built so far lives as long as the process: keep it out of the collector's full passes, which
    # otherwise cost tens of milliseconds each on a loaded node (see docs/bench.md, ListCaptures).
    gc.freeze()
    log.info("controller listening on %s", settings.listen)
    if started is not None:
        started.set()
    try:
        await until_signalled()
        log.info("shutting down: refusing new calls, finishing those in flight for up to 5 s")
    finally:
        await health.serving(False)
        await server.stop(grace=5)
        await sweeper.close()
        await captures.close()
        await agents.close()
        engine.dispose()
