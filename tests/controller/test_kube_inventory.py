"""KubernetesInventory through the real `kubernetes` client against the fake API server, from a kubeconfig."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from podcap.controller._errors import Forbidden, InvalidRequest, NoAgentOnNode, PodNotFound, Unavailable
from podcap.controller._inventory import AGENT_LABEL, ContainerStatus, Pod
from podcap.controller._kube import KubernetesInventory
from tests.support.fakekube import FakeKube

AGENT_NAMESPACE = "podcap-system"


@pytest.fixture
def inventory(fake_kube: FakeKube, tmp_path: Path) -> Iterator[KubernetesInventory]:
    inventory = KubernetesInventory.from_kubeconfig(
        fake_kube.write_kubeconfig(tmp_path / "kubeconfig"),
        agent_namespace=AGENT_NAMESPACE,
        agent_port=7443,
        request_timeout=2.0,
    )
    yield inventory
    inventory.close()


def test_get_pod_maps_every_field(fake_kube: FakeKube, inventory: KubernetesInventory) -> None:
    created = fake_kube.add_pod(
        "shop",
        "checkout-7d9f",
        "node-1",
        ["10.244.1.10", "fd00:10:244:1::a"],
        labels={"app": "checkout"},
        container_statuses=[
            _container(
                "app", ready=True, restarts=0, state={"running": {"startedAt": "2024-05-01T10:00:00Z"}}
            ),
            _container("sidecar", ready=False, restarts=3, state={"waiting": {"reason": "CrashLoopBackOff"}}),
            _container(
                "init-done",
                ready=False,
                restarts=1,
                state={"terminated": {"exitCode": 0, "reason": "Completed"}},
            ),
        ],
    )

    pod = inventory.get_pod("shop", "checkout-7d9f")

    assert pod == Pod(
        namespace="shop",
        name="checkout-7d9f",
        node="node-1",
        ips=("10.244.1.10", "fd00:10:244:1::a"),
        phase="Running",
        host_network=False,
        uid=created["metadata"]["uid"],
        labels={"app": "checkout"},
        containers=(
            ContainerStatus("app", ready=True, restart_count=0, state="running"),
            ContainerStatus("sidecar", ready=False, restart_count=3, state="waiting: CrashLoopBackOff"),
            ContainerStatus("init-done", ready=False, restart_count=1, state="terminated: Completed"),
        ),
    )
    assert fake_kube.requests[-1].path == "/api/v1/namespaces/shop/pods/checkout-7d9f"


def test_host_network_pending_pod_and_pod_ip_fallback(
    fake_kube: FakeKube, inventory: KubernetesInventory
) -> None:
    fake_kube.add_pod("kube-system", "proxy", "node-2", ["192.168.0.12"], host_network=True)
    legacy = fake_kube.add_pod("shop", "old", "node-1", ["10.244.1.11"])
    del legacy["status"]["podIPs"]  # an old API server sends podIP only
    fake_kube.add_pod("shop", "new", "", [], phase="Pending", ready=False)

    assert inventory.get_pod("kube-system", "proxy").host_network is True
    assert inventory.get_pod("shop", "old").ips == ("10.244.1.11",)
    pending = inventory.get_pod("shop", "new")
    assert (pending.phase, pending.node, pending.ips) == ("Pending", "", ())


def test_missing_pod_is_pod_not_found_naming_it(fake_kube: FakeKube, inventory: KubernetesInventory) -> None:
    with pytest.raises(PodNotFound, match=r"^pod shop/ghost not found$") as raised:
        inventory.get_pod("shop", "ghost")
    assert getattr(raised.value.__cause__, "status", None) == 404


def test_forbidden_names_the_verb_resource_and_namespace(
    fake_kube: FakeKube, inventory: KubernetesInventory
) -> None:
    fake_kube.set_error("/api/v1/namespaces/shop/", 403)

    with pytest.raises(
        Forbidden, match=r"the controller may not get pods in namespace shop \(RBAC\)"
    ) as raised:
        inventory.get_pod("shop", "checkout")
    assert 'cannot get resource "pods"' in str(raised.value)
    assert getattr(raised.value.__cause__, "status", None) == 403

    with pytest.raises(Forbidden, match=r"the controller may not list pods in namespace shop \(RBAC\)"):
        inventory.list_pods("shop", "app=checkout")


def test_agent_lookup_forbidden_names_the_agent_namespace(
    fake_kube: FakeKube, inventory: KubernetesInventory
) -> None:
    fake_kube.set_error(f"/api/v1/namespaces/{AGENT_NAMESPACE}/pods", 403)

    with pytest.raises(Forbidden, match=f"may not list pods in namespace {AGENT_NAMESPACE} "):
        inventory.agent_address("node-1")


def test_rejected_credentials_are_forbidden(fake_kube: FakeKube, tmp_path: Path) -> None:
    stale = KubernetesInventory.from_kubeconfig(
        fake_kube.write_kubeconfig(tmp_path / "kubeconfig", token="expired"),
        agent_namespace=AGENT_NAMESPACE,
        agent_port=7443,
    )
    try:
        with pytest.raises(Forbidden, match=r"rejected the controller's credentials \(401 Unauthorized"):
            stale.get_pod("shop", "checkout")
    finally:
        stale.close()


@pytest.mark.parametrize(
    ("code", "reason"), [(410, "Gone"), (500, "InternalError"), (429, "TooManyRequests")]
)
def test_server_side_failures_are_unavailable(
    fake_kube: FakeKube, inventory: KubernetesInventory, code: int, reason: str
) -> None:
    fake_kube.add_pod("shop", "checkout", "node-1", ["10.244.1.10"])
    fake_kube.fail_next("/api/v1/namespaces/shop/pods", code, reason)

    with pytest.raises(Unavailable, match=f"^Kubernetes API at {fake_kube.url} answered {code} ") as raised:
        inventory.get_pod("shop", "checkout")
    assert getattr(raised.value.__cause__, "status", None) == code
    assert inventory.get_pod("shop", "checkout").name == "checkout"  # the failure was transient


def test_unreachable_api_is_unavailable(fake_kube: FakeKube, inventory: KubernetesInventory) -> None:
    fake_kube.add_pod("shop", "checkout", "node-1", ["10.244.1.10"])
    inventory.get_pod("shop", "checkout")  # leaves a kept-alive connection in the client's pool
    fake_kube.stop()

    with pytest.raises(Unavailable, match=f"^Kubernetes API unreachable at {fake_kube.url}: ") as raised:
        inventory.get_pod("shop", "checkout")
    assert raised.value.__cause__ is not None
    with pytest.raises(Unavailable, match="unreachable"):
        inventory.agent_address("node-1")


def test_list_pods_by_label_selector(fake_kube: FakeKube, inventory: KubernetesInventory) -> None:
    fake_kube.add_pod(
        "shop", "checkout-a", "node-1", ["10.244.1.10"], labels={"app": "checkout", "track": "stable"}
    )
    fake_kube.add_pod(
        "shop", "checkout-b", "node-2", ["10.244.2.10"], labels={"app": "checkout", "track": "canary"}
    )
    fake_kube.add_pod("shop", "cart", "node-1", ["10.244.1.11"], labels={"app": "cart"})
    fake_kube.add_pod("other", "checkout-c", "node-1", ["10.244.1.12"], labels={"app": "checkout"})

    pods = inventory.list_pods("shop", "app=checkout,track notin (canary)")

    assert [(pod.namespace, pod.name, pod.node) for pod in pods] == [("shop", "checkout-a", "node-1")]
    assert fake_kube.requests[-1].query["labelSelector"] == "app=checkout,track notin (canary)"
    assert inventory.list_pods("shop", "app=nothing") == []


def test_invalid_label_selector_refused_by_the_api_is_invalid_request(inventory: KubernetesInventory) -> None:
    with pytest.raises(InvalidRequest, match="refused to list pods in namespace shop: unable to parse"):
        inventory.list_pods("shop", "app in ()")


def test_agent_discovery_filters_by_label_and_node(
    fake_kube: FakeKube, inventory: KubernetesInventory
) -> None:
    fake_kube.add_agent("node-1", "10.0.0.11")
    fake_kube.add_agent("node-2", "10.0.0.12")

    assert inventory.agent_address("node-2") == "10.0.0.12:7443"
    method, path, query = fake_kube.requests[-1]
    assert (method, path) == ("GET", f"/api/v1/namespaces/{AGENT_NAMESPACE}/pods")
    assert query["labelSelector"] == AGENT_LABEL
    assert query["fieldSelector"] == "spec.nodeName=node-2"


def test_agent_ipv6_address_is_bracketed(fake_kube: FakeKube, inventory: KubernetesInventory) -> None:
    fake_kube.add_agent("node-6", "fd00::6")
    assert inventory.agent_address("node-6") == "[fd00::6]:7443"


def test_ready_agent_preferred_over_one_not_ready(
    fake_kube: FakeKube, inventory: KubernetesInventory
) -> None:
    fake_kube.add_agent("node-1", "10.0.0.21", name="podcap-agent-a", ready=False)
    terminating = fake_kube.add_agent("node-1", "10.0.0.22", name="podcap-agent-b")
    terminating["metadata"]["deletionTimestamp"] = "2024-05-01T11:00:00Z"
    fake_kube.add_agent("node-1", "10.0.0.23", name="podcap-agent-c")

    assert inventory.agent_address("node-1") == "10.0.0.23:7443"


def test_no_agent_on_node_names_node_label_and_namespace(
    fake_kube: FakeKube, inventory: KubernetesInventory
) -> None:
    fake_kube.add_agent("node-1", "10.0.0.11")
    fake_kube.add_pod(AGENT_NAMESPACE, "something-else", "node-9", ["10.0.0.99"])

    with pytest.raises(
        NoAgentOnNode,
        match=f"^no podcap agent on node node-9 \\(looked for pods labelled {AGENT_LABEL} "
        f"in namespace {AGENT_NAMESPACE}\\)$",
    ):
        inventory.agent_address("node-9")


def test_agent_not_ready_says_so(fake_kube: FakeKube, inventory: KubernetesInventory) -> None:
    fake_kube.add_agent("node-1", "10.0.0.11", ready=False)

    with pytest.raises(NoAgentOnNode, match="the podcap agent on node node-1 is not Ready") as raised:
        inventory.agent_address("node-1")
    assert "podcap-agent-node-1: phase Running, Ready=False" in str(raised.value)


def test_bad_kubeconfig_is_a_value_error_naming_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match=f"kubeconfig {missing}"):
        KubernetesInventory.from_kubeconfig(missing, agent_namespace=AGENT_NAMESPACE, agent_port=7443)


def _container(name: str, *, ready: bool, restarts: int, state: dict[str, object]) -> dict[str, object]:
    return {
        "name": name,
        "image": f"registry.example/{name}:1",
        "imageID": f"registry.example/{name}@sha256:" + "0" * 64,
        "ready": ready,
        "restartCount": restarts,
        "state": state,
    }
