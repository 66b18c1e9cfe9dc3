"""The network context recorded with every capture, read from a real node: what a person diagnosing a capture with
missing packets needs beside the pcap.

The real CaptureManager runs on a thread inside the lab's node-2 (as in test_captures.py), with real tcpdump and a
local directory store. The node netns gets what kube-proxy would give a real node: a Service's NAT chains
(KUBE-SERVICES -> KUBE-SVC -> KUBE-SEP DNAT to the server pod), which also turns conntrack on in that netns. While
the capture runs, the client pod sends the server UDP datagrams (they cross node-2's veth to the pod, so its
counters and its conntrack table show them) and the node's conntrack table is filled past 90% with real entries:
nf_conntrack_max is the kernel's (read-only inside a netns), nf_conntrack_count is the netns' own, and UDP sent to
closed local ports leaves one unreplied entry per tuple (240,000 of them take ~2 s; they vanish with the netns).
IPVS is not loaded here, and ip6tables-save is pointed at a file that does not exist: both are reported, with
their reasons, and the capture completes all the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from podcap.agent._captures import CaptureManager
from podcap.agent._model import CaptureSnapshot, CaptureSpec, JobState, Limits, Programs
from podcap.agent._resolve import Resolver
from podcap.agent._spool import Spool
from podcap.storage import open_store
from tests.support.lab import Lab, build_lab, require_netns
from tests.support.netns import in_netns
from tests.support.processes import spool_root

pytestmark = pytest.mark.netns

SERVICE_IP = "10.96.0.50"
OTHER_POD = "10.251.2.100"  # another pod's endpoint, whose address starts with the server's (10.251.2.10)
UDP_PORT = 9999
DATAGRAMS = 25
# Distinct UDP tuples sent inside node-2: more than 90% of the kernel's nf_conntrack_max (262144 by default).
FILL_ADDRESSES, FILL_PORTS = 4, 60000
MISSING = "/nonexistent/ip6tables-save"


def _nat_rules(pod_ip: str) -> str:
    """kube-proxy's iptables mode for a Service with one endpoint (the server), and an unrelated one."""
    return f"""*nat
:KUBE-SERVICES - [0:0]
:KUBE-SVC-CHECKOUT - [0:0]
:KUBE-SEP-CHECKOUT - [0:0]
:KUBE-SVC-OTHER - [0:0]
:KUBE-SEP-OTHER - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A KUBE-SERVICES -d {SERVICE_IP}/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-CHECKOUT
-A KUBE-SERVICES -d 10.96.0.51/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-OTHER
-A KUBE-SVC-CHECKOUT -m comment --comment "shop/checkout -> {pod_ip}:8080" -j KUBE-SEP-CHECKOUT
-A KUBE-SEP-CHECKOUT -p tcp -m tcp -j DNAT --to-destination {pod_ip}:8080
-A KUBE-SVC-OTHER -j KUBE-SEP-OTHER
-A KUBE-SEP-OTHER -p tcp -m tcp -j DNAT --to-destination {OTHER_POD}:8080
COMMIT
"""


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    require_netns(tcpdump=True)
    with build_lab() as built:
        built.run(
            built.nodes["node-2"],
            ["iptables-restore", "--noflush"],
            input=_nat_rules(built.pods["server"].ip),
        )
        yield built


def _fill_conntrack() -> int:
    """Real conntrack entries in the calling thread's netns: one per (address, port) sent to; the count after."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        for last in range(1, FILL_ADDRESSES + 1):
            for port in range(1, FILL_PORTS + 1):
                with contextlib.suppress(BlockingIOError):  # a full socket buffer: that tuple is skipped
                    sock.sendto(b"", (f"127.0.0.{last}", port))
    return int(Path("/proc/sys/net/netfilter/nf_conntrack_count").read_text())


def test_the_context_shows_the_service_rules_a_full_conntrack_table_and_what_could_not_be_read(
    lab: Lab, tmp_path: Path
) -> None:
    server, client = lab.pods["server"], lab.pods["client"]
    store = tmp_path / "store"
    spec = CaptureSpec(
        capture_id="context",
        pod_ips=(server.ip, server.ip6),
        filter=f"udp port {UDP_PORT}",
        duration_s=60,
        object_key="shop/server.pcap",
    )

    async def scenario(spool: Path) -> tuple[CaptureSnapshot, int]:
        manager = CaptureManager(
            resolver=Resolver(node_name="node-2"),
            store=open_store(f"file://{store}"),
            spool=Spool(spool, "tcpdump"),
            programs=replace(Programs.find(), ip6tables_save=MISSING),
            tcpdump_user="tcpdump",
            limits=Limits(min_free_bytes=0),
        )
        try:
            assert (await manager.start(spec)).state == JobState.RUNNING
            # The start reading is taken beside StartCapture's answer, not before it: wait for it, so that
            # every datagram below falls between the two readings.
            started = manager._job(spec.capture_id).context_start
            assert started is not None
            await started
            await asyncio.to_thread(lab.udp_send, client.netns, server.ip, UDP_PORT, b"context", DATAGRAMS)
            count = _fill_conntrack()  # this thread is in node-2
            await manager.stop(spec.capture_id)
            async with asyncio.timeout(60):
                async for snapshot in manager.watch(spec.capture_id):
                    last = snapshot
            return last, count
        finally:
            await manager.shutdown(10)

    with spool_root() as spool:
        ended, filled = in_netns(lab.nodes["node-2"].netns, lambda: asyncio.run(scenario(spool)))
    assert ended.state == JobState.COMPLETED, ended.error
    assert ended.stats.packets == DATAGRAMS
    context = ended.context
    assert context is not None

    # (a) The Service's path to the pod, as iptables-save prints it; nothing of the other Service.
    assert (
        f"-A KUBE-SEP-CHECKOUT -p tcp -m tcp -j DNAT --to-destination {server.ip}:8080" in context.nat_rules
    )
    assert (
        f"-A KUBE-SERVICES -d {SERVICE_IP}/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-CHECKOUT"
        in context.nat_rules
    )
    assert any(rule.startswith("-A KUBE-SVC-CHECKOUT ") for rule in context.nat_rules)
    assert not any("OTHER" in rule for rule in context.nat_rules)

    # (b) The table is nearly full, and the pod's own flow is among its entries.
    conntrack = context.conntrack
    assert conntrack is not None
    assert filled >= 0.9 * conntrack.max and conntrack.count >= filled
    assert conntrack.nearly_full
    assert any(w.startswith("conntrack table ") and "% full" in w for w in context.warnings)
    assert conntrack.pod_entries >= 1
    assert any(f"dst={server.ip} " in e and f"dport={UDP_PORT} " in e for e in conntrack.entries)

    # (c) What could not be read says why; the rest was read.
    sources = {s.name: s for s in context.sources}
    assert not sources["ipvs"].ok and "IPVS not loaded" in sources["ipvs"].detail
    assert not sources["ip6tables"].ok and f"tool not found ({MISSING})" in sources["ip6tables"].detail
    assert all(
        sources[name].ok
        for name in (
            "addresses",
            "routes",
            "neighbours",
            "pod_device",
            "host_device",
            "conntrack",
            "conntrack_entries",
            "iptables",
        )
    )

    # (d) The datagrams crossed the node's veth into the pod, between the two readings.
    start, end = context.host_device_start, context.host_device_end
    assert start is not None and end is not None and end.device == server.host_if
    assert end.tx_packets - start.tx_packets >= DATAGRAMS
    pod_start, pod_end = context.pod_device_start, context.pod_device_end
    assert pod_start is not None and pod_end is not None and pod_end.device == "eth0"
    assert pod_end.rx_packets - pod_start.rx_packets >= DATAGRAMS

    # Inside the pod: its addresses, its default route, the node's veth as its neighbour.
    assert any(a.startswith(f"eth0 {server.ip}/") and server.ip6 in a for a in context.pod_addresses)
    assert any(r.startswith("default ") and "dev eth0" in r for r in context.pod_routes)

    # The whole record lies next to the pcap, with every entry.
    assert context.object_key == "shop/server.context.json"
    record = json.loads((store / "shop/server.context.json").read_text())
    assert record["capture_id"] == "context"
    assert len(record["end"]["conntrack_entries"]) == conntrack.pod_entries
    assert record["start"]["host_device"]["device"] == server.host_if
