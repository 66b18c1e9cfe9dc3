"""Services in the inventory: KubernetesInventory.get_service through the real `kubernetes` client against the
fake API server (the Service, then its EndpointSlices), and StaticInventory's `services:` resolved to its pods."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from podcap.controller._errors import Forbidden, NotFound
from podcap.controller._inventory import Service, ServiceEndpoint, ServicePort
from podcap.controller._kube import KubernetesInventory
from podcap.controller._static_inventory import StaticInventory
from tests.support.fakekube import FakeKube


@pytest.fixture
def inventory(fake_kube: FakeKube, tmp_path: Path) -> Iterator[KubernetesInventory]:
    inventory = KubernetesInventory.from_kubeconfig(
        fake_kube.write_kubeconfig(tmp_path / "kubeconfig"),
        agent_namespace="podcap-system",
        agent_port=7443,
        request_timeout=2.0,
    )
    yield inventory
    inventory.close()


def test_a_service_has_its_ready_endpoints_from_every_slice(
    fake_kube: FakeKube, inventory: KubernetesInventory
) -> None:
    fake_kube.add_service(
        "shop",
        "checkout",
        ports=[
            {"name": "http", "port": 80, "targetPort": "web"},  # named: the slices carry the number
            {"name": "metrics", "port": 9090, "targetPort": 9091},
            {"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP"},
        ],
        cluster_ip="10.96.0.10",
    )
    slice_ports = [{"name": "http", "port": 8080}, {"name": "metrics", "port": 9091}]
    fake_kube.add_endpoint_slice(
        "shop",
        "checkout",
        [
            {"ip": "10.244.1.10", "pod": "checkout-a", "node": "node-1"},
            {"ip": "10.244.2.10", "pod": "checkout-b", "node": "node-2", "ready": False},
        ],
        slice_ports,
    )
    fake_kube.add_endpoint_slice(
        "shop",
        "checkout",
        [
            {"ip": "10.244.2.11", "pod": "checkout-c", "node": "node-2"},
            {"ip": "192.168.7.1", "pod": "", "node": ""},  # a manually added endpoint, no pod behind it
        ],
        slice_ports,
    )
    # Another Service's slice in the same namespace is not this one's.
    fake_kube.add_endpoint_slice(
        "shop", "cart", [{"ip": "10.244.1.20", "pod": "cart-a", "node": "node-1"}], []
    )

    service = inventory.get_service("shop", "checkout")

    assert service == Service(
        namespace="shop",
        name="checkout",
        cluster_ip="10.96.0.10",
        ports=(
            ServicePort("http", 80, 8080, "TCP"),
            ServicePort("metrics", 9090, 9091, "TCP"),
            ServicePort("dns", 53, 5353, "UDP"),
        ),
        endpoints=(
            ServiceEndpoint("192.168.7.1", "", ""),
            ServiceEndpoint("10.244.1.10", "checkout-a", "node-1"),
            ServiceEndpoint("10.244.2.11", "checkout-c", "node-2"),
        ),
    )
    asked = [(r.path, r.query.get("labelSelector", "")) for r in fake_kube.requests]
    assert ("/api/v1/namespaces/shop/services/checkout", "") in asked
    assert (
        "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices",
        "kubernetes.io/service-name=checkout",
    ) in asked


def test_a_service_without_ready_endpoints_has_none(
    fake_kube: FakeKube, inventory: KubernetesInventory
) -> None:
    fake_kube.add_service("shop", "cart", ports=[{"name": "", "port": 80, "targetPort": 8080}])
    fake_kube.add_endpoint_slice(
        "shop", "cart", [{"ip": "10.244.1.20", "pod": "cart-a", "node": "node-1", "ready": False}], []
    )

    service = inventory.get_service("shop", "cart")

    assert service.endpoints == ()
    assert service.ports == (ServicePort("", 80, 8080, "TCP"),)


def test_a_missing_service_is_not_found(fake_kube: FakeKube, inventory: KubernetesInventory) -> None:
    with pytest.raises(NotFound, match="service shop/nope not found"):
        inventory.get_service("shop", "nope")


def test_rbac_refusing_endpointslices_is_forbidden(
    fake_kube: FakeKube, inventory: KubernetesInventory
) -> None:
    fake_kube.add_service("shop", "checkout", ports=[{"port": 80}])
    fake_kube.set_error("/apis/discovery.k8s.io/", 403)

    with pytest.raises(
        Forbidden, match=r'may not list endpointslices in namespace shop .*API group "discovery\.k8s\.io"'
    ):
        inventory.get_service("shop", "checkout")


STATIC = """
pods:
  - {namespace: shop, name: checkout-a, node: node-1, ip: 10.244.1.10, labels: {app: checkout}}
  - {namespace: shop, name: checkout-b, node: node-2, ips: [10.244.2.10, "fd00::2:a"], labels: {app: checkout}}
  - {namespace: shop, name: checkout-new, node: node-2, ip: 10.244.2.11, phase: Pending, labels: {app: checkout}}
  - {namespace: other, name: checkout-x, node: node-1, ip: 10.244.1.99, labels: {app: checkout}}
  - {namespace: shop, name: legacy, node: node-1, ip: 10.244.1.30}
agents: {node-1: "127.0.0.2:7443", node-2: "127.0.0.3:7443"}
services:
  - namespace: shop
    name: checkout
    clusterIP: 10.96.0.10
    ports: [{name: http, port: 80, targetPort: 8080}, {name: dns, port: 53, protocol: UDP}]
    selector: {app: checkout}
  - {namespace: shop, name: legacy, endpoints: [legacy]}
  - {namespace: shop, name: external}
"""


def _static(tmp_path: Path, text: str) -> StaticInventory:
    path = tmp_path / "inventory.yaml"
    path.write_text(text)
    return StaticInventory.from_file(path)


def test_static_services_resolve_to_the_running_pods(tmp_path: Path) -> None:
    inventory = _static(tmp_path, STATIC)

    assert inventory.get_service("shop", "checkout") == Service(
        namespace="shop",
        name="checkout",
        cluster_ip="10.96.0.10",
        ports=(ServicePort("http", 80, 8080, "TCP"), ServicePort("dns", 53, 53, "UDP")),
        endpoints=(
            ServiceEndpoint("10.244.1.10", "checkout-a", "node-1"),
            ServiceEndpoint("10.244.2.10", "checkout-b", "node-2"),
            ServiceEndpoint("fd00::2:a", "checkout-b", "node-2"),
        ),
    )
    assert inventory.get_service("shop", "legacy").endpoints == (
        ServiceEndpoint("10.244.1.30", "legacy", "node-1"),
    )
    assert inventory.get_service("shop", "external").endpoints == ()
    with pytest.raises(NotFound, match="service other/checkout not found"):
        inventory.get_service("other", "checkout")


@pytest.mark.parametrize(
    ("service", "error"),
    [
        (
            "{namespace: shop, name: a, endpoints: [ghost]}",
            r"services\[0\]: endpoints \['ghost'\] are not pods",
        ),
        (
            "{namespace: shop, name: a, selector: {app: x}, endpoints: [a]}",
            "either 'selector' or 'endpoints'",
        ),
        ("{namespace: shop, name: a, ports: [{port: 0}]}", "'port' must be a port number"),
        ("{namespace: shop, name: a, ports: [{port: 80, protocol: HTTP}]}", "'protocol' must be one of"),
        ("{namespace: shop, name: a, clusterIP: nowhere}", "'nowhere' is not an IP address"),
        ("{namespace: shop, name: a, type: NodePort}", r"unknown keys \['type'\]"),
    ],
)
def test_a_bad_static_service_fails_the_start(tmp_path: Path, service: str, error: str) -> None:
    text = "pods: [{namespace: shop, name: a, node: n, ip: 10.0.0.1}]\nservices:\n  - " + service + "\n"
    with pytest.raises(ValueError, match=error):
        _static(tmp_path, text)
