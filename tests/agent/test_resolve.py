"""Pod IP -> host-side device, against real namespaces and veths wired like Calico: the traps (ifindex
collisions, namespaces linked to two nodes), what the resolver remembers between requests and why it is never
stale, ``netns_alive``, and that resolving leaves nothing behind. Other CNIs: test_resolve_cni.py.

The resolver runs the way the agent does: as a process inside a node's netns (``ip netns exec``), or on a thread
inside it (the agent's worker threads), seeing every namespace on the machine, including the other node's pods.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import sys
import threading
from typing import Any

import pytest

from podcap.agent._errors import AgentError, InvalidCaptureRequest, PodNotOnNode
from podcap.agent._netlink import RouteSocket
from podcap.agent._resolve import Resolution, Resolver
from podcap.api.v1 import common_pb2
from tests.support.lab import Lab, LabPod, Node
from tests.support.netns import in_netns

_AGENT = """
import dataclasses, json, sys
from podcap.agent._errors import AgentError
from podcap.agent._resolve import Resolver, list_interfaces
node, kwargs, queries = json.loads(sys.argv[1])
pod_interface = kwargs.pop("pod_interface", "")
resolver = Resolver(node_name=node, **kwargs)
results = []
for ips in queries:
    try:
        results.append({"ok": dataclasses.asdict(resolver.resolve(ips, pod_interface=pod_interface))})
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
    results, strategies = {}, {}
    for node in lab.nodes.values():
        pods = [pod for pod in lab.pods.values() if pod.node == node.name]
        answers = _agent(lab, node, *([pod.ip] for pod in pods))["results"]
        results.update({pod.name: answer for pod, answer in zip(pods, answers, strict=True)})
        # One agent process per node: its first answer scans, the next ones come from what that scan saw.
        strategies.update(
            {pod.name: "netns-scan (cached)" if i else "netns-scan" for i, pod in enumerate(pods)}
        )
    assert sorted(results) == ["cart", "client", "server"]
    for pod in lab.pods.values():
        result, node = results[pod.name], lab.nodes[pod.node]
        host_side, pod_side = _links(lab, node.netns)[pod.host_if], _links(lab, pod.netns)["eth0"]
        assert result["ok"] == {
            "interface": pod.host_if,
            "ifindex": host_side["ifindex"],
            "strategy": strategies[pod.name],
            "netns": f"/run/netns/{pod.netns}",
            "pod_interface": "eth0",
            "pod_ifindex": pod_side["ifindex"],
            "pod_mac": pod.pod_mac,
            "pod_ip": pod.ip,
            "host_mac": host_side["address"],  # Calico's ee:ee:ee:ee:ee:ee
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
def test_a_namespace_linked_to_two_nodes_never_borrows_the_other_nodes_device(lab: Lab) -> None:
    """client's netns also gets a device pair with node-2 (as a secondary network might): node-2 now has an nsid
    for it, and client's eth0 peer index still names server's cali device there. Index and back-pointer agree
    (both eth0 are ifindex 2); only the nsid tells them apart."""
    client, node2 = lab.pods["client"], lab.nodes["node-2"]
    lab.run(
        node2, ["ip", "link", "add", "trap", "type", "veth", "peer", "name", "net9", "netns", client.netns]
    )
    peer_index = _links(lab, client.netns)["eth0"]["link_index"]
    assert _links(lab, node2.netns)[lab.pods["server"].host_if]["ifindex"] == peer_index
    (result,) = _agent(lab, node2, [client.ip])["results"]
    assert result["error"] == "UncapturablePod"
    assert "eth0 (veth), which has no peer device on the node" in result["message"]
    assert "with a peer on the node: net9 (choose one with --interface)" in result["message"]
    (net9,) = _agent(lab, node2, [client.ip], pod_interface="net9")["results"]
    assert net9["ok"]["interface"] == "trap"


@pytest.mark.netns
def test_a_node_device_paired_with_another_interface_of_the_pod_is_not_its_eth0s(lab: Lab) -> None:
    """cart (node-1) gets a second pair with node-2 whose node-2 end has the very ifindex cart's eth0 names as
    its peer. Index and nsid agree; only the back-pointer (the node device's peer is net9, not eth0) does not."""
    cart, node2 = lab.add_pod("node-1", "shop", "cart", "10.251.1.11"), lab.nodes["node-2"]
    peer_index = _links(lab, cart.netns)["eth0"]["link_index"]
    assert peer_index not in {row["ifindex"] for row in _links(lab, node2.netns).values()}
    lab.run(
        node2,
        [
            "ip",
            "link",
            "add",
            "trap",
            "index",
            str(peer_index),
            "type",
            "veth",
            "peer",
            "name",
            "net9",
            "netns",
            cart.netns,
        ],
    )
    (result,) = _agent(lab, node2, [cart.ip])["results"]
    assert result["error"] == "UncapturablePod"
    assert f"pod IP {cart.ip} is on eth0 (veth), which has no peer device on the node" in result["message"]


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
def test_list_interfaces_agrees_with_iproute2_on_every_device(lab: Lab) -> None:
    node = lab.nodes["node-1"]
    shown = {i["name"]: i for i in _agent(lab, node)["interfaces"]}
    truth = json.loads(lab.run(node, ["ip", "-j", "-d", "addr", "show"]).stdout)
    assert sorted(shown) == sorted(row["ifname"] for row in truth)
    for row in truth:
        got = shown[row["ifname"]]
        kind = (row.get("linkinfo") or {}).get("info_kind") or row["link_type"]
        assert (got["ifindex"], got["kind"], got["mac"]) == (row["ifindex"], kind, row["address"])
        assert got["addresses"] == [f"{a['local']}/{a['prefixlen']}" for a in row["addr_info"]]


@pytest.mark.netns
def test_nsid_lookup_matches_link_netnsid_and_never_allocates(lab: Lab) -> None:
    client, node1 = lab.pods["client"], lab.nodes["node-1"]
    expected = _links(lab, node1.netns)[client.host_if]["link_netnsid"]

    def ask() -> tuple[int | None, int | None]:
        with RouteSocket() as lookup:
            return lookup.nsid_of(f"/run/netns/{client.netns}"), lookup.nsid_of(
                f"/run/netns/{lab.pods['server'].netns}"
            )

    ids_before = lab.run(node1, ["ip", "netns", "list-id"]).stdout
    assert in_netns(node1.netns, ask) == (expected, None)
    assert in_netns(node1.netns, ask) == (
        expected,
        None,
    )  # asking did not give node-1 an id for server's netns
    # Neither does resolving: reading pods from inside them leaves the node's ids alone (no id for itself).
    resolver = Resolver(node_name="node-1")
    in_netns(node1.netns, lambda: resolver.resolve([client.ip]))
    with pytest.raises(PodNotOnNode):
        in_netns(node1.netns, lambda: resolver.resolve([lab.pods["server"].ip]))
    assert lab.run(node1, ["ip", "netns", "list-id"]).stdout == ids_before


def test_nsid_lookup_refuses_what_is_not_a_namespace(tmp_path: Any) -> None:
    plain = tmp_path / "not-a-netns"
    plain.write_text("")
    with RouteSocket() as lookup, pytest.raises(OSError):
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
    assert fields == [f.name for f in common_pb2.Resolution.DESCRIPTOR.fields]


def _in(node: Node, fn: Any) -> Any:
    """Run ``fn`` on a thread inside ``node``'s netns, where the agent runs."""
    return in_netns(node.netns, fn)


def _ifindex(lab: Lab, netns: str, name: str) -> int:
    index: int = _links(lab, netns)[name]["ifindex"]
    return index


@pytest.mark.netns
def test_a_remembered_answer_is_checked_again_and_never_stale(lab: Lab) -> None:
    node = lab.nodes["node-1"]
    resolver = Resolver(node_name="node-1")
    cart = lab.add_pod("node-1", "shop", "cart", "10.251.1.11", ip6="fd00:251:1::11")
    first = _in(node, lambda: resolver.resolve([cart.ip]))
    assert (first.interface, first.strategy) == (cart.host_if, "netns-scan")
    again = _in(node, lambda: resolver.resolve([cart.ip6]))
    assert dataclasses.replace(again, pod_ip=cart.ip) == dataclasses.replace(
        first, strategy="netns-scan (cached)"
    )

    # The pod is deleted and created again: same name, IP and device name, but a new netns and a new device.
    lab.delete_pod("cart")
    cart = lab.add_pod("node-1", "shop", "cart", "10.251.1.11", ip6="fd00:251:1::11")
    fresh = _in(node, lambda: resolver.resolve([cart.ip]))
    assert fresh.strategy == "netns-scan"
    assert (fresh.interface, fresh.netns) == (cart.host_if, f"/run/netns/{cart.netns}")
    assert fresh.ifindex == _ifindex(lab, node.netns, cart.host_if) != first.ifindex

    # The IP moves to another live pod: the remembered namespace no longer holds it.
    assert _in(node, lambda: resolver.resolve([cart.ip])).strategy == "netns-scan (cached)"
    lab.run(cart, ["ip", "addr", "del", f"{cart.ip}/32", "dev", "eth0"])
    lab.run(lab.pods["client"], ["ip", "addr", "add", f"{cart.ip}/32", "dev", "eth0"])
    moved = _in(node, lambda: resolver.resolve([cart.ip]))
    assert (moved.interface, moved.strategy) == (lab.pods["client"].host_if, "netns-scan")


@pytest.mark.netns
def test_a_new_pod_is_found_although_the_cache_does_not_know_it(lab: Lab) -> None:
    node = lab.nodes["node-1"]
    resolver = Resolver(node_name="node-1")
    _in(node, lambda: resolver.resolve([lab.pods["client"].ip]))
    late = lab.add_pod("node-1", "shop", "late", "10.251.1.12", ip6="fd00:251:1::12")
    found = _in(node, lambda: resolver.resolve([late.ip6]))
    assert (found.interface, found.strategy) == (late.host_if, "netns-scan")


@pytest.mark.netns
@pytest.mark.parametrize("netns_dir", ["/run/netns", None], ids=["named", "process-only"])
def test_netns_alive_until_the_pod_is_deleted(lab: Lab, netns_dir: str | None) -> None:
    node = lab.nodes["node-1"]
    resolver = Resolver(node_name="node-1")
    doomed = lab.add_pod("node-1", "shop", "doomed", "10.251.1.13", netns_dir=netns_dir)
    resolution = _in(node, lambda: resolver.resolve([doomed.ip]))
    survivor = _in(node, lambda: resolver.resolve([lab.pods["client"].ip]))
    assert _in(node, lambda: resolver.netns_alive(resolution))
    lab.delete_pod("doomed")
    assert not _in(node, lambda: resolver.netns_alive(resolution))
    assert _in(node, lambda: resolver.netns_alive(survivor))
    assert doomed.host_if not in _links(lab, node.netns)  # gone with its namespace
    with pytest.raises(PodNotOnNode):
        _in(node, lambda: resolver.resolve([doomed.ip]))


@pytest.mark.netns
def test_netns_alive_is_false_for_a_path_that_now_names_another_namespace(lab: Lab) -> None:
    node, client = lab.nodes["node-1"], lab.pods["client"]
    resolution = _in(node, lambda: Resolver().resolve([client.ip]))
    # As if the PID in a /proc path had been reused by a process of another pod on this node, whose eth0 has
    # the same index as client's.
    neighbour = lab.add_pod("node-1", "shop", "neighbour", "10.251.1.14")
    elsewhere = dataclasses.replace(resolution, netns=f"/run/netns/{neighbour.netns}")
    assert _links(lab, neighbour.netns)["eth0"]["ifindex"] == resolution.pod_ifindex
    assert not _in(node, lambda: Resolver().netns_alive(elsewhere))
    assert not _in(
        node, lambda: Resolver().netns_alive(dataclasses.replace(resolution, netns="/nonexistent"))
    )


def _children() -> list[str]:
    """Child processes of this process, across all its threads."""
    kids = []
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children") as f:
            kids += f.read().split()
    return kids


@pytest.mark.netns
def test_resolving_leaves_no_fd_thread_or_process_behind(lab: Lab) -> None:
    node, client, server = lab.nodes["node-1"], lab.pods["client"], lab.pods["server"]
    resolver = Resolver(node_name="node-1")
    children = _children()

    def hammer() -> tuple[int, int, list[str]]:
        before = len(os.listdir("/proc/self/fd")), threading.active_count()
        outcomes, fresh = set(), resolver
        for i in range(100):
            if i % 10 == 0:
                fresh = Resolver(node_name="node-1")  # nothing remembered: a full scan
            try:
                outcomes.add(fresh.resolve([(client.ip, server.ip, node.ip)[i % 3]]).strategy)
            except AgentError as exc:
                outcomes.add(type(exc).__name__)
            resolver.netns_alive(resolver.resolve([client.ip]))
        resolver.list_interfaces()
        after = len(os.listdir("/proc/self/fd")), threading.active_count()
        assert outcomes == {"netns-scan", "netns-scan (cached)", "PodNotOnNode", "HostNetworkPod"}
        return after[0] - before[0], after[1] - before[1], _children()

    fds, threads, kids = _in(node, hammer)
    assert (fds, threads, kids) == (0, 0, children)


@pytest.mark.netns
def test_concurrent_callers_all_get_their_own_pod(lab: Lab) -> None:
    node = lab.nodes["node-1"]
    pods = [lab.pods["client"]] + [
        lab.add_pod("node-1", "shop", f"p{i}", f"10.251.1.{20 + i}", ip6=f"fd00:251:1::{20 + i:x}")
        for i in range(4)
    ]
    resolver = Resolver(node_name="node-1")
    wrong: list[tuple[str, str]] = []

    def caller(pod: LabPod) -> None:
        def ask(ips: list[str]) -> Any:
            return _in(node, lambda: resolver.resolve(ips))

        for i in range(20):
            if i % 5 == 0:  # a pod of another node: a full scan, replacing what the others read from
                with pytest.raises(PodNotOnNode):
                    ask([lab.pods["server"].ip])
            got = ask([pod.ip6 if i % 2 else pod.ip])
            if got.interface != pod.host_if:
                wrong.append((pod.name, got.interface))

    threads = [threading.Thread(target=caller, args=(pod,)) for pod in pods]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert wrong == []
