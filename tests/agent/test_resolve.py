"""Pod IP -> host-side device, against real namespaces and veths wired like Calico.

The resolver runs the way the agent does: as a process inside a node's netns (``ip netns exec``), seeing every
namespace on the machine, including the other node's pods.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import sys
from typing import Any

import pytest

from podcap.agent._errors import InvalidCaptureRequest
from podcap.agent._netlink import NsidLookup
from podcap.agent._resolve import Resolution, Resolver
from podcap.api.v1 import agent_pb2
from tests.support.lab import Lab, Node
from tests.support.netns import in_netns

_AGENT = """
import dataclasses, json, sys
from podcap.agent._errors import AgentError
from podcap.agent._resolve import Resolver, list_interfaces
node, kwargs, queries = json.loads(sys.argv[1])
resolver = Resolver(node_name=node, **kwargs)
results = []
for ips in queries:
    try:
        results.append({"ok": dataclasses.asdict(resolver.resolve(ips))})
    except AgentError as exc:
        results.append({"error": type(exc).__name__, "message": str(exc)})
interfaces = [dataclasses.asdict(i) for i in list_interfaces()]
print(json.dumps({"results": results, "interfaces": interfaces}))
"""


def _agent(lab: Lab, node: Node, *queries: list[str], **kwargs: Any) -> dict[str, Any]:
    """Resolve each query in one resolver process running inside ``node``'s netns, like the agent."""
    done = lab.run(node, [sys.executable, "-c", _AGENT, json.dumps([node.name, kwargs, list(queries)])])
    out: dict[str, Any] = json.loads(done.stdout)
    return out


def _links(lab: Lab, netns: str) -> dict[str, dict[str, Any]]:
    """What iproute2 says about the devices of a netns, by name: the ground truth the resolver must match."""
    return {
        row["ifname"]: row for row in json.loads(lab.run(netns, ["ip", "-j", "-d", "link", "show"]).stdout)
    }


@pytest.mark.netns
def test_each_pod_resolves_to_its_own_cali_device_on_its_own_node(lab: Lab) -> None:
    lab.add_pod(
        "node-1", "shop", "cart", "10.251.1.11"
    )  # a second pod on node-1: same eth0 ifindex as client
    results = {}
    for node in lab.nodes.values():
        pods = [pod for pod in lab.pods.values() if pod.node == node.name]
        answers = _agent(lab, node, *([pod.ip] for pod in pods))["results"]
        results.update({pod.name: answer for pod, answer in zip(pods, answers, strict=True)})
    assert sorted(results) == ["cart", "client", "server"]
    for pod in lab.pods.values():
        result, node = results[pod.name], lab.nodes[pod.node]
        host_side, pod_side = _links(lab, node.netns)[pod.host_if], _links(lab, pod.netns)["eth0"]
        assert result["ok"] == {
            "interface": pod.host_if,
            "ifindex": host_side["ifindex"],
            "strategy": "netns-scan",
            "netns": f"/run/netns/{pod.netns}",
            "pod_interface": "eth0",
            "pod_ifindex": pod_side["ifindex"],
            "pod_mac": pod.pod_mac,
            "pod_ip": pod.ip,
        }
        assert pod_side["link_index"] == host_side["ifindex"]


@pytest.mark.netns
def test_a_v6_pod_ip_resolves_and_is_echoed_as_asked(lab: Lab) -> None:
    server = lab.pods["server"]
    spelled = ipaddress.ip_address(
        server.ip6
    ).exploded  # same address, other spelling: fd00:0251:0002:0000:...
    (result,) = _agent(lab, lab.nodes["node-2"], ["10.251.2.99", spelled])["results"]
    assert result["ok"]["interface"] == server.host_if
    assert result["ok"]["pod_ip"] == spelled


@pytest.mark.netns
def test_pod_of_another_node_is_not_on_node_despite_an_ifindex_collision(lab: Lab) -> None:
    client, node2 = lab.pods["client"], lab.nodes["node-2"]
    # The trap: client's eth0 peer index also names a veth on node-2 (the server's cali device), and node-2's
    # agent can see client's namespace. Matching on ifindex alone would capture the wrong pod.
    peer_index = _links(lab, client.netns)["eth0"]["link_index"]
    colliding = [row for row in _links(lab, node2.netns).values() if row["ifindex"] == peer_index]
    assert [row["ifname"] for row in colliding] == [lab.pods["server"].host_if]
    assert lab.run(node2, ["ls", "/run/netns"]).stdout.split().count(client.netns) == 1

    (result,) = _agent(lab, node2, [client.ip, client.ip6])["results"]
    assert result == {
        "error": "PodNotOnNode",
        "message": f"no network namespace on node node-2 holds pod IP {client.ip}, {client.ip6}",
    }


@pytest.mark.netns
def test_a_node_ip_is_a_host_network_pod(lab: Lab) -> None:
    node = lab.nodes["node-1"]
    (result,) = _agent(lab, node, [node.ip])["results"]
    assert result["error"] == "HostNetworkPod"
    assert result["message"].endswith("pod uses hostNetwork; there is no pod veth to capture on")
    assert f"{node.ip} is an address of node node-1" in result["message"]


@pytest.mark.netns
def test_without_named_namespaces_the_container_process_leads_to_the_pod(lab: Lab) -> None:
    """A runtime that bind-mounts nothing where we look: /proc/PID/ns/net of the container still finds it."""
    client = lab.pods["client"]
    (result,) = _agent(lab, lab.nodes["node-1"], [client.ip], netns_dirs=[])["results"]
    assert result["ok"]["interface"] == client.host_if
    assert result["ok"]["netns"] == f"/proc/{client.container_pid}/ns/net"


@pytest.mark.netns
def test_list_interfaces_shows_cali_devices_with_their_peer_index(lab: Lab) -> None:
    client = lab.pods["client"]
    interfaces = {i["name"]: i for i in _agent(lab, lab.nodes["node-1"])["interfaces"]}
    cali = interfaces[client.host_if]
    assert cali["kind"] == "veth"
    assert cali["mac"] == "ee:ee:ee:ee:ee:ee"
    assert cali["peer_ifindex"] == _links(lab, client.netns)["eth0"]["ifindex"]
    assert "10.250.0.1/24" in interfaces["eth0"]["addresses"]
    assert interfaces["lo"]["peer_ifindex"] is None


@pytest.mark.netns
def test_nsid_lookup_matches_link_netnsid_and_never_allocates(lab: Lab) -> None:
    client, node1 = lab.pods["client"], lab.nodes["node-1"]
    expected = _links(lab, node1.netns)[client.host_if]["link_netnsid"]

    def ask() -> tuple[int | None, int | None]:
        with NsidLookup() as lookup:
            return lookup.nsid_of(f"/run/netns/{client.netns}"), lookup.nsid_of(
                f"/run/netns/{lab.pods['server'].netns}"
            )

    assert in_netns(node1.netns, ask) == (expected, None)
    assert in_netns(node1.netns, ask) == (
        expected,
        None,
    )  # asking did not assign node-1 an id for server's netns


def test_nsid_lookup_refuses_what_is_not_a_namespace(tmp_path: Any) -> None:
    plain = tmp_path / "not-a-netns"
    plain.write_text("")
    with NsidLookup() as lookup, pytest.raises(OSError):
        lookup.nsid_of(str(plain))


@pytest.mark.parametrize(
    ("ips", "message"),
    [([], "no pod IP given"), (["10.1.1.1", "pod-a"], "not an IP address: 'pod-a'"), ("10.1.1.1", "list")],
)
def test_bad_ips_are_an_invalid_request_before_anything_runs(ips: Any, message: str) -> None:
    with pytest.raises(InvalidCaptureRequest, match=message):
        Resolver(proc_root="/nonexistent", netns_dirs=()).resolve(ips)


def test_resolution_mirrors_the_proto_message() -> None:
    fields = [f.name for f in dataclasses.fields(Resolution)]
    assert fields == [f.name for f in agent_pb2.Resolution.DESCRIPTOR.fields]
