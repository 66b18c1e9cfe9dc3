"""The controller's client of the node agents: one gRPC channel per agent address, a deadline on every call, and
the agents' status codes turned back into the controller's own errors.

Agents are reached by pod IP, so with mutual TLS the agent's certificate is checked against a fixed name
(`server_name`, e.g. podcap-agent) rather than the address. A unary call that gets no answer ends at its
deadline (DEADLINE_EXCEEDED, reported as the agent being unreachable); the long WatchCapture stream has no
deadline, and the channel's keepalive pings (podcap.api.serving) end it with UNAVAILABLE when the agent stops
answering.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import grpc
from google.protobuf.duration_pb2 import Duration

from podcap.api.serving import TlsFiles, channel_credentials, open_channel
from podcap.api.v1 import agent_pb2, agent_pb2_grpc, common_pb2

from ._errors import ControllerError, InvalidRequest, LimitExceeded, NotFound, Unavailable, WrongState

AgentCapture = agent_pb2.AgentCapture


class AgentFailed(ControllerError):
    """The agent answered, but could not do what was asked (tcpdump failed, say)."""


class CaptureUnknownToAgent(NotFound):
    """The agent has no record of the capture (it restarted and lost it)."""


class AgentRefused(ControllerError):
    """The agent answered StartCapture with a refusal, so nothing was started on the node: bad input, a pod the
    node cannot capture, a node at its limit. The message is the agent's own words; `for_caller()` is the error
    the caller gets, with the status code that says whether to correct the request or retry it."""

    def __init__(self, words: str, kind: type[ControllerError], node: str = "") -> None:
        super().__init__(words)
        self.kind = kind
        self.node = node

    def on(self, node: str) -> AgentRefused:
        return AgentRefused(str(self), self.kind, node)

    def for_caller(self) -> ControllerError:
        retry = "; retry when one of its captures has ended" if self.kind is LimitExceeded else ""
        return self.kind(f"node {self.node or '?'}: {self}{retry}")


_CODES: dict[grpc.StatusCode, type[ControllerError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: WrongState,
    grpc.StatusCode.RESOURCE_EXHAUSTED: LimitExceeded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: Unavailable,
}


def _error(address: str, error: grpc.aio.AioRpcError) -> ControllerError:
    code = error.code()
    cls = _CODES.get(code, AgentFailed)
    if cls is Unavailable:
        return Unavailable(f"capture agent at {address} unreachable: {error.details() or code.name}")
    return cls(f"capture agent at {address}: {error.details() or code.name}")


# What StartCapture answers when the agent refused before starting anything: the request or the node's state, to be
# corrected or retried by the caller, never a failed capture.
_REFUSALS = frozenset(
    (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
)


def _start_error(address: str, error: grpc.aio.AioRpcError) -> ControllerError:
    if error.code() not in _REFUSALS:
        return _error(address, error)
    return AgentRefused(error.details() or error.code().name, _CODES[error.code()])


class AgentClients:
    """Channels to the agents, opened on first use and kept; mutual TLS with `tls`, else plaintext."""

    def __init__(
        self, call_timeout: float = 15.0, tls: TlsFiles | None = None, server_name: str = "podcap-agent"
    ) -> None:
        self._call_timeout = call_timeout
        # Read once, now: a missing or broken PEM file fails the controller's start, not the first capture.
        self._credentials = channel_credentials(tls) if tls is not None else None
        self._server_name = server_name
        self._stubs: dict[str, tuple[grpc.aio.Channel, agent_pb2_grpc.AgentServiceAsyncStub]] = {}

    def _stub(self, address: str) -> agent_pb2_grpc.AgentServiceAsyncStub:
        if address not in self._stubs:
            channel = open_channel(address, self._credentials, self._server_name)
            self._stubs[address] = (channel, agent_pb2_grpc.AgentServiceStub(channel))
        return self._stubs[address][1]

    async def start(
        self,
        address: str,
        capture_id: str,
        pod: agent_pb2.PodRef,
        filter_expr: str,
        duration: timedelta,
        limits: common_pb2.CaptureLimits,
        object_key: str,
        pod_interface: str = "",
        host_network: bool = False,
    ) -> AgentCapture:
        request = agent_pb2.StartCaptureRequest(
            capture_id=capture_id,
            pod=pod,
            filter=filter_expr,
            duration=Duration(seconds=int(duration.total_seconds()), nanos=duration.microseconds * 1000),
            limits=limits,
            object_key=object_key,
            pod_interface=pod_interface,
            host_network=host_network,
        )
        try:
            return await self._stub(address).StartCapture(request, timeout=self._call_timeout)
        except grpc.aio.AioRpcError as exc:
            raise _start_error(address, exc) from exc

    async def stop(self, address: str, capture_id: str) -> AgentCapture:
        try:
            ref = agent_pb2.AgentCaptureRef(capture_id=capture_id)
            return await self._stub(address).StopCapture(ref, timeout=self._call_timeout)
        except grpc.aio.AioRpcError as exc:
            raise _error(address, exc) from exc

    async def watch(self, address: str, capture_id: str) -> AsyncIterator[AgentCapture]:
        """Snapshots until the terminal one. No deadline, since a capture may run for its whole duration: the
        channel's keepalive ends the stream with UNAVAILABLE when the agent stops answering pings."""
        call = self._stub(address).WatchCapture(agent_pb2.AgentCaptureRef(capture_id=capture_id))
        try:
            async for snapshot in call:
                yield snapshot
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise CaptureUnknownToAgent(
                    f"capture agent at {address} has no capture {capture_id}"
                ) from exc
            raise _error(address, exc) from exc
        finally:
            call.cancel()

    async def stream_pcap(self, address: str, capture_id: str) -> AsyncIterator[bytes]:
        """The capture's pcap as the agent's tcpdump writes it, until it is complete. No deadline (it lasts as
        long as the capture); the gRPC stream's flow control paces the agent to the reader."""
        call = self._stub(address).StreamPcap(agent_pb2.AgentCaptureRef(capture_id=capture_id))
        try:
            async for chunk in call:
                yield chunk.data
        except grpc.aio.AioRpcError as exc:
            raise _error(address, exc) from exc
        finally:
            call.cancel()

    async def probe(
        self,
        address: str,
        pod: agent_pb2.PodRef,
        host: str,
        port: int,
        also: list[agent_pb2.ProbeAddress],
        deadline: float,
    ) -> list[common_pb2.DiagnoseStep]:
        """The agent's ladder from inside the pod's netns. `deadline` (seconds) bounds the whole ladder as well
        as the call: the agent ends its steps in time to answer within it."""
        request = agent_pb2.ProbeRequest(pod=pod, host=host, port=port, also=also)
        try:
            response = await self._stub(address).Probe(request, timeout=deadline)
        except grpc.aio.AioRpcError as exc:
            raise _error(address, exc) from exc
        return list(response.steps)

    async def close(self) -> None:
        for channel, _ in self._stubs.values():
            await channel.close(grace=None)
        self._stubs.clear()
