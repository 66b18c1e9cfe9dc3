"""What a support engineer is told when Kubernetes says no: a real controller process with the real `kubernetes`
client against the fake API server, which answers with the statuses a real API server sends."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf.duration_pb2 import Duration

from podcap.api.v1 import capture_pb2, capture_pb2_grpc
from tests.support.fakekube import FakeKube
from tests.support.processes import controller

Api = tuple[capture_pb2_grpc.CaptureServiceStub, sa.Engine]


@pytest.fixture
def api(
    fake_kube: FakeKube, tmp_path: Path
) -> Iterator[tuple[capture_pb2_grpc.CaptureServiceStub, sa.Engine]]:
    db = f"sqlite:///{tmp_path / 'podcap.db'}"
    kubeconfig = fake_kube.write_kubeconfig(tmp_path / "kubeconfig")
    args = ["--db", db, "--store", f"file://{tmp_path / 'store'}", "--kubeconfig", str(kubeconfig)]
    with controller(args, tmp_path) as address, grpc.insecure_channel(address) as channel:
        engine = sa.create_engine(db)
        try:
            yield capture_pb2_grpc.CaptureServiceStub(channel), engine
        finally:
            engine.dispose()


def _refused(stub: capture_pb2_grpc.CaptureServiceStub, pod: str = "web-1") -> grpc.RpcError:
    request = capture_pb2.CreateCaptureRequest(namespace="shop", pod=pod, duration=Duration(seconds=5))
    with pytest.raises(grpc.RpcError) as refused:
        stub.CreateCapture(request, timeout=30)
    return refused.value


def _stored(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM captures")).scalar_one())


def test_controller_without_rbac_says_which_verb_and_resource(fake_kube: FakeKube, api: Api) -> None:
    stub, engine = api
    fake_kube.set_error("/api/v1/namespaces/shop/pods", 403, "Forbidden")
    error = _refused(stub)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "may not get pods in namespace shop" in error.details()
    assert _stored(engine) == 0


@pytest.mark.parametrize("code", [500, 410])
def test_api_server_failure_is_unavailable(fake_kube: FakeKube, api: Api, code: int) -> None:
    stub, engine = api
    fake_kube.add_pod("shop", "web-1", node="node-1", ips=["10.1.0.5"])
    fake_kube.set_error("/api/v1/namespaces/shop/pods", code)
    error = _refused(stub)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert str(code) in error.details()
    assert _stored(engine) == 0


def test_unreachable_api_server_is_unavailable(fake_kube: FakeKube, api: Api) -> None:
    stub, _ = api
    fake_kube.stop()
    error = _refused(stub)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "unreachable" in error.details()


def test_pod_that_is_not_running_is_a_failed_precondition(fake_kube: FakeKube, api: Api) -> None:
    stub, engine = api
    fake_kube.add_pod("shop", "web-1", node="node-1", ips=["10.1.0.5"], phase="Pending")
    error = _refused(stub)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "shop/web-1 is Pending" in error.details()
    assert _stored(engine) == 0


def test_host_network_pod_is_refused_with_the_way_out(fake_kube: FakeKube, api: Api) -> None:
    stub, _ = api
    fake_kube.add_pod("shop", "web-1", node="node-1", ips=["10.0.0.11"], host_network=True)
    fake_kube.add_agent("node-1", "127.0.0.1")
    error = _refused(stub)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "hostNetwork" in error.details() and "--host-network" in error.details()


def test_node_without_a_ready_agent_is_named(fake_kube: FakeKube, api: Api) -> None:
    stub, engine = api
    fake_kube.add_pod("shop", "web-1", node="node-7", ips=["10.1.0.5"])
    error = _refused(stub)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no podcap agent on node node-7" in error.details()
    fake_kube.add_agent("node-7", "127.0.0.1", ready=False)
    error = _refused(stub)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "node-7" in error.details() and "not Ready" in error.details()
    assert _stored(engine) == 0
