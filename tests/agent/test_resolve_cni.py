"""Pod IP -> host-side device on every wiring the agent meets: Calico, flannel/bridge, Cilium, the AWS VPC CNI, a
Multus pod with two interfaces, and pods whose namespace only a process or a runtime's own directory leads to.

One two-node lab with a pod of each kind (``build_cni_lab``) serves the whole module; nothing here changes it.
The resolver runs on a thread inside the node's netns, as the agent's worker threads do, and its answers are
checked against what iproute2 says about the same devices.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from podcap.agent._errors import (
    HostNetworkPod,
    InvalidCaptureRequest,
    PodNotOnNode,
    UnknownPodInterface,
    UnpairedPodInterface,
)
from podcap.agent._resolve import DEFAULT_NETNS_DIRS, Resolution, Resolver
from tests.support.lab import CNI_LAB_PODS, Lab, LabPod
from tests.support.netns import in_netns, netns_path

pytestmark = pytest.mark.netns

_PREFIX = {"calico": "cali", "bridge": "veth", "cilium": "lxc", "eni": "eni"}
_NODE1_PODS = [name for name, spec in CNI_LAB_PODS.items() if spec[0] == "node-1"]


def _resolve(lab: Lab, pod_or_node: str, ips: list[str], **kwargs: Any) -> Resolution:
    """Resolve on a fresh resolver inside the node (a node name, or the node of a pod name)."""
    node = lab.nodes[pod_or_node] if pod_or_node in lab.nodes else lab.nodes[lab.pods[pod_or_node].node]
    resolver_args = {k: kwargs.pop(k) for k in ("proc_root", "netns_dirs") if k in kwargs}
    resolver = Resolver(node_name=node.name, **resolver_args)
    result: Resolution = in_netns(node.netns, lambda: resolver.resolve(ips, **kwargs))
    return result


def _links(lab: Lab, netns: str) -> dict[str, dict[str, Any]]:
    return {
        row["ifname"]: row for row in json.loads(lab.run(netns, ["ip", "-j", "-d", "link", "show"]).stdout)
    }


def _expected_netns(pod: LabPod) -> str:
    """Where a resolver with the default dirs finds the pod: its name, else its container process."""
    path = netns_path(pod.netns)
    if path.startswith(DEFAULT_NETNS_DIRS) or path.startswith("/proc/"):
        return path
    return f"/proc/{pod.container_pid}/ns/net"


@pytest.mark.parametrize("family", ["v4", "v6"])
@pytest.mark.parametrize("name", list(CNI_LAB_PODS))
def test_every_wiring_resolves_to_the_pods_own_device(cni_lab: Lab, name: str, family: str) -> None:
    pod = cni_lab.pods[name]
    ip = pod.ip if family == "v4" else pod.ip6
    result = _resolve(cni_lab, name, [ip])
    host_side = _links(cni_lab, cni_lab.nodes[pod.node].netns)[pod.host_if]
    pod_side = _links(cni_lab, pod.netns)["eth0"]
    assert pod.host_if.startswith(_PREFIX[pod.cni])
    assert result == Resolution(
        interface=pod.host_if,
        ifindex=host_side["ifindex"],
        strategy="netns-scan",
        netns=_expected_netns(pod),
        pod_interface="eth0",
        pod_ifindex=pod_side["ifindex"],
        pod_mac=pod.pod_mac,
        pod_ip=ip,
        host_mac=host_side["address"],  # as `ip link` shows the node's device
    )
    assert (pod_side["link_index"], host_side["link_index"]) == (host_side["ifindex"], pod_side["ifindex"])


@pytest.mark.parametrize("name", ["bridge-1", "cilium-1"])
def test_where_a_route_lookup_names_a_shared_device_the_scan_names_the_pods(cni_lab: Lab, name: str) -> None:
    pod = cni_lab.pods[name]
    route = cni_lab.run(cni_lab.nodes[pod.node], ["ip", "-j", "route", "get", pod.ip]).stdout
    assert json.loads(route)[0]["dev"] == {"bridge": "cni0", "cilium": "cilium_host"}[pod.cni]
    assert _resolve(cni_lab, name, [pod.ip]).interface == pod.host_if


@pytest.mark.parametrize("name", _NODE1_PODS)
def test_a_pod_of_the_other_node_is_not_on_node(cni_lab: Lab, name: str) -> None:
    pod = cni_lab.pods[name]
    with pytest.raises(PodNotOnNode, match=f"node node-2 holds pod IP {pod.ip}, {pod.ip6}$"):
        _resolve(cni_lab, "node-2", [pod.ip, pod.ip6])


@pytest.mark.parametrize(
    ("ip", "device"),
    [
        ("10.250.0.1", "eth0"),
        ("fd00:250::1", "eth0"),
        ("10.251.1.1", "cni0"),
        ("10.251.1.254", "cilium_host"),
    ],
)
def test_an_address_of_the_node_is_a_host_network_pod(cni_lab: Lab, ip: str, device: str) -> None:
    with pytest.raises(HostNetworkPod) as refused:
        _resolve(cni_lab, "node-1", [ip])
    assert (refused.value.ip, refused.value.interface) == (ip, device)


def test_a_multus_pod_resolves_to_eth0_by_default_and_to_net1_when_asked(cni_lab: Lab) -> None:
    pod = cni_lab.pods["multus-1"]
    (net1,) = pod.extra
    node_links, pod_links = _links(cni_lab, cni_lab.nodes[pod.node].netns), _links(cni_lab, pod.netns)
    assert _resolve(cni_lab, pod.name, [pod.ip, pod.ip6]).interface == pod.host_if
    asked = _resolve(cni_lab, pod.name, [pod.ip], pod_interface="net1")
    assert asked == Resolution(
        interface=net1.host_if,
        ifindex=node_links[net1.host_if]["ifindex"],
        netns=netns_path(pod.netns),
        pod_interface="net1",
        pod_ifindex=pod_links["net1"]["ifindex"],
        pod_mac=net1.mac,
        pod_ip=pod.ip,
        host_mac=node_links[net1.host_if]["address"],
    )
    # An address of net1 leads to net1's device without naming it: the interface holding the IP.
    for cidr in net1.addresses:
        ip = cidr.split("/")[0]
        assert _resolve(cni_lab, pod.name, [ip]).interface == net1.host_if


def test_an_interface_the_pod_lacks_is_an_invalid_request_naming_those_it_has(cni_lab: Lab) -> None:
    pod = cni_lab.pods["multus-1"]
    with pytest.raises(UnknownPodInterface) as refused:
        _resolve(cni_lab, pod.name, [pod.ip], pod_interface="net2")
    assert isinstance(refused.value, InvalidCaptureRequest)
    assert str(refused.value) == f"the pod holding {pod.ip} has no interface 'net2'; it has lo, eth0, net1"
    assert refused.value.available == ("lo", "eth0", "net1")


def test_an_interface_without_a_node_side_peer_is_an_invalid_request_naming_those_with_one(
    cni_lab: Lab,
) -> None:
    pod = cni_lab.pods["multus-1"]
    with pytest.raises(UnpairedPodInterface) as refused:
        _resolve(cni_lab, pod.name, [pod.ip], pod_interface="lo")
    assert isinstance(refused.value, InvalidCaptureRequest)
    assert str(refused.value).startswith(f"interface 'lo' (loopback) of the pod holding {pod.ip} has no peer")
    assert refused.value.capturable == ("eth0", "net1")
    assert "/proc/" not in str(refused.value) and "/run/netns" not in str(refused.value)


@pytest.mark.parametrize("name", ["../x", "net 1", "eth0:1", "a-name-too-long-x"])
def test_a_malformed_interface_name_is_refused_before_any_scan(name: str) -> None:
    with pytest.raises(InvalidCaptureRequest, match="not a network interface name"):
        Resolver(proc_root="/nonexistent", netns_dirs=()).resolve(["10.0.0.1"], pod_interface=name)


def test_a_pod_whose_namespace_only_its_process_holds_is_found_through_proc(cni_lab: Lab) -> None:
    pod = cni_lab.pods["procns-1"]
    named = os.listdir("/run/netns")
    assert pod.netns == f"/proc/{pod.container_pid}/ns/net"
    assert not [n for n in named if os.stat(f"/run/netns/{n}").st_ino == os.stat(pod.netns).st_ino]
    assert _resolve(cni_lab, pod.name, [pod.ip]).netns == pod.netns
    with pytest.raises(PodNotOnNode):  # and nothing else leads to it
        _resolve(cni_lab, pod.name, [pod.ip], proc_root="/nonexistent")


def test_a_pod_in_a_runtimes_own_netns_dir_is_found_there(cni_lab: Lab, tmp_path: Path) -> None:
    pod = cni_lab.pods["dockerns-1"]
    docker_dir = os.path.dirname(pod.netns)
    no_proc = str(tmp_path)  # a /proc without processes: only the directory can lead to the pod
    found = _resolve(cni_lab, pod.name, [pod.ip6], netns_dirs=[docker_dir], proc_root=no_proc)
    assert (found.netns, found.interface) == (pod.netns, pod.host_if)
    with pytest.raises(PodNotOnNode):
        _resolve(cni_lab, pod.name, [pod.ip6], netns_dirs=list(DEFAULT_NETNS_DIRS), proc_root=no_proc)
