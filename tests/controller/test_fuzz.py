"""Hostile and broken CreateCapture requests, generated: every one is refused with a status a person can act on
(never UNKNOWN or INTERNAL), nothing is stored for it, and the controller keeps serving.

The budget is modest in CI (PODCAP_FUZZ_EXAMPLES, default 300); raise it locally to search harder.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf.duration_pb2 import Duration
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from podcap.api.v1 import capture_pb2, capture_pb2_grpc, common_pb2
from tests.support.processes import controller, free_port, wait_healthy

EXAMPLES = int(os.environ.get("PODCAP_FUZZ_EXAMPLES", "300"))
HOSTILE = [
    "-z /tmp/evil.sh",
    "tcp port 80 -w /etc/passwd",
    "$(reboot)",
    "`id`",
    "port 80; rm -rf /",
    "port 80\nport 81",
    "port 80\x00",
    "tcp[",
    "port 99999",
    "é",
    "x" * 65536,
]
text = st.one_of(st.sampled_from(HOSTILE), st.text(max_size=300))
names = st.one_of(st.just("shop"), st.just("web-1"), text)


@pytest.fixture(scope="module")
def api(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[capture_pb2_grpc.CaptureServiceStub, str, sa.Engine]]:
    tmp = tmp_path_factory.mktemp("fuzz")
    inventory = tmp / "inventory.yaml"
    inventory.write_text(
        f"pods:\n  - {{namespace: shop, name: web-1, node: node-1, ips: [10.1.0.5]}}\n"
        f"agents:\n  node-1: 127.0.0.1:{free_port()}\n"
    )
    db = f"sqlite:///{tmp / 'podcap.db'}"
    args = [
        "--db",
        db,
        "--store",
        f"file://{tmp / 'store'}",
        "--inventory",
        str(inventory),
        "--max-duration",
        "1h",
    ]
    with controller(args, Path(tmp)) as address, grpc.insecure_channel(address) as channel:
        engine = sa.create_engine(db)
        try:
            yield capture_pb2_grpc.CaptureServiceStub(channel), address, engine
        finally:
            engine.dispose()


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    namespace=names,
    pod=names,
    selector=st.one_of(st.just(""), text),
    filter_expr=text,
    seconds=st.integers(min_value=-(10**12), max_value=10**12),
    nanos=st.integers(min_value=-999_999_999, max_value=999_999_999),
    max_packets=st.integers(min_value=-(2**63), max_value=2**63 - 1),
    max_bytes=st.integers(min_value=-(2**63), max_value=2**63 - 1),
    snaplen=st.integers(min_value=-(2**31), max_value=2**31 - 1),
    request_id=text,
    reason=text,
    interface=st.one_of(st.just(""), text),
    state=st.integers(min_value=-(2**31), max_value=2**31 - 1),
)
def test_no_request_is_answered_with_unknown_or_internal(
    api: tuple[capture_pb2_grpc.CaptureServiceStub, str, sa.Engine],
    namespace: str,
    pod: str,
    selector: str,
    filter_expr: str,
    seconds: int,
    nanos: int,
    max_packets: int,
    max_bytes: int,
    snaplen: int,
    request_id: str,
    reason: str,
    interface: str,
    state: int,
) -> None:
    stub, _, engine = api
    if (seconds > 0 and nanos < 0) or (seconds < 0 and nanos > 0):
        nanos = -nanos  # protobuf requires the signs of a Duration's parts to agree
    request = capture_pb2.CreateCaptureRequest(
        namespace=namespace,
        pod=pod,
        label_selector=selector,
        filter=filter_expr,
        duration=Duration(seconds=seconds, nanos=nanos),
        limits=common_pb2.CaptureLimits(max_packets=max_packets, max_bytes=max_bytes, snaplen=snaplen),
        request_id=request_id,
        reason=reason,
        pod_interface=interface,
    )
    with engine.connect() as conn:
        before = conn.execute(sa.text("SELECT count(*) FROM captures")).scalar_one()
    try:
        stub.CreateCapture(request, timeout=30)
        refused = None
    except grpc.RpcError as exc:
        refused = exc
    # The one pod that exists has an agent nobody listens for: a request valid in every field is stored and
    # fails UNAVAILABLE. Anything else must be refused before any state exists.
    assert refused is not None
    assert refused.code() not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), refused.details()
    assert refused.details(), "every refusal says why"
    with engine.connect() as conn:
        after = conn.execute(sa.text("SELECT count(*) FROM captures")).scalar_one()
    if refused.code() != grpc.StatusCode.UNAVAILABLE:
        assert after == before, f"{refused.code().name} left a row behind"

    listing = capture_pb2.ListCapturesRequest(
        namespace=namespace[:100], pod=pod[:100], state=state, page_token=reason[:200]
    )
    try:
        stub.ListCaptures(listing, timeout=30)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.details()


def test_the_controller_still_serves_after_the_fuzzing(
    api: tuple[capture_pb2_grpc.CaptureServiceStub, str, sa.Engine],
) -> None:
    _, address, _ = api
    wait_healthy(address, timeout=5)
