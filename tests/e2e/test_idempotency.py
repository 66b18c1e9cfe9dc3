"""CreateCapture is safe to retry: the same request_id from the same caller is the same capture, also when 50
retries race each other, and exactly one tcpdump runs on the node for it."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from podcap.api.v1 import agent_pb2, agent_pb2_grpc, capture_pb2, capture_pb2_grpc
from tests.e2e.conftest import Stack

pytestmark = pytest.mark.netns


def _request(**overrides: object) -> capture_pb2.CreateCaptureRequest:
    body: dict[str, object] = {
        "namespace": "shop",
        "pod": "server",
        "filter": "tcp port 8080",
        "duration": Duration(seconds=600),
        "request_id": "ticket-4711-retry",
    }
    body.update(overrides)
    return capture_pb2.CreateCaptureRequest(**body)  # type: ignore[arg-type]


def test_fifty_concurrent_retries_make_one_capture(stack: Stack) -> None:
    with grpc.insecure_channel(stack.server) as channel:
        stub = capture_pb2_grpc.CaptureServiceStub(channel)
        with ThreadPoolExecutor(max_workers=50) as pool:
            answers = list(pool.map(lambda _: stub.CreateCapture(_request(), timeout=30), range(50)))
        ids = {answer.id for answer in answers}
        assert len(ids) == 1
        (capture_id,) = ids

        with grpc.insecure_channel(stack.agents[stack.lab.pods["server"].node]) as agent_channel:
            on_node = agent_pb2_grpc.AgentServiceStub(agent_channel).ListCaptures(
                agent_pb2.ListAgentCapturesRequest(), timeout=10
            )
        assert [c.capture_id for c in on_node.captures] == [f"{capture_id}-0"]

        listed = stub.ListCaptures(capture_pb2.ListCapturesRequest(namespace="shop"), timeout=10).captures
        assert [c.id for c in listed] == [capture_id]

        with pytest.raises(grpc.RpcError) as different:
            stub.CreateCapture(_request(filter="udp port 53"), timeout=30)
        assert different.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "ticket-4711-retry" in different.value.details()
        stub.StopCapture(capture_pb2.StopCaptureRequest(id=capture_id), timeout=10)
