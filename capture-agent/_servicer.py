"""AgentService over gRPC: parses requests, calls the CaptureManager, builds responses. Nothing else."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

import grpc

from podcap.api.serving import timestamp
from podcap.api.status import ErrorTable, maps_errors, maps_stream_errors
from podcap.api.v1 import agent_pb2, agent_pb2_grpc, common_pb2

from ._captures import CaptureManager
from ._context import DeviceCounters, NetworkContext
from ._errors import (
    AgentError,
    CaptureError,
    HostNetworkPod,
    InvalidCaptureRequest,
    MissingPrivilege,
    NodeLimitReached,
    PcapGone,
    PodNotOnNode,
    UncapturablePod,
    UnknownCapture,
)
from ._model import CaptureSnapshot, CaptureSpec, JobState
from ._probe import Target, check_probe, probe
from ._resolve import Interface, Resolution
from ._summary import Summary, SummaryState
from ._validation import check_capture_id, check_filter, check_pod, check_start

Context = grpc.aio.ServicerContext[Any, Any]

ERRORS: ErrorTable = {
    InvalidCaptureRequest: grpc.StatusCode.INVALID_ARGUMENT,
    UnknownCapture: grpc.StatusCode.NOT_FOUND,
    PodNotOnNode: grpc.StatusCode.NOT_FOUND,
    HostNetworkPod: grpc.StatusCode.FAILED_PRECONDITION,
    UncapturablePod: grpc.StatusCode.FAILED_PRECONDITION,
    MissingPrivilege: grpc.StatusCode.FAILED_PRECONDITION,
    PcapGone: grpc.StatusCode.FAILED_PRECONDITION,
    NodeLimitReached: grpc.StatusCode.RESOURCE_EXHAUSTED,
    CaptureError: grpc.StatusCode.INTERNAL,
    AgentError: grpc.StatusCode.INTERNAL,
}
"""The agent's one table from its exception tree to gRPC status codes."""

_STATES = {
    JobState.RUNNING: common_pb2.CAPTURE_STATE_RUNNING,
    JobState.UPLOADING: common_pb2.CAPTURE_STATE_UPLOADING,
    JobState.COMPLETED: common_pb2.CAPTURE_STATE_COMPLETED,
    JobState.FAILED: common_pb2.CAPTURE_STATE_FAILED,
    JobState.CANCELLED: common_pb2.CAPTURE_STATE_CANCELLED,
}
# What a Probe keeps of its caller's deadline to send the answer in.
_ANSWER_S = 0.2
_SUMMARY_STATES = {
    SummaryState.PENDING: common_pb2.SUMMARY_STATE_PENDING,
    SummaryState.READY: common_pb2.SUMMARY_STATE_READY,
    SummaryState.INCOMPLETE: common_pb2.SUMMARY_STATE_INCOMPLETE,
}


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):
    def __init__(self, captures: CaptureManager) -> None:
        self._captures = captures

    @maps_errors(ERRORS)
    async def StartCapture(
        self, request: agent_pb2.StartCaptureRequest, context: Context
    ) -> agent_pb2.AgentCapture:
        check_start(
            request.capture_id,
            request.pod.ips,
            request.pod_interface,
            request.object_key,
            request.limits.max_packets,
        )
        await asyncio.to_thread(check_filter, request.filter)
        spec = CaptureSpec(
            capture_id=request.capture_id,
            pod_ips=tuple(request.pod.ips),
            filter=request.filter,
            duration_s=request.duration.ToTimedelta().total_seconds(),
            object_key=request.object_key,
            max_packets=request.limits.max_packets,
            max_bytes=request.limits.max_bytes,
            snaplen=request.limits.snaplen,
            pod_interface=request.pod_interface,
            host_network=request.host_network,
            buffer_size=request.limits.buffer_size,
        )
        return _capture(await self._captures.start(spec))

    @maps_errors(ERRORS)
    async def StopCapture(
        self, request: agent_pb2.AgentCaptureRef, context: Context
    ) -> agent_pb2.AgentCapture:
        check_capture_id(request.capture_id)
        return _capture(await self._captures.stop(request.capture_id))

    @maps_errors(ERRORS)
    async def GetCapture(
        self, request: agent_pb2.AgentCaptureRef, context: Context
    ) -> agent_pb2.AgentCapture:
        check_capture_id(request.capture_id)
        return _capture(self._captures.get(request.capture_id))

    @maps_stream_errors(ERRORS)
    async def WatchCapture(
        self, request: agent_pb2.AgentCaptureRef, context: Context
    ) -> AsyncIterator[agent_pb2.AgentCapture]:
        check_capture_id(request.capture_id)
        async for snapshot in self._captures.watch(request.capture_id):
            yield _capture(snapshot)

    @maps_stream_errors(ERRORS)
    async def StreamPcap(
        self, request: agent_pb2.AgentCaptureRef, context: Context
    ) -> AsyncIterator[agent_pb2.PcapChunk]:
        check_capture_id(request.capture_id)
        async for chunk in self._captures.stream(request.capture_id):
            yield agent_pb2.PcapChunk(data=chunk)

    @maps_errors(ERRORS)
    async def ListCaptures(
        self, request: agent_pb2.ListAgentCapturesRequest, context: Context
    ) -> agent_pb2.ListAgentCapturesResponse:
        return agent_pb2.ListAgentCapturesResponse(captures=[_capture(s) for s in self._captures.all()])

    @maps_errors(ERRORS)
    async def ResolvePod(
        self, request: agent_pb2.ResolvePodRequest, context: Context
    ) -> common_pb2.Resolution:
        check_pod(request.pod.ips, request.pod_interface)
        return _resolution(
            await asyncio.to_thread(self._captures.resolve, tuple(request.pod.ips), request.pod_interface)
        )

    @maps_errors(ERRORS)
    async def Probe(self, request: agent_pb2.ProbeRequest, context: Context) -> agent_pb2.ProbeResponse:
        check_pod(request.pod.ips, "")
        spec = check_probe(
            request.host,
            request.port,
            [Target(a.step, a.label, a.address, a.port) for a in request.also],
            request.timeout.seconds,
            request.timeout.nanos,
        )
        resolution = await asyncio.to_thread(self._captures.resolve, tuple(request.pod.ips))
        # The caller's deadline bounds the whole ladder, less a moment to answer in.
        remaining = context.time_remaining()
        budget = None if remaining is None else max(0.0, remaining - _ANSWER_S)
        steps = await asyncio.to_thread(probe, resolution.netns, spec, budget)
        return agent_pb2.ProbeResponse(
            steps=[
                common_pb2.DiagnoseStep(name=s.name, ok=s.ok, detail=s.detail, milliseconds=s.milliseconds)
                for s in steps
            ]
        )

    @maps_errors(ERRORS)
    async def ListInterfaces(
        self, request: agent_pb2.ListInterfacesRequest, context: Context
    ) -> agent_pb2.ListInterfacesResponse:
        return agent_pb2.ListInterfacesResponse(
            interfaces=[_interface(i) for i in self._captures.interfaces()]
        )


def _resolution(r: Resolution) -> common_pb2.Resolution:
    return common_pb2.Resolution(
        interface=r.interface,
        ifindex=r.ifindex,
        strategy=r.strategy,
        netns=r.netns,
        pod_interface=r.pod_interface,
        pod_ifindex=r.pod_ifindex,
        pod_mac=r.pod_mac,
        pod_ip=r.pod_ip,
        host_mac=r.host_mac,
    )


def _interface(i: Interface) -> agent_pb2.Interface:
    return agent_pb2.Interface(
        name=i.name,
        ifindex=i.ifindex,
        kind=i.kind,
        mac=i.mac,
        addresses=list(i.addresses),
        peer_ifindex=i.peer_ifindex or 0,
    )


def _capture(s: CaptureSnapshot) -> agent_pb2.AgentCapture:
    return agent_pb2.AgentCapture(
        capture_id=s.spec.capture_id,
        state=_STATES[s.state],
        resolution=_resolution(s.resolution),
        stats=common_pb2.CaptureStats(
            packets=s.stats.packets,
            packets_received=s.stats.packets_received,
            kernel_drops=s.stats.kernel_drops,
            bytes=s.size,
            kernel_drops_unknown=not s.stats.drops_known,
        ),
        object_key=s.spec.object_key,
        sha256=s.sha256,
        error=s.error,
        start_time=timestamp(s.started_at),
        end_time=timestamp(s.ended_at),
        summary=_summary(s.summary) if s.summary is not None else None,
        interruption=s.interruption,
        context=_context(s.context) if s.context is not None else None,
    )


def _context(c: NetworkContext) -> common_pb2.NetworkContext:
    def counters(d: DeviceCounters | None) -> common_pb2.DeviceCounters | None:
        return common_pb2.DeviceCounters(**asdict(d)) if d is not None else None

    conntrack = c.conntrack
    return common_pb2.NetworkContext(
        object_key=c.object_key,
        start_time=timestamp(c.start_time),
        end_time=timestamp(c.end_time),
        pod_addresses=c.pod_addresses,
        pod_routes=c.pod_routes,
        pod_neighbours=c.pod_neighbours,
        pod_device_start=counters(c.pod_device_start),
        pod_device_end=counters(c.pod_device_end),
        host_device_start=counters(c.host_device_start),
        host_device_end=counters(c.host_device_end),
        conntrack=common_pb2.Conntrack(**asdict(conntrack)) if conntrack is not None else None,
        nat_rules=c.nat_rules,
        ipvs=c.ipvs,
        sources=[common_pb2.ContextSource(name=x.name, ok=x.ok, detail=x.detail) for x in c.sources],
        warnings=c.warnings,
    )


def _summary(summary: Summary) -> common_pb2.CaptureSummary:
    return common_pb2.CaptureSummary(
        packets=summary.packets,
        bytes=summary.bytes,
        first_packet_time=timestamp(summary.first_packet_time),
        last_packet_time=timestamp(summary.last_packet_time),
        protocols=[
            common_pb2.ProtocolCount(protocol=p.protocol, frames=p.frames, bytes=p.bytes)
            for p in summary.protocols
        ],
        conversations=[
            common_pb2.Conversation(
                protocol=c.protocol,
                endpoint_a=c.endpoint_a,
                endpoint_b=c.endpoint_b,
                frames=c.frames,
                bytes=c.bytes,
            )
            for c in summary.conversations
        ],
        tcp_resets=summary.tcp_resets,
        tcp_retransmissions=summary.tcp_retransmissions,
        dns_errors=summary.dns_errors,
        error=summary.error,
        state=_SUMMARY_STATES[summary.state],
        tcp_attempts=[
            common_pb2.TcpAttempt(
                client=a.client,
                server=a.server,
                first_syn_time=timestamp(a.first_syn_time),
                syns=a.syns,
                syn_acks=a.syn_acks,
                server_reset=a.server_reset,
                client_reset=a.client_reset,
                established=a.established,
                retransmissions=a.retransmissions,
            )
            for a in summary.tcp_attempts
        ],
        dns_queries=[
            common_pb2.DnsQuery(
                client=q.client,
                server=q.server,
                id=q.id,
                name=q.name,
                type=q.type,
                first_query_time=timestamp(q.first_query_time),
                queries=q.queries,
                answered=q.answered,
                rcode=q.rcode,
            )
            for q in summary.dns_queries
        ],
        exchanges_truncated=summary.exchanges_truncated,
    )
