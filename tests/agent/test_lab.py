"""The simulated cluster the netns tests stand on: traffic flows like on a Calico, flannel, Cilium or AWS VPC CNI
node, relays cross into and out of the root namespace without routes, and nothing survives teardown."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import lab as lab_module
from tests.support.lab import (
    Lab,
    LabPod,
    build_lab,
    calico_if_name,
    require_netns,
    sweep_stale_namespaces,
)
from tests.support.netns import netns_socket


@pytest.fixture
def root_echo() -> Iterator[int]:
    """A TCP server on the root namespace's loopback that answers every connection with its bytes upper-cased."""
    listener = socket.create_server(("127.0.0.1", 0))
    conns: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conns.append(conn)
            with conn:
                data = b""
                while chunk := conn.recv(4096):
                    data += chunk
                conn.sendall(data.upper())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        thread.join(timeout=5)
        listener.close()


def _exchange(sock: socket.socket, address: tuple[str, int], payload: bytes) -> bytes:
    with sock:
        sock.settimeout(5)
        sock.connect(address)
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
        return data


@pytest.mark.netns
def test_pods_are_wired_like_calico(lab: Lab) -> None:
    client = lab.pods["client"]
    assert client.host_if == calico_if_name("shop", "client") == "caliaa50613ef2d"
    assert "default via 169.254.1.1 dev eth0 onlink" in lab.run(client, ["ip", "route"]).stdout
    node_routes = lab.run(lab.nodes["node-1"], ["ip", "route"]).stdout
    assert f"{client.ip} dev {client.host_if} scope link" in node_routes
    keys = [f"net.ipv4.conf.{client.host_if}.proxy_arp", f"net.ipv4.neigh.{client.host_if}.proxy_delay"]
    assert lab.run(lab.nodes["node-1"], ["sysctl", "-n", *keys]).stdout.split() == ["1", "0"]
    # The "container" holds the pod netns the way a runtime's pause process does.
    assert (
        os.stat(f"/proc/{client.container_pid}/ns/net").st_ino == os.stat(f"/run/netns/{client.netns}").st_ino
    )


@pytest.mark.netns
def test_client_reaches_server_across_nodes(lab: Lab) -> None:
    client, server = lab.pods["client"], lab.pods["server"]
    lab.http_server(server, 8080, bind="::")
    assert lab.http_get(client, f"http://{server.ip}:8080/hello.txt") == 200
    assert lab.http_get(client, f"http://[{server.ip6}]:8080/hello.txt") == 200
    assert lab.http_get(client, f"http://{server.ip}:8080/missing") == 404
    assert lab.ping(client, server.ip)
    assert lab.ping(lab.nodes["node-1"], client.ip)
    assert not lab.ping(
        client, "10.251.2.99", timeout=0.3
    )  # nobody holds it: no reply, and nothing leaves the lab


@pytest.mark.netns
def test_udp_arrives_in_the_server_pod(lab: Lab) -> None:
    client, server = lab.pods["client"], lab.pods["server"]
    with netns_socket(server.netns, socket.AF_INET, socket.SOCK_DGRAM) as receiver:
        receiver.bind(("0.0.0.0", 5353))
        receiver.settimeout(5)
        lab.udp_send(client, server.ip, 5353, b"hello", count=3)
        got = [receiver.recvfrom(100) for _ in range(3)]
    assert [(data, addr[0]) for data, addr in got] == [(b"hello", client.ip)] * 3


@pytest.mark.netns
def test_forward_into_reaches_the_root_loopback_from_a_node(lab: Lab, root_echo: int) -> None:
    node = lab.nodes["node-1"]
    relay = lab.forward_into(node, 0, "127.0.0.1", root_echo)
    assert relay.host == "127.0.0.1"
    # The node's own loopback is not the root one: without the relay nothing listens on that port there.
    reply = _exchange(netns_socket(node.netns), ("127.0.0.1", relay.port), b"to s3 and back")
    assert reply == b"TO S3 AND BACK"


@pytest.mark.netns
def test_forward_out_reaches_a_server_inside_a_node(lab: Lab) -> None:
    node = lab.nodes["node-2"]
    lab.http_server(node, 9090)
    relay = lab.forward_out("127.0.0.2", 0, node, "127.0.0.1", 9090)
    for _ in range(2):  # the relay serves connection after connection
        conn = http.client.HTTPConnection("127.0.0.2", relay.port, timeout=5)
        try:
            conn.request("GET", "/hello.txt")
            response = conn.getresponse()
            assert (response.status, response.read()) == (200, b"hello from the podcap lab\n")
        finally:
            conn.close()


def _tagged(pid: int, lab_id: str) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f"PODCAP_LAB={lab_id}".encode() in f.read().split(b"\0")
    except OSError:
        return False


def _gone(pid: int) -> bool:
    """No such process, or a zombie (dead, out of every namespace; PID 1 here does not reap orphans)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.netns
def test_teardown_leaves_no_namespace_process_or_relay_behind(root_echo: int) -> None:
    with pytest.raises(RuntimeError, match="test body failed"), build_lab() as lab:
        names = lab.netns_names()
        node = lab.nodes["node-1"]
        hidden = lab.add_pod("node-1", "shop", "hidden", "10.251.1.20", netns_dir=None)
        mounted = lab.add_pod("node-2", "shop", "mounted", "10.251.2.20", netns_dir=f"{lab.scratch}/docker")
        lab.popen(hidden, ["sleep", "300"])
        started = lab.popen(lab.pods["server"], ["sleep", "300"])
        # A grandchild the lab never saw: only the sweep of the namespace's processes can find it.
        parent = lab.popen(node, ["sh", "-c", "sleep 300 & echo $!; wait"], stdout=subprocess.PIPE, text=True)
        assert parent.stdout is not None
        grandchild = int(parent.stdout.readline())
        lab.forward_into(node, 0, "127.0.0.1", root_echo)
        relay = lab.forward_out("127.0.0.3", 0, node, "127.0.0.1", 1)
        pids = [started.pid, parent.pid, grandchild, *(p.container_pid for p in lab.pods.values())]
        assert not any(_gone(pid) for pid in pids)
        raise RuntimeError("test body failed")

    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert [name for name in names if name in listed] == []
    assert [pid for pid in pids if not _gone(pid)] == []
    assert hidden.container_pid in pids
    with open("/proc/self/mountinfo") as f:
        assert mounted.netns not in f.read()
    assert not os.path.exists(lab.scratch)
    # A process the lab started in the unnamed namespace, which nothing but the lab's own fd leads to.
    assert not [pid for pid in os.listdir("/proc") if pid.isdigit() and _tagged(int(pid), lab.id)]
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.3", relay.port)) != 0
    deadline = time.monotonic() + 5
    while any(t.name.startswith(("relay-", "netns-")) for t in threading.enumerate()):
        assert time.monotonic() < deadline, [t.name for t in threading.enumerate()]
        time.sleep(0.01)


@pytest.mark.netns
def test_sweep_deletes_namespaces_of_dead_runs_only() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"pc{dead.pid:x}x{os.getpid() % 4096:03x}f"
    alive = f"pc{os.getppid():x}x{os.getpid() % 4096:03x}f"
    foreign = f"pc{dead.pid:x}-other"
    try:
        for name in (stale, alive, foreign):
            subprocess.run(["ip", "netns", "add", name], check=True)
        swept = sweep_stale_namespaces()
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
        assert stale not in listed
        assert alive in listed
        assert foreign in listed
        assert alive not in swept
        assert foreign not in swept
    finally:
        for name in (stale, alive, foreign):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


@pytest.mark.netns
def test_sweep_kills_processes_and_unmounts_namespaces_of_dead_runs(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    run = f"pc{dead.pid:x}x{os.getpid() % 4096:03x}"
    scratch = tmp_path / f"podcap-lab-{run}-abc"
    scratch.mkdir()
    mount_point = scratch / f"{run}p1"
    mount_point.touch()
    holder = subprocess.Popen(
        ["unshare", "--net", "sleep", "300"], env={**os.environ, "PODCAP_LAB": run}, stdin=subprocess.DEVNULL
    )
    try:
        while os.stat(f"/proc/{holder.pid}/ns/net").st_ino == os.stat("/proc/self/ns/net").st_ino:
            time.sleep(0.001)  # unshare has not switched yet
        subprocess.run(["mount", "--bind", f"/proc/{holder.pid}/ns/net", str(mount_point)], check=True)
        sweep_stale_namespaces()
        assert holder.wait(timeout=10) == -9
        with open("/proc/self/mountinfo") as f:
            assert str(mount_point) not in f.read()
    finally:
        holder.kill()
        holder.wait()
        subprocess.run(["umount", "--lazy", str(mount_point)], capture_output=True, check=False)


@pytest.mark.netns
def test_delete_pod_takes_its_namespace_processes_and_node_devices_with_it(lab: Lab) -> None:
    node = lab.nodes["node-1"]
    pod = lab.add_pod("node-1", "shop", "gone", "10.251.1.30", ip6="fd00:251:1::30", cni="cilium")
    server = lab.popen(pod, ["sleep", "300"])
    lab.delete_pod("gone")
    assert "gone" not in lab.pods
    assert server.wait(timeout=5) == -9
    assert _gone(pod.container_pid)
    assert not os.path.exists(f"/run/netns/{pod.netns}")
    assert pod.host_if not in lab.run(node, ["ip", "-o", "link"]).stdout
    assert pod.ip not in lab.run(node, ["ip", "route"]).stdout  # Cilium's route via cilium_host, too
    # The same pod can come back (a StatefulSet pod keeps its name and, here, its IP).
    again = lab.add_pod("node-1", "shop", "gone", "10.251.1.30", ip6="fd00:251:1::30", cni="cilium")
    assert lab.ping(node, again.ip) and lab.ping(node, again.ip6)


# --- the other CNIs ---------------------------------------------------------------------------------------------
def _json(lab: Lab, where: str | LabPod, argv: list[str]) -> Any:
    return json.loads(lab.run(where, argv).stdout)


def _tx_packets(lab: Lab, pod: LabPod) -> int:
    (row,) = _json(lab, lab.nodes[pod.node].netns, ["ip", "-j", "-s", "link", "show", "dev", pod.host_if])
    packets: int = row["stats64"]["tx"]["packets"]
    return packets


@pytest.mark.netns
def test_bridge_pods_reach_their_gateway_and_each_other_and_the_bridge_learns_them(cni_lab: Lab) -> None:
    pod, other = cni_lab.pods["bridge-1"], cni_lab.pods["bridge-1b"]
    node = cni_lab.nodes[pod.node]
    addrs = _json(cni_lab, pod, ["ip", "-j", "addr", "show", "dev", "eth0"])[0]["addr_info"]
    assert {(a["local"], a["prefixlen"]) for a in addrs if a["scope"] == "global"} == {
        (pod.ip, 24),
        (pod.ip6, 64),
    }
    assert cni_lab.ping(pod, "10.251.1.1") and cni_lab.ping(pod, "fd00:251:1::1")
    assert cni_lab.ping(pod, other.ip) and cni_lab.ping(pod, other.ip6)
    assert cni_lab.ping(pod, cni_lab.pods["calico-2"].ip)  # and, routed by the node, another node's pod
    (port,) = _json(cni_lab, node.netns, ["ip", "-j", "-d", "link", "show", "dev", pod.host_if])
    assert (port["master"], port["linkinfo"]["info_slave_kind"]) == ("cni0", "bridge")
    learned = _json(cni_lab, node.netns, ["bridge", "-j", "fdb", "show", "br", "cni0"])
    assert [(e["ifname"], e.get("state", "")) for e in learned if e["mac"] == pod.pod_mac] == [
        (pod.host_if, "")  # learned from traffic, not a permanent entry
    ]


@pytest.mark.netns
def test_cilium_pods_are_routed_via_cilium_host_and_reach_the_pod_through_its_lxc(cni_lab: Lab) -> None:
    pod, remote = cni_lab.pods["cilium-1"], cni_lab.pods["cilium-2"]
    node = cni_lab.nodes[pod.node]
    for ip in (pod.ip, pod.ip6):
        assert _json(cni_lab, node.netns, ["ip", "-j", "route", "get", ip])[0]["dev"] == "cilium_host"
    before = _tx_packets(cni_lab, pod)
    assert cni_lab.ping(node, pod.ip) and cni_lab.ping(node, pod.ip6)
    assert cni_lab.ping(remote, pod.ip) and cni_lab.ping(remote, pod.ip6)
    assert _tx_packets(cni_lab, pod) >= before + 4  # the replies' way in was the lxc device, not cilium_net
    assert cni_lab.run(node, ["sysctl", "-n", f"net.ipv4.conf.{pod.host_if}.proxy_arp"]).stdout.strip() == "0"


@pytest.mark.netns
def test_eni_pods_have_a_static_gateway_neighbour_instead_of_proxy_arp(cni_lab: Lab) -> None:
    pod = cni_lab.pods["eni-1"]
    node = cni_lab.nodes[pod.node]
    assert cni_lab.run(node, ["sysctl", "-n", f"net.ipv4.conf.{pod.host_if}.proxy_arp"]).stdout.strip() == "0"
    host_mac = _json(cni_lab, node.netns, ["ip", "-j", "link", "show", "dev", pod.host_if])[0]["address"]
    neighbours = _json(cni_lab, pod, ["ip", "-j", "neigh", "show", "dev", "eth0"])
    assert {"dst": "169.254.1.1", "lladdr": host_mac, "state": ["PERMANENT"]}.items() <= next(
        n for n in neighbours if n["dst"] == "169.254.1.1"
    ).items()
    assert cni_lab.ping(node, pod.ip) and cni_lab.ping(node, pod.ip6)
    assert cni_lab.ping(pod, cni_lab.pods["eni-2"].ip) and cni_lab.ping(pod, cni_lab.pods["eni-2"].ip6)


@pytest.mark.netns
def test_multus_pods_talk_over_net1_on_their_own_bridge(cni_lab: Lab) -> None:
    pod, other = cni_lab.pods["multus-1"], cni_lab.pods["multus-1b"]
    (net1,) = pod.extra
    for cidr in other.extra[0].addresses:
        assert cni_lab.ping(pod, cidr.split("/")[0])
    (port,) = _json(cni_lab, cni_lab.nodes[pod.node].netns, ["ip", "-j", "link", "show", "dev", net1.host_if])
    assert port["master"] == "mnet1"
    assert cni_lab.ping(pod, cni_lab.pods["calico-2"].ip)  # eth0 still carries the cluster traffic


@pytest.mark.netns
def test_runtimes_leave_namespaces_named_mounted_or_only_held_by_a_process(cni_lab: Lab) -> None:
    named = set(os.listdir("/run/netns"))
    hidden, mounted = cni_lab.pods["procns-1"], cni_lab.pods["dockerns-1"]
    assert hidden.netns == f"/proc/{hidden.container_pid}/ns/net"
    assert os.path.ismount(mounted.netns) and os.path.basename(mounted.netns) not in named
    assert cni_lab.pods["calico-1"].netns in named
    for pod in (hidden, mounted):
        assert os.stat(pod.netns).st_ino == os.stat(f"/proc/{pod.container_pid}/ns/net").st_ino
        assert pod.ip in cni_lab.run(pod, ["ip", "-o", "addr"]).stdout  # the helpers reach them too
        assert cni_lab.ping(cni_lab.nodes[pod.node], pod.ip6)


@pytest.mark.parametrize(("ci", "outcome"), [("true", pytest.fail.Exception), ("", pytest.skip.Exception)])
def test_missing_namespaces_skip_locally_but_fail_under_ci(
    monkeypatch: pytest.MonkeyPatch, ci: str, outcome: type[BaseException]
) -> None:
    monkeypatch.setattr(lab_module, "netns_problem", lambda: "needs root to create network namespaces")
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="needs root"):
        require_netns()
