"""CaptureService over gRPC: parses requests, calls the `Captures` use cases, builds responses.

The table `ERRORS` is the one place where the controller's exceptions become gRPC status codes.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, timedelta
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.duration_pb2 import Duration
from sqlalchemy.exc import TimeoutError as ConnectionPoolTimeout

from podcap.api.serving import timestamp
from podcap.api.status import ErrorTable, maps_errors, maps_stream_errors
from podcap.api.v1 import capture_pb2, capture_pb2_grpc, common_pb2
from podcap.storage import CaptureRow, CaptureState, StorageError, TargetRow

from ._access import AccessControl, Audited, Caller
from ._agents import AgentFailed
from ._captures import Captures, capture_ends, capture_limits
from ._diagnose import DiagnoseRequest, Diagnoses
from ._errors import (
    ControllerError,
    Forbidden,
    InvalidRequest,
    LimitExceeded,
    NotFound,
    Unauthenticated,
    Unavailable,
    WrongState,
)
from ._validation import CaptureEnd, CaptureRequest

Context = grpc.aio.ServicerContext[Any, Any]

ERRORS: ErrorTable = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    WrongState: grpc.StatusCode.FAILED_PRECONDITION,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    Forbidden: grpc.StatusCode.PERMISSION_DENIED,
    LimitExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    StorageError: grpc.StatusCode.UNAVAILABLE,
    # Every pooled database connection stayed busy for the pool's whole timeout: overloaded, try again.
    ConnectionPoolTimeout: grpc.StatusCode.UNAVAILABLE,
    AgentFailed: grpc.StatusCode.INTERNAL,
    ControllerError: grpc.StatusCode.INTERNAL,
}

_STATES = {
    CaptureState.PENDING: common_pb2.CAPTURE_STATE_PENDING,
    CaptureState.RUNNING: common_pb2.CAPTURE_STATE_RUNNING,
    CaptureState.UPLOADING: common_pb2.CAPTURE_STATE_UPLOADING,
    CaptureState.COMPLETED: common_pb2.CAPTURE_STATE_COMPLETED,
    CaptureState.FAILED: common_pb2.CAPTURE_STATE_FAILED,
    CaptureState.CANCELLED: common_pb2.CAPTURE_STATE_CANCELLED,
}
_FROM_PROTO = {value: state for state, value in _STATES.items()}


class CaptureServicer(capture_pb2_grpc.CaptureServiceServicer):
    """Every method first authenticates its caller; the use cases authorise, audit and act."""

    def __init__(self, captures: Captures, access: AccessControl, diagnoses: Diagnoses) -> None:
        self._captures = captures
        self._access = access
        self._diagnoses = diagnoses

    async def _caller(self, context: Context, audited: Audited | None = None) -> Caller:
        authorization = next(
            (str(value) for key, value in context.invocation_metadata() or () if key == "authorization"), ""
        )
        return await self._access.authenticate(authorization, context.peer(), audited)

    @maps_errors(ERRORS)
    async def CreateCapture(
        self, request: capture_pb2.CreateCaptureRequest, context: Context
    ) -> capture_pb2.Capture:
        row = await self._captures.create(
            CaptureRequest(
                namespace=request.namespace,
                pod=request.pod,
                label_selector=request.label_selector,
                filter=request.filter,
                duration=_timedelta(request.duration) if request.HasField("duration") else timedelta(0),
                max_packets=request.limits.max_packets,
                max_bytes=request.limits.max_bytes,
                snaplen=request.limits.snaplen,
                buffer_size=request.limits.buffer_size,
                request_id=request.request_id,
                reason=request.reason,
                pod_interface=request.pod_interface,
                host_network=request.host_network,
                between=tuple(
                    CaptureEnd(namespace=end.namespace, pod=end.pod, service=end.service)
                    for end in request.between
                ),
            ),
            await self._caller(context, Audited.CAPTURE),
        )
        return capture_message(row)

    @maps_errors(ERRORS)
    async def GetCapture(
        self, request: capture_pb2.GetCaptureRequest, context: Context
    ) -> capture_pb2.Capture:
        row = await self._captures.get(request.id, await self._caller(context))
        message = capture_message(row)
        for event in await self._captures.history(row.id):
            target = None if event.target_index is None else row.targets[event.target_index]
            message.history.append(
                capture_pb2.StateChange(
                    state=_STATES[event.state],
                    time=timestamp(event.at),
                    pod=f"{target.namespace}/{target.pod}" if target is not None else "",
                    detail=event.detail,
                )
            )
        return message

    @maps_errors(ERRORS)
    async def ListCaptures(
        self, request: capture_pb2.ListCapturesRequest, context: Context
    ) -> capture_pb2.ListCapturesResponse:
        if request.state and request.state not in _FROM_PROTO:
            raise InvalidRequest(f"unknown state {request.state}")
        created_after = (
            request.created_after.ToDatetime(tzinfo=UTC) if request.HasField("created_after") else None
        )
        created_before = (
            request.created_before.ToDatetime(tzinfo=UTC) if request.HasField("created_before") else None
        )
        if created_after and created_before and created_after > created_before:
            raise InvalidRequest("created_after is later than created_before")
        page = await self._captures.page(
            await self._caller(context),
            namespace=request.namespace,
            pod=request.pod,
            state=_FROM_PROTO.get(request.state),
            page_size=request.page_size,
            page_token=request.page_token,
            requester=request.requester,
            created_after=created_after,
            created_before=created_before,
        )
        return capture_pb2.ListCapturesResponse(
            captures=[capture_message(row) for row in page.captures], next_page_token=page.next_token
        )

    @maps_stream_errors(ERRORS)
    async def WatchCapture(
        self, request: capture_pb2.WatchCaptureRequest, context: Context
    ) -> AsyncIterator[capture_pb2.Capture]:
        async for row in self._captures.watch(request.id, await self._caller(context)):
            yield capture_message(row)

    @maps_errors(ERRORS)
    async def StopCapture(
        self, request: capture_pb2.StopCaptureRequest, context: Context
    ) -> capture_pb2.Capture:
        caller = await self._caller(context, Audited.STOP)
        return capture_message(await self._captures.stop(request.id, caller))

    @maps_errors(ERRORS)
    async def GetDownloadUrl(
        self, request: capture_pb2.GetDownloadUrlRequest, context: Context
    ) -> capture_pb2.GetDownloadUrlResponse:
        caller = await self._caller(context, Audited.DOWNLOAD_URL)
        download = await self._captures.download_url(request.id, request.target, caller)
        return capture_pb2.GetDownloadUrlResponse(
            url=download.url, expire_time=timestamp(download.expires_at), filename=download.filename
        )

    @maps_stream_errors(ERRORS)
    async def DownloadCapture(
        self, request: capture_pb2.DownloadCaptureRequest, context: Context
    ) -> AsyncIterator[capture_pb2.DownloadChunk]:
        caller = await self._caller(context, Audited.DOWNLOAD)
        async for chunk in self._captures.download(request.id, request.target, caller):
            yield capture_pb2.DownloadChunk(data=chunk)

    @maps_errors(ERRORS)
    async def ListPods(
        self, request: capture_pb2.ListPodsRequest, context: Context
    ) -> capture_pb2.ListPodsResponse:
        pods = await self._captures.pods(await self._caller(context), request.namespace)
        return capture_pb2.ListPodsResponse(
            pods=[
                capture_pb2.PodInfo(
                    namespace=pod.namespace,
                    name=pod.name,
                    node=pod.node,
                    pod_ip=pod.ips[0] if pod.ips else "",
                    host_network=pod.host_network,
                )
                for pod in pods
            ]
        )

    @maps_stream_errors(ERRORS)
    async def StreamPackets(
        self, request: capture_pb2.StreamPacketsRequest, context: Context
    ) -> AsyncIterator[capture_pb2.DownloadChunk]:
        caller = await self._caller(context, Audited.STREAM)
        async for chunk in self._captures.stream_packets(request.id, request.target, caller):
            yield capture_pb2.DownloadChunk(data=chunk)

    @maps_errors(ERRORS)
    async def Diagnose(
        self, request: capture_pb2.DiagnoseRequest, context: Context
    ) -> capture_pb2.DiagnoseResponse:
        diagnosis = await self._diagnoses.run(
            DiagnoseRequest(
                namespace=request.namespace,
                pod=request.pod,
                host=request.host,
                port=request.port,
                duration=_timedelta(request.capture_duration)
                if request.HasField("capture_duration")
                else timedelta(0),
                reason=request.reason,
            ),
            await self._caller(context, Audited.DIAGNOSE),
        )
        return capture_pb2.DiagnoseResponse(
            steps=[
                common_pb2.DiagnoseStep(name=s.name, ok=s.ok, detail=s.detail, milliseconds=s.milliseconds)
                for s in diagnosis.steps
            ],
            capture_id=diagnosis.capture_id,
        )

    @maps_errors(ERRORS)
    async def DeleteCapture(
        self, request: capture_pb2.DeleteCaptureRequest, context: Context
    ) -> capture_pb2.DeleteCaptureResponse:
        await self._captures.delete(request.id, await self._caller(context, Audited.DELETE))
        return capture_pb2.DeleteCaptureResponse()


def _timedelta(duration: Duration) -> timedelta:
    return duration.ToTimedelta()


def _target_message(target: TargetRow) -> capture_pb2.CaptureTarget:
    return capture_pb2.CaptureTarget(
        namespace=target.namespace,
        pod=target.pod,
        node=target.node,
        pod_ip=target.pod_ip,
        interface=target.interface,
        state=_STATES[target.state],
        stats=common_pb2.CaptureStats(
            packets=target.packets,
            packets_received=target.packets_received,
            kernel_drops=target.kernel_drops,
            bytes=target.bytes,
            kernel_drops_unknown=target.drops_unknown,
        ),
        object_key=target.object_key,
        sha256=target.sha256,
        error=target.error,
        start_time=timestamp(target.started_at),
        end_time=timestamp(target.ended_at),
        summary=json_format.Parse(target.summary, common_pb2.CaptureSummary()) if target.summary else None,
        resolution=json_format.Parse(target.resolution, common_pb2.Resolution())
        if target.resolution
        else None,
        interruption=target.interruption,
        context=json_format.Parse(target.context, common_pb2.NetworkContext()) if target.context else None,
    )


def capture_message(row: CaptureRow) -> capture_pb2.Capture:
    duration = Duration()
    duration.FromMilliseconds(row.duration_ms)
    return capture_pb2.Capture(
        id=row.id,
        state=_STATES[row.state],
        namespace=row.namespace,
        pod=row.pod,
        label_selector=row.label_selector,
        filter=row.filter,
        duration=duration,
        limits=capture_limits(row),
        requester=row.requester,
        reason=row.reason,
        request_id=row.request_id or "",
        create_time=timestamp(row.created_at),
        start_time=timestamp(row.started_at),
        end_time=timestamp(row.ended_at),
        error=row.error,
        targets=[_target_message(t) for t in row.targets],
        stopped_by=row.stopped_by,
        stop_time=timestamp(row.stopped_at),
        between=[
            capture_pb2.CaptureEnd(namespace=end.namespace, pod=end.pod, service=end.service)
            for end in capture_ends(row)
        ],
        verdicts=[json_format.ParseDict(v, common_pb2.Verdict()) for v in json.loads(row.verdicts or "[]")],
    )
