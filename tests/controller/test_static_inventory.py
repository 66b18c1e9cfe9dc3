"""StaticInventory answers like the Kubernetes one, from a YAML file, and refuses a malformed file."""

from pathlib import Path

import pytest

from podcap.controller._errors import InvalidRequest, NoAgentOnNode, PodNotFound
from podcap.controller._inventory import Pod
from podcap.controller._static_inventory import StaticInventory

LAB = """
pods:
  - namespace: shop
    name: checkout-7d9f
    node: node-1
    ips: [10.244.1.10, "fd00:10:244:1::a"]
    labels: {app: checkout, track: stable}
  - namespace: shop
    name: checkout-canary
    node: node-2
    ip: 10.244.2.10
    labels: {app: checkout, track: canary}
  - namespace: shop
    name: cart
    node: node-1
    ip: 10.244.1.11
    phase: Pending
    labels: {app: cart}
  - namespace: kube-system
    name: proxy
    node: node-2
    ip: 192.168.0.12
    hostNetwork: true
    uid: 1b4e28ba-2fa1-11d2-883f-0016d3cca427
agents:
  node-1: 127.0.0.2:7443
  node-6: "[fd00::6]:7443"
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "inventory.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def inventory(tmp_path: Path) -> StaticInventory:
    return StaticInventory.from_file(_write(tmp_path, LAB))


def test_get_pod_with_defaults(inventory: StaticInventory) -> None:
    assert inventory.get_pod("shop", "checkout-7d9f") == Pod(
        namespace="shop",
        name="checkout-7d9f",
        node="node-1",
        ips=("10.244.1.10", "fd00:10:244:1::a"),
        phase="Running",
        host_network=False,
        uid="static-shop-checkout-7d9f",
        labels={"app": "checkout", "track": "stable"},
    )
    proxy = inventory.get_pod("kube-system", "proxy")
    assert (proxy.host_network, proxy.ips, proxy.uid) == (
        True,
        ("192.168.0.12",),
        "1b4e28ba-2fa1-11d2-883f-0016d3cca427",
    )
    assert inventory.get_pod("shop", "cart").phase == "Pending"


def test_returned_pods_do_not_share_state(inventory: StaticInventory) -> None:
    inventory.get_pod("shop", "cart").labels["app"] = "changed"
    assert inventory.get_pod("shop", "cart").labels == {"app": "cart"}


def test_unknown_pod_is_pod_not_found_naming_it(inventory: StaticInventory, tmp_path: Path) -> None:
    with pytest.raises(
        PodNotFound, match=r"^pod shop/ghost not found \(looked in the static inventory .*inventory.yaml\)$"
    ):
        inventory.get_pod("shop", "ghost")
    with pytest.raises(PodNotFound, match="pod other/checkout-7d9f not found"):
        inventory.get_pod("other", "checkout-7d9f")


@pytest.mark.parametrize(
    ("selector", "names"),
    [
        ("app=checkout", ["checkout-7d9f", "checkout-canary"]),
        ("app=checkout,track!=canary", ["checkout-7d9f"]),
        ("app in (cart, checkout), track notin (stable)", ["cart", "checkout-canary"]),
        ("!track", ["cart"]),
        ("", ["cart", "checkout-7d9f", "checkout-canary"]),
        ("app=nothing", []),
    ],
)
def test_list_pods_by_selector_within_the_namespace(
    inventory: StaticInventory, selector: str, names: list[str]
) -> None:
    pods = inventory.list_pods("shop", selector)
    assert [pod.name for pod in pods] == names
    assert {pod.namespace for pod in pods} <= {"shop"}


def test_invalid_selector_is_invalid_request(inventory: StaticInventory) -> None:
    with pytest.raises(InvalidRequest, match=r"invalid label selector 'app in \(\)'"):
        inventory.list_pods("shop", "app in ()")


def test_agent_addresses(inventory: StaticInventory) -> None:
    assert inventory.agent_address("node-1") == "127.0.0.2:7443"
    assert inventory.agent_address("node-6") == "[fd00::6]:7443"


def test_node_without_agent_names_the_node(inventory: StaticInventory) -> None:
    with pytest.raises(
        NoAgentOnNode, match=r"^no podcap agent on node node-2 \(.* lists agents for nodes: node-1, node-6\)$"
    ):
        inventory.agent_address("node-2")


def test_empty_file_is_an_empty_inventory(tmp_path: Path) -> None:
    inventory = StaticInventory.from_file(_write(tmp_path, ""))
    assert inventory.list_pods("shop", "") == []
    with pytest.raises(NoAgentOnNode, match="lists agents for nodes: none"):
        inventory.agent_address("node-1")


POD = "  - {namespace: shop, name: a, node: node-1, ip: 10.0.0.1"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("pods: [unclosed", "not valid YAML"),
        ("- a\n- b\n", "expected a mapping with 'pods' and 'agents', found list"),
        ("pod: []\n", "unknown top-level keys ['pod']"),
        ("pods: {a: 1}\n", "'pods' must be a list"),
        ("pods:\n  - just-a-name\n", "pods[0]: expected a mapping"),
        ("pods:\n  - {namespace: shop, node: node-1}\n", "pods[0]: 'name' is required"),
        (f"pods:\n{POD}, hostnetwork: true}}\n", "pods[0]: unknown keys ['hostnetwork']"),
        (f"pods:\n{POD}, ips: [10.0.0.2]}}\n", "give either 'ips' or 'ip'"),
        (
            f"pods:\n{POD}}}\n  - {{namespace: shop, name: b, node: node-1, ip: 10.0.0.300}}\n",
            "pods[1]: '10.0.0.300' is not an IP",
        ),
        (f"pods:\n{POD}, phase: running}}\n", "'phase' must be one of"),
        (f"pods:\n{POD}, hostNetwork: 'yes'}}\n", "'hostNetwork' must be true or false"),
        (f"pods:\n{POD}, labels: {{version: 2}}}}\n", "'labels' must map strings to strings"),
        (f"pods:\n{POD}}}\n{POD}}}\n", "pods[1]: pod shop/a is listed twice"),
        ("agents: [node-1]\n", "'agents' must map node names"),
        ("agents: {node-1: 127.0.0.2}\n", "agents: node-1: '127.0.0.2' is not host:port"),
        ("agents: {node-1: '127.0.0.2:99999'}\n", "is not host:port"),
        ("agents: {node-1: 'fd00::6:7443'}\n", "must be bracketed"),
    ],
)
def test_malformed_file_is_refused_naming_file_and_problem(tmp_path: Path, text: str, problem: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ValueError, match=f"^static inventory {path}: ") as raised:
        StaticInventory.from_file(path)
    assert problem in str(raised.value)


def test_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"static inventory .*nope\.yaml: cannot read it"):
        StaticInventory.from_file(tmp_path / "nope.yaml")
