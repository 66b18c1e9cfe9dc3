"""ListPods against real controller processes: the running pods a caller may capture, and nothing else.

- Kubernetes: the real `kubernetes` client lists /api/v1/pods (Running only) from the fake API server, and
  SubjectAccessReview decides per namespace; a namespace asked for explicitly and not allowed is refused.
- Token file and static inventory: the grants decide, and `podcap pods` shows the answer as a table and JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from podcap.api.v1 import capture_pb2, capture_pb2_grpc
from tests.support.fakekube import FakeKube
from tests.support.processes import PODCAP, controller

ALICE, OPS, MALLORY = "alice-token-" + "a" * 30, "ops-token-" + "o" * 30, "mallory-token"


def _as(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def _names(response: capture_pb2.ListPodsResponse) -> list[str]:
    return [f"{pod.namespace}/{pod.name}" for pod in response.pods]


def _refused(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error: Any = caught.value
    return error.code(), error.details()


@pytest.fixture
def kube_api(fake_kube: FakeKube, tmp_path: Path) -> Iterator[capture_pb2_grpc.CaptureServiceStub]:
    """alice (group support) may capture in shop and read in payments; ops may capture everywhere."""
    fake_kube.add_user(ALICE, "alice", ["support"])
    fake_kube.add_user(OPS, "ops", ["sre"])
    fake_kube.allow("support", ["create", "get"], namespace="shop")
    fake_kube.allow("support", ["get"], namespace="payments")
    fake_kube.allow("sre", ["create"], namespace="*")
    fake_kube.add_pod("shop", "web-1", node="node-1", ips=["10.1.0.5", "fd00::5"])
    fake_kube.add_pod("shop", "web-0", node="node-2", ips=["10.1.0.4"])
    fake_kube.add_pod("shop", "starting", node="node-1", ips=[], phase="Pending")
    fake_kube.add_pod("shop", "done", node="node-1", ips=["10.1.0.9"], phase="Succeeded")
    fake_kube.add_pod("payments", "ledger", node="node-2", ips=["10.2.0.7"])
    fake_kube.add_pod("kube-system", "proxy", node="node-1", ips=["192.168.0.1"], host_network=True)
    args = [
        "--db",
        f"sqlite:///{tmp_path / 'podcap.db'}",
        "--store",
        f"file://{tmp_path / 'store'}",
        "--kubeconfig",
        str(fake_kube.write_kubeconfig(tmp_path / "kubeconfig")),
        "--auth-kubernetes",
    ]
    with controller(args, tmp_path) as address, grpc.insecure_channel(address) as channel:
        yield capture_pb2_grpc.CaptureServiceStub(channel)


def test_kubernetes_rbac_decides_which_pods_are_listed(
    fake_kube: FakeKube, kube_api: capture_pb2_grpc.CaptureServiceStub
) -> None:
    everywhere = capture_pb2.ListPodsRequest()
    # alice may capture in shop only: reading payments is not capturing there. Running pods only, by name.
    alice = kube_api.ListPods(everywhere, metadata=_as(ALICE), timeout=30)
    assert _names(alice) == ["shop/web-0", "shop/web-1"]
    web_1 = alice.pods[1]
    assert (web_1.node, web_1.pod_ip, web_1.host_network) == ("node-1", "10.1.0.5", False)

    # One question cluster-wide, then one per namespace that has running pods, all for the verb create.
    asked = [
        (r["spec"]["resourceAttributes"].get("namespace", ""), r["spec"]["resourceAttributes"]["verb"])
        for r in fake_kube.reviews
        if r["kind"] == "SubjectAccessReview" and r["spec"]["user"] == "alice"
    ]
    assert sorted(asked) == [
        ("", "create"),
        ("kube-system", "create"),
        ("payments", "create"),
        ("shop", "create"),
    ]
    # The controller asked Kubernetes for running pods across namespaces, in one request.
    lists = [r for r in fake_kube.requests if r.path == "/api/v1/pods"]
    assert [r.query.get("fieldSelector") for r in lists] == ["status.phase=Running"]

    # ops may capture everywhere: every running pod, hostNetwork ones flagged as such.
    ops = kube_api.ListPods(everywhere, metadata=_as(OPS), timeout=30)
    assert _names(ops) == ["kube-system/proxy", "payments/ledger", "shop/web-0", "shop/web-1"]
    assert [pod.host_network for pod in ops.pods] == [True, False, False, False]


def test_a_namespace_asked_for_is_listed_only_where_the_caller_may_capture(
    fake_kube: FakeKube, kube_api: capture_pb2_grpc.CaptureServiceStub
) -> None:
    shop = kube_api.ListPods(capture_pb2.ListPodsRequest(namespace="shop"), metadata=_as(ALICE), timeout=30)
    assert _names(shop) == ["shop/web-0", "shop/web-1"]
    assert any(r.path == "/api/v1/namespaces/shop/pods" for r in fake_kube.requests)

    before = len(fake_kube.requests)
    code, details = _refused(
        lambda: kube_api.ListPods(
            capture_pb2.ListPodsRequest(namespace="payments"), metadata=_as(ALICE), timeout=30
        )
    )
    assert (code, details) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "alice may not capture captures in namespace 'payments'",
    )
    # Refused before the inventory was asked: a caller who may not capture learns nothing of the pods there.
    assert not any(r.path.startswith("/api/v1/namespaces/payments") for r in fake_kube.requests[before:])

    code, _ = _refused(
        lambda: kube_api.ListPods(capture_pb2.ListPodsRequest(), metadata=_as(MALLORY), timeout=30)
    )
    assert code == grpc.StatusCode.UNAUTHENTICATED
    code, _ = _refused(lambda: kube_api.ListPods(capture_pb2.ListPodsRequest(), timeout=30))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    code, details = _refused(
        lambda: kube_api.ListPods(
            capture_pb2.ListPodsRequest(namespace="Shop_1"), metadata=_as(OPS), timeout=30
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "Shop_1" in details


def test_the_controllers_own_rbac_missing_is_permission_denied_saying_so(
    fake_kube: FakeKube, kube_api: capture_pb2_grpc.CaptureServiceStub
) -> None:
    fake_kube.set_error("/api/v1/pods", 403)
    code, details = _refused(
        lambda: kube_api.ListPods(capture_pb2.ListPodsRequest(), metadata=_as(OPS), timeout=30)
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "the controller may not list pods in all namespaces (RBAC)" in details


def _sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def test_podcap_pods_with_a_token_file_and_a_static_inventory(tmp_path: Path) -> None:
    tokens = {"alice": "alice-" + "a" * 40, "bob": "bob-" + "b" * 40, "carol": "carol-" + "c" * 40}
    grants = {
        "alice": [{"role": "support", "namespaces": ["shop"]}],
        "bob": [{"role": "viewer", "namespaces": ["payments"]}],  # may read, not capture
        "carol": [{"role": "admin", "namespaces": ["*"]}],
    }
    (tmp_path / "tokens.yaml").write_text(
        yaml.safe_dump(
            {
                "roles": {"support": ["capture", "read"], "viewer": ["read"], "admin": ["*"]},
                "users": [
                    {"name": name, "token_sha256": _sha256(token), "grants": grants[name]}
                    for name, token in tokens.items()
                ],
            }
        )
    )
    pods = [
        {"namespace": "shop", "name": "checkout-7d9f", "node": "node-1", "ip": "10.1.0.5"},
        {"namespace": "shop", "name": "cart-1", "node": "node-2", "ip": "10.1.0.6"},
        {"namespace": "shop", "name": "batch-1", "node": "node-2", "ip": "10.1.0.8", "phase": "Succeeded"},
        {"namespace": "payments", "name": "ledger", "node": "node-2", "ip": "10.2.0.7"},
    ]
    (tmp_path / "inventory.yaml").write_text(yaml.safe_dump({"pods": pods, "agents": {}}))
    args = [
        "--db",
        f"sqlite:///{tmp_path / 'podcap.db'}",
        "--store",
        f"file://{tmp_path / 'store'}",
        "--inventory",
        str(tmp_path / "inventory.yaml"),
        "--auth-tokens",
        str(tmp_path / "tokens.yaml"),
    ]

    with controller(args, tmp_path) as address:

        def pods_as(user: str, *flags: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [PODCAP, "pods", *flags],
                env={
                    **os.environ,
                    "PODCAP_SERVER": address,
                    "PODCAP_TOKEN": tokens[user],
                    "HOME": str(tmp_path),
                },
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )

        alice = pods_as("alice", "-o", "json")
        assert alice.returncode == 0, alice.stderr
        assert json.loads(alice.stdout) == [
            {
                "namespace": "shop",
                "name": "cart-1",
                "node": "node-2",
                "pod_ip": "10.1.0.6",
                "host_network": False,
            },
            {
                "namespace": "shop",
                "name": "checkout-7d9f",
                "node": "node-1",
                "pod_ip": "10.1.0.5",
                "host_network": False,
            },
        ]
        table = pods_as("carol")
        assert table.returncode == 0, table.stderr
        assert table.stdout.split("\n")[0].split() == ["POD", "NODE", "IP", "NETWORK"]
        assert [line.split() for line in table.stdout.splitlines()[1:]] == [
            ["payments/ledger", "node-2", "10.2.0.7", "pod"],
            ["shop/cart-1", "node-2", "10.1.0.6", "pod"],
            ["shop/checkout-7d9f", "node-1", "10.1.0.5", "pod"],
        ]
        bob = pods_as("bob", "-o", "json")
        assert (bob.returncode, json.loads(bob.stdout)) == (0, [])
        refused = pods_as("alice", "-n", "payments")
        assert refused.returncode == 1
        assert (
            refused.stderr.splitlines()[0]
            == "podcap: PERMISSION_DENIED: alice may not capture captures in namespace 'payments'"
        )
