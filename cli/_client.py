"""The CLI's connection to the controller: CaptureService calls with deadlines, errors as the server said them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType

import grpc
from google.protobuf.duration_pb2 import Duration

from podcap.api.serving import channel_options
from podcap.api.v1 import capture_pb2, capture_pb2_grpc, common_pb2

_CALL_TIMEOUT_S = 30.0


class ClientError(Exception):
    """A failed call, with the server's status code and message."""


def _error(exc: grpc.aio.AioRpcError) -> ClientError:
    return ClientError(f"{exc.code().name}: {exc.details()}")


def _state_name(state: int) -> str:
    return common_pb2.CaptureState.Name(state).removeprefix("CAPTURE_STATE_")  # type: ignore[arg-type]


TERMINAL = frozenset(
    (common_pb2.CAPTURE_STATE_COMPLETED, common_pb2.CAPTURE_STATE_FAILED, common_pb2.CAPTURE_STATE_CANCELLED)
)


class Connection:
    running = common_pb2.CAPTURE_STATE_RUNNING
    completed = common_pb2.CAPTURE_STATE_COMPLETED
    failed = common_pb2.CAPTURE_STATE_FAILED

    def __init__(self, server: str, token: str = "", tls: bool = False, ca: Path | None = None) -> None:
        """`token` is sent as `authorization: Bearer TOKEN`; with `tls` (implied by `ca`) the controller must
        present a certificate signed by `ca`, or by a system-trusted CA when no `ca` is given."""
        if tls or ca is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes() if ca else None)
            self._channel = grpc.aio.secure_channel(server, credentials, options=channel_options())
        else:
            self._channel = grpc.aio.insecure_channel(server, options=channel_options())
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._stub = capture_pb2_grpc.CaptureServiceStub(self._channel)
        self._server = server

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._channel.close(grace=None)

    async def create(
        self,
        namespace: str,
        pod: str,
        filter_expr: str,
        duration: timedelta,
        max_packets: int,
        max_bytes: int,
        snaplen: int,
        buffer_size: int,
        reason: str,
        request_id: str,
        label_selector: str = "",
        pod_interface: str = "",
        host_network: bool = False,
        between: Sequence[tuple[str, str, str]] = (),
    ) -> capture_pb2.Capture:
        """`between`: (namespace, pod, service) per end, instead of `pod` and `label_selector`."""
        proto_duration = Duration()
        proto_duration.FromTimedelta(duration)
        request = capture_pb2.CreateCaptureRequest(
            namespace=namespace,
            pod=pod,
            filter=filter_expr,
            duration=proto_duration,
            limits=common_pb2.CaptureLimits(
                max_packets=max_packets, max_bytes=max_bytes, snaplen=snaplen, buffer_size=buffer_size
            ),
            reason=reason,
            request_id=request_id,
            label_selector=label_selector,
            pod_interface=pod_interface,
            host_network=host_network,
            between=[
                capture_pb2.CaptureEnd(namespace=namespace, pod=pod, service=service)
                for namespace, pod, service in between
            ],
        )
        try:
            return await self._stub.CreateCapture(request, timeout=_CALL_TIMEOUT_S, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from exc

    async def get(self, capture_id: str) -> capture_pb2.Capture:
        try:
            return await self._stub.GetCapture(
                capture_pb2.GetCaptureRequest(id=capture_id),
                timeout=_CALL_TIMEOUT_S,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from exc

    async def list(
        self,
        namespace: str,
        pod: str,
        state: str,
        limit: int,
        requester: str = "",
        since: timedelta | None = None,
    ) -> list[capture_pb2.Capture]:
        """Newest first, following next_page_token until `limit` captures are in hand."""
        state_value = 0
        if state:
            try:
                state_value = common_pb2.CaptureState.Value(f"CAPTURE_STATE_{state.upper()}")
            except ValueError:
                raise ClientError(f"unknown state {state!r}") from None
        request = capture_pb2.ListCapturesRequest(
            namespace=namespace,
            pod=pod,
            state=state_value,  # type: ignore[arg-type]
            page_size=min(limit, 500),
            requester=requester,
        )
        if since is not None:
            request.created_after.FromDatetime(datetime.now(UTC) - since)
        captures: list[capture_pb2.Capture] = []
        while len(captures) < limit:
            try:
                response = await self._stub.ListCaptures(
                    request, timeout=_CALL_TIMEOUT_S, metadata=self._metadata
                )
            except grpc.aio.AioRpcError as exc:
                raise _error(exc) from exc
            captures.extend(response.captures)
            if not response.next_page_token:
                break
            request.page_token = response.next_page_token
        return captures[:limit]

    async def watch(self, capture_id: str) -> AsyncIterator[capture_pb2.Capture]:
        """Every snapshot WatchCapture sends, until the capture is settled: ended, and each pod's summary in."""
        try:
            async for capture in self._stub.WatchCapture(
                capture_pb2.WatchCaptureRequest(id=capture_id), metadata=self._metadata
            ):
                yield capture
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from exc

    async def stop(self, capture_id: str) -> capture_pb2.Capture:
        try:
            return await self._stub.StopCapture(
                capture_pb2.StopCaptureRequest(id=capture_id),
                timeout=_CALL_TIMEOUT_S,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from exc

    async def delete(self, capture_id: str) -> None:
        try:
            await self._stub.DeleteCapture(
                capture_pb2.DeleteCaptureRequest(id=capture_id),
                timeout=_CALL_TIMEOUT_S,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from exc

    async def list_pods(self, namespace: str = "") -> Sequence[capture_pb2.PodInfo]:
        """The running pods the caller may capture, in `namespace` or (empty) in every namespace."""
        try:
            response = await self._stub.ListPods(
                capture_pb2.ListPodsRequest(namespace=namespace),
                timeout=_CALL_TIMEOUT_S,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from exc
        return list(response.pods)

    async def diagnose(
        self, namespace: str, pod: str, host: str, port: int, duration: timedelta, reason: str = ""
    ) -> capture_pb2.DiagnoseResponse:
        """The ladder from inside the pod; the call lasts about as long as the capture it starts."""
        capture_duration = Duration()
        capture_duration.FromTimedelta(duration)
        request = capture_pb2.DiagnoseRequest(
            namespace=namespace,
            pod=pod,
            host=host,
            port=port,
            capture_duration=capture_duration,
            reason=reason,
        )
        try:
            return await self._stub.Diagnose(
                request, timeout=_CALL_TIMEOUT_S + duration.total_seconds(), metadata=self._metadata
            )
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from exc

    async def download_url(self, capture_id: str, target: int) -> str:
        request = capture_pb2.GetDownloadUrlRequest(id=capture_id, target=target)
        try:
            response = await self._stub.GetDownloadUrl(
                request, timeout=_CALL_TIMEOUT_S, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from exc
        return response.url

    async def stream_packets(self, capture_id: str, target: int = 0) -> AsyncIterator[bytes]:
        """One target's pcap while it is captured, from its file header on, ending once the pcap is complete."""
        request = capture_pb2.StreamPacketsRequest(id=capture_id, target=target)
        try:
            async for chunk in self._stub.StreamPackets(request, metadata=self._metadata):
                yield chunk.data
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from exc

    async def download(self, capture_id: str, target: int) -> AsyncIterator[bytes]:
        """The pcap of one target, streamed by the controller, in the chunks it sends."""
        request = capture_pb2.DownloadCaptureRequest(id=capture_id, target=target)
        try:
            async for chunk in self._stub.DownloadCapture(request, metadata=self._metadata):
                yield chunk.data
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from exc
