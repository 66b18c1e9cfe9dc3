"""Requests a node refuses, seen from the caller: the status code says whether to correct the request or retry it,
the message says what the pod or the node has, and a refused request leaves no capture behind in the list."""

from __future__ import annotations

import asyncio
import json
import subprocess

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf.duration_pb2 import Duration

from podcap.api.v1 import capture_pb2, capture_pb2_grpc
from tests.e2e.conftest import Stack
from tests.support.processes import cli

pytestmark = pytest.mark.netns


def _capture(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return cli(["capture", "shop/server", "--duration", "30s", "-o", "json", *args], stack.server)


def _listed(stack: Stack) -> list[dict[str, object]]:
    listed: list[dict[str, object]] = json.loads(cli(["list", "-o", "json"], stack.server).stdout)
    return listed


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (["--interface", "lo"], "INVALID_ARGUMENT", "eth0"),
        (["--interface", "net7"], "INVALID_ARGUMENT", "eth0"),
        (["--host-network"], "FAILED_PRECONDITION", "not a hostNetwork pod"),
    ],
)
def test_a_request_the_pod_cannot_serve_is_bad_input_not_internal(
    stack: Stack, args: list[str], code: str, says: str
) -> None:
    refused = _capture(stack, *args)
    assert refused.returncode != 0
    assert refused.stderr.startswith(f"podcap: {code}:"), refused.stderr
    assert says in refused.stderr
    assert "/proc/" not in refused.stderr and "/run/netns" not in refused.stderr
    assert _listed(stack) == []


def test_a_busy_node_answers_resource_exhausted_and_leaves_nothing_behind(stack: Stack) -> None:
    async def burst(n: int) -> list[capture_pb2.Capture | grpc.aio.AioRpcError]:
        async with grpc.aio.insecure_channel(stack.server) as channel:
            stub = capture_pb2_grpc.CaptureServiceStub(channel)
            request = capture_pb2.CreateCaptureRequest(
                namespace="shop", pod="server", duration=Duration(seconds=30)
            )
            return await asyncio.gather(
                *(stub.CreateCapture(request, timeout=60) for _ in range(n)), return_exceptions=True
            )

    outcomes = asyncio.run(burst(12))  # the agent runs at most 8 at once (its default)
    started = [o for o in outcomes if isinstance(o, capture_pb2.Capture)]
    refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(started) == 8 and len(refused) == 4, outcomes
    for error in refused:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
        assert "8 captures (at most 8)" in (error.details() or "")
    assert sorted(c["id"] for c in _listed(stack)) == sorted(c.id for c in started)
    engine = sa.create_engine(stack.db_url)
    try:
        with engine.connect() as conn:
            results = conn.execute(
                sa.text("SELECT result FROM audit_events WHERE action = 'capture'")
            ).scalars()
            counted = sorted(results)
    finally:
        engine.dispose()
    assert counted.count("refused") == 4
    for capture in started:
        cli(["stop", capture.id], stack.server)
