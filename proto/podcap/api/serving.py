"""What both podcap servers do alike around their own service: listen, report grpc.health.v1, wait for
SIGTERM/SIGINT, and put times on the wire. The controller and the agent share nothing but podcap.api, so the
common part lives here."""

from __future__ import annotations

import asyncio
import signal
from datetime import datetime

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


class Health:
    """grpc.health.v1 for the server as a whole ("") and for its one service."""

    def __init__(self, server: grpc.aio.Server, service_name: str) -> None:
        self._servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]  # the stubs lack grpc_health.v1.aio
        self._names = ("", service_name)
        health_pb2_grpc.add_HealthServicer_to_server(self._servicer, server)

    async def serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in self._names:
            await self._servicer.set(name, status)


def listen(server: grpc.aio.Server, address: str) -> None:
    """Binds `address` (HOST:PORT) or says clearly that it cannot."""
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot listen on {address}")


async def until_signalled() -> None:
    """Returns on the first SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


def timestamp(when: datetime | None) -> Timestamp | None:
    """A protobuf Timestamp, or None (the field stays unset) for an unknown time."""
    if when is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(when)
    return stamp
