"""The agent's Probe, `podcap diagnose`'s ladder, from inside a lab pod through a real `podcap agent` on its node.

The pods under test have their own /etc/resolv.conf in a mount namespace of their own, naming a DNS server in
another lab pod (`Lab.dns_server`: A records, and a log of who asked), or one that never answers.
On node-2 a server pod accepts on one port, has nothing on another (the kernel answers RST) and drops SYNs to a
third (iptables in its netns). Each step's outcome and wording is what `podcap diagnose` prints.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from podcap.api.v1 import agent_pb2, common_pb2
from tests.support.agents import NodeAgent
from tests.support.lab import Lab, build_lab, require_netns
from tests.support.processes import spool_root

pytestmark = pytest.mark.netns

SERVER = "10.251.2.10"
DNS = "10.251.2.53"
SILENT_DNS = "10.251.2.54"
OPEN, CLOSED, DROPPED = 8080, 8081, 8082
SEARCH = "search shop.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n"
TIMEOUT = Duration(nanos=500_000_000)


@dataclass
class Rig:
    lab: Lab
    agent: NodeAgent
    dns_log: Path

    def probe(
        self, pod: str, host: str, port: int, *also: agent_pb2.ProbeAddress
    ) -> list[common_pb2.DiagnoseStep]:
        request = agent_pb2.ProbeRequest(
            pod=agent_pb2.PodRef(namespace="shop", name=pod, ips=[self.lab.pods[pod].ip]),
            host=host,
            port=port,
            also=also,
            timeout=TIMEOUT,
        )
        return list(self.agent.stub.Probe(request, timeout=30).steps)


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    require_netns(tcpdump=True)
    tmp = tmp_path_factory.mktemp("probe")
    with build_lab(default_pods=False) as lab, spool_root() as spool:
        lab.add_pod("node-1", "shop", "client", "10.251.1.10", resolv_conf=f"nameserver {DNS}\n{SEARCH}")
        lab.add_pod("node-1", "shop", "lost", "10.251.1.11", resolv_conf=f"nameserver {SILENT_DNS}\n{SEARCH}")
        lab.add_pod("node-2", "shop", "server", SERVER)
        lab.add_pod("node-2", "kube-system", "dns", DNS)
        lab.add_pod("node-2", "kube-system", "silent-dns", SILENT_DNS)
        dns_log = tmp / "queries.log"
        lab.dns_server(lab.pods["dns"], {"web.shop.svc.cluster.local": SERVER}, str(dns_log))
        lab.dns_server(lab.pods["silent-dns"], {}, answer=False)
        lab.http_server(lab.pods["server"], OPEN)
        lab.run(
            lab.pods["server"],
            ["iptables", "-A", "INPUT", "-p", "tcp", "--dport", str(DROPPED), "-j", "DROP"],
        )
        agent = NodeAgent(lab, lab.nodes["node-1"], f"file://{tmp / 'store'}", spool, tmp)
        try:
            agent.start()
            yield Rig(lab, agent, dns_log)
        finally:
            agent.close()


def _by_name(steps: list[common_pb2.DiagnoseStep]) -> dict[str, common_pb2.DiagnoseStep]:
    return {step.name: step for step in steps}


def test_an_ip_skips_dns_and_connects_from_the_pod(rig: Rig) -> None:
    steps = rig.probe("client", SERVER, OPEN)
    assert [s.name for s in steps] == ["resolver", "connect"]
    resolver, connect = steps
    pid = rig.lab.pods["client"].container_pid
    assert resolver.ok, resolver.detail
    # The container's own file, not the node's: its nameserver, search list and ndots, and where it was read.
    assert resolver.detail == (
        f"nameserver {DNS}; search shop.svc.cluster.local svc.cluster.local cluster.local; ndots 5 "
        f"(/proc/{pid}/root/etc/resolv.conf, pid {pid} sleep)"
    )
    assert connect.ok and connect.detail == f"connected to {SERVER}:{OPEN}"


def test_a_service_name_resolves_through_the_search_list_and_every_address_is_tried(rig: Rig) -> None:
    steps = _by_name(
        rig.probe(
            "client",
            "web",
            OPEN,
            agent_pb2.ProbeAddress(
                step="service", label="ClusterIP of shop/web", address=SERVER, port=CLOSED
            ),
            agent_pb2.ProbeAddress(
                step="endpoint", label="endpoint of shop/web", address=SERVER, port=DROPPED
            ),
        )
    )
    assert list(steps) == ["resolver", "dns", "connect", "service", "endpoint"]
    assert steps["dns"].ok and steps["dns"].detail == f"web.shop.svc.cluster.local -> {SERVER} via {DNS}:53"
    assert steps["connect"].ok and steps["connect"].detail == f"connected to {SERVER}:{OPEN}"
    assert not steps["service"].ok
    assert steps["service"].detail == f"ClusterIP of shop/web: refused (RST) by {SERVER}:{CLOSED}"
    assert not steps["endpoint"].ok
    assert steps["endpoint"].detail == f"endpoint of shop/web: no answer from {SERVER}:{DROPPED} in 500 ms"
    # The query left from the pod's own address, as the application's would.
    assert "10.251.1.10 web.shop.svc.cluster.local 1" in rig.dns_log.read_text().splitlines()


def test_a_name_that_does_not_exist_is_nxdomain_after_the_whole_search_list(rig: Rig) -> None:
    steps = _by_name(rig.probe("client", "nosuch", OPEN))
    assert not steps["dns"].ok
    assert steps["dns"].detail == (
        "NXDOMAIN: nosuch (tried nosuch.shop.svc.cluster.local, nosuch.svc.cluster.local, "
        f"nosuch.cluster.local, nosuch) via {DNS}:53"
    )
    assert not steps["connect"].ok and steps["connect"].detail == "not tried: nosuch did not resolve"


def test_a_fully_qualified_name_is_asked_as_it_is(rig: Rig) -> None:
    steps = _by_name(rig.probe("client", "web.shop.svc.cluster.local.", OPEN))
    assert steps["dns"].detail == f"web.shop.svc.cluster.local -> {SERVER} via {DNS}:53"
    assert steps["connect"].ok


def test_a_nameserver_that_never_answers(rig: Rig) -> None:
    steps = _by_name(
        rig.probe("lost", "web", OPEN, agent_pb2.ProbeAddress(step="service", address=SERVER, port=OPEN))
    )
    assert not steps["dns"].ok
    assert steps["dns"].detail == f"no answer from {SILENT_DNS}:53 in 500 ms"
    assert steps["connect"].detail == "not tried: web did not resolve"
    # DNS being down does not hide that the address itself answers.
    assert steps["service"].ok and steps["service"].detail == f"connected to {SERVER}:{OPEN}"


def test_no_agent_thread_is_left_inside_a_pod(rig: Rig) -> None:
    rig.probe("client", "web", OPEN)
    assert rig.agent.process is not None
    node = os.stat(f"/run/netns/{rig.lab.nodes['node-1'].netns}")
    tasks = Path(f"/proc/{rig.agent.process.pid}/task")
    for task in tasks.iterdir():
        st = os.stat(task / "ns" / "net")
        assert (st.st_dev, st.st_ino) == (node.st_dev, node.st_ino), (
            f"agent thread {task.name} is in another netns"
        )


@pytest.mark.parametrize(
    ("pod_ips", "host", "port", "code", "words"),
    [
        (["10.251.9.9"], "web", OPEN, grpc.StatusCode.NOT_FOUND, "no network namespace on node node-1 holds"),
        (
            ["10.251.1.10"],
            "web site",
            OPEN,
            grpc.StatusCode.INVALID_ARGUMENT,
            "neither an IP address nor a DNS name",
        ),
        (["10.251.1.10"], "", OPEN, grpc.StatusCode.INVALID_ARGUMENT, "host is required"),
        (
            ["10.251.1.10"],
            "web",
            0,
            grpc.StatusCode.INVALID_ARGUMENT,
            "port must be a TCP port between 1 and 65535",
        ),
        (["10.251.1.10"], "web", 70000, grpc.StatusCode.INVALID_ARGUMENT, "between 1 and 65535"),
        ([], "web", OPEN, grpc.StatusCode.INVALID_ARGUMENT, "pod.ips is empty"),
    ],
)
def test_refusals(
    rig: Rig, pod_ips: list[str], host: str, port: int, code: grpc.StatusCode, words: str
) -> None:
    request = agent_pb2.ProbeRequest(
        pod=agent_pb2.PodRef(namespace="shop", name="x", ips=pod_ips), host=host, port=port
    )
    with pytest.raises(grpc.RpcError) as refused:
        rig.agent.stub.Probe(request, timeout=30)
    assert refused.value.code() == code
    assert words in (refused.value.details() or "")
