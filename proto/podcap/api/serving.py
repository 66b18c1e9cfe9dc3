"""What both podcap servers do alike around their own service: listen (plaintext or mutual TLS), report
grpc.health.v1, wait for SIGTERM/SIGINT, and put times on the wire; and what every podcap channel shares:
keepalive and message-size limits. The controller and the agent share nothing but podcap.api, so the common
part lives here, and the transport settings of servers and channels are written once so they cannot drift
apart (a client pinging more often than its server allows is cut off with "too_many_pings").

Keepalive is what turns a silent peer into an error: a WatchCapture stream has no deadline (a capture may
run for an hour), so without pings a node that vanished, or an agent that hangs, would leave the controller
waiting on a TCP connection that nobody will ever close.
"""

from __future__ import annotations

import asyncio
import inspect
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

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


# Messages are small (DownloadCapture streams 1 MiB chunks): anything bigger is hostile or a bug.
MAX_MESSAGE_BYTES = 4 << 20
# A client pings an idle connection every 20 s and gives the peer 10 s to answer: a dead agent (or controller)
# is noticed within ~30 s, well inside the controller's 60 s "agent lost" budget.
CLIENT_KEEPALIVE_TIME_MS = 20_000
CLIENT_KEEPALIVE_TIMEOUT_MS = 10_000
# Servers accept pings down to every 10 s (half the clients' interval, so a client is never punished for its
# keepalive), even with no call open, and ping their own clients every minute so that a vanished CLI does
# not keep a WatchCapture stream alive for ever.
SERVER_MIN_PING_INTERVAL_MS = 10_000
SERVER_KEEPALIVE_TIME_MS = 60_000
SERVER_KEEPALIVE_TIMEOUT_MS = 20_000

Options = list[tuple[str, int | str]]


def server_options() -> Options:
    """The options of every podcap gRPC server (`grpc.aio.server(options=...)`)."""
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", SERVER_KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", SERVER_KEEPALIVE_TIMEOUT_MS),
        ("grpc.http2.ping_timeout_ms", SERVER_KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", SERVER_MIN_PING_INTERVAL_MS),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def channel_options(server_name: str = "") -> Options:
    """The options of every podcap channel; `server_name` is the name the server's certificate must carry
    when it differs from the address dialled (agents are dialled by pod IP)."""
    options: Options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", CLIENT_KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", CLIENT_KEEPALIVE_TIMEOUT_MS),
        # gRPC fails an unanswered ping only after this (default: a minute), whatever keepalive_timeout says.
        ("grpc.http2.ping_timeout_ms", CLIENT_KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return options


@dataclass(frozen=True)
class TlsFiles:
    """One side of mutual TLS, as PEM files: our certificate chain and key, and the CA that signs the peer."""

    cert: Path
    key: Path
    ca: Path

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(cert, key, ca) PEM bytes; ValueError naming the file when one is missing or not PEM."""
        return (
            _read_pem(self.cert, "certificate", b"-----BEGIN CERTIFICATE-----"),
            _read_pem(self.key, "private key", b"PRIVATE KEY-----"),
            _read_pem(self.ca, "CA certificate", b"-----BEGIN CERTIFICATE-----"),
        )


def _read_pem(path: Path, what: str, marker: bytes) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the TLS {what} {path}: {exc.strerror or exc}") from exc
    if marker not in data:
        raise ValueError(f"the TLS {what} {path} is not PEM (no {marker.decode()!r} in it)")
    return data


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """TLS that also requires the client to present a certificate signed by `files.ca`."""
    cert, key, ca = files.read()
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    """TLS that trusts only servers signed by `files.ca` and presents our own certificate."""
    cert, key, ca = files.read()
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def open_channel(
    address: str, credentials: grpc.ChannelCredentials | None = None, server_name: str = ""
) -> grpc.aio.Channel:
    """A channel with podcap's options: TLS when `credentials` are given, plaintext otherwise."""
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=channel_options())
    return grpc.aio.secure_channel(address, credentials, options=channel_options(server_name))


def listen(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None = None) -> None:
    """Binds `address` (HOST:PORT), over TLS when `credentials` are given, or says clearly that it cannot."""
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"cannot listen on {address}")


# grpc's auth context: the DNS (and other) subject alternative names of the peer's certificate, and its CN.
_SAN_KEY = "x509_subject_alternative_name"
_CN_KEY = "x509_common_name"


def peer_names(auth_context: Mapping[str, Iterable[bytes]]) -> list[str]:
    """The names a verified client certificate vouches for: its subject alternative names, or, only when it
    has none, its common name (RFC 6125: a CN is not looked at once SANs exist)."""
    names = list(auth_context.get(_SAN_KEY) or ()) or list(auth_context.get(_CN_KEY) or ())
    return [name.decode("utf-8", "replace") for name in names]


_Behaviour = Callable[..., Any]


class RequirePeerName(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Refuses every call whose client certificate does not name `name`, with PERMISSION_DENIED.

    Mutual TLS (`server_credentials`) already refused any client without a certificate signed by the trusted
    CA, during the handshake: such a client never reaches a method and sees UNAVAILABLE. This check is the
    second half: the CA may sign other workloads too, so a certificate that is genuine but names someone else
    has authenticated fine and is simply not allowed here: PERMISSION_DENIED, not UNAUTHENTICATED.
    It runs before every method of the server, health included, in this one place.
    """

    def __init__(self, name: str) -> None:
        self._name = name

    async def _check(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        names = peer_names(context.auth_context())
        if self._name not in names:
            shown = ", ".join(names[:4]) or "no name"
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"client certificate names {shown}; only {self._name} may call this server",
            )

    def _guard(self, behaviour: _Behaviour) -> _Behaviour:
        if inspect.isasyncgenfunction(behaviour):

            async def guarded_stream(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                await self._check(context)
                async for item in behaviour(request, context):
                    yield item

            return guarded_stream

        async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await self._check(context)
            result = behaviour(request, context)
            return await result if inspect.isawaitable(result) else result

        return guarded

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler: grpc.RpcMethodHandler[Any, Any] | None = await continuation(handler_call_details)
        if handler is None:  # an unknown method (the stubs say it cannot be): grpc answers UNIMPLEMENTED
            return None  # type: ignore[return-value]
        wrap = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(handler.request_streaming, handler.response_streaming)]
        behaviour = (
            handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
        )
        assert behaviour is not None
        return wrap(
            self._guard(behaviour),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


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
