"""Verdicts from both ends of real conversations: tcpdump on the client's and the server's host veths at once.

The client pod is on node-1, the server pod on node-2. Each attempt dies somewhere else: an iptables rule in
node-1's FORWARD chain drops SYNs to one port (the server never receives them), a closed port answers RST, a rule
in node-2's FORWARD chain drops the SYN+ACKs of another port after they left the server's veth (the reply is lost
between the nodes), a DNS server reads and never answers, and one HTTP request just works. Each end's pcap is
summarised by the agent's own code (summary + exchanges, as the tcpdump user), mapped to protobuf as the agent
sends it, and the controller's combiner is given the two ends, as it is when both summaries are in.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from podcap.agent._exchanges import add_exchanges
from podcap.agent._servicer import _summary
from podcap.agent._summary import summarise
from podcap.api.v1 import common_pb2
from podcap.controller._verdicts import End, verdicts
from tests.support.lab import Lab, build_lab, require_netns
from tests.support.netns import netns_socket

pytestmark = pytest.mark.netns

CLIENT_IP, SERVER_IP = "10.251.1.10", "10.251.2.10"
NOT_RECEIVED, CLOSED, REPLY_LOST, HTTP, SILENT_DNS = 9101, 9102, 9103, 9104, 5301
CLIENT, SERVER = "shop/client@node-1", "shop/server@node-2"

SILENT = f"""
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", {SILENT_DNS}))
print("ready", flush=True)
while True:
    s.recvfrom(512)
"""


@dataclass
class Both:
    ports: dict[str, int]
    client: common_pb2.CaptureSummary
    server: common_pb2.CaptureSummary


def _connect(lab: Lab, port: int, timeout: float, request: bytes = b"") -> int:
    with netns_socket(lab.pods["client"].netns) as sock:
        sock.settimeout(timeout)
        sock.bind(("0.0.0.0", 0))
        source = int(sock.getsockname()[1])
        try:
            sock.connect((SERVER_IP, port))
            if request:
                sock.sendall(request)
                sock.recv(4096)
        except (TimeoutError, ConnectionRefusedError):
            pass
        return source


def _summarised(path: str) -> common_pb2.CaptureSummary:
    pcap = Path(path)
    return _summary(add_exchanges(summarise(pcap, user="tcpdump"), pcap, user="tcpdump"))


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Both]:
    require_netns(tcpdump=True)
    with build_lab() as lab:
        client, server = lab.pods["client"], lab.pods["server"]
        node1, node2 = lab.nodes[client.node].netns, lab.nodes[server.node].netns
        lab.run(
            node1,
            ["iptables", "-A", "FORWARD", "-p", "tcp", "--dport", str(NOT_RECEIVED), "--syn", "-j", "DROP"],
        )
        lab.run(
            node2,
            [
                *("iptables", "-A", "FORWARD", "-p", "tcp", "--sport", str(REPLY_LOST)),
                *("--tcp-flags", "SYN,ACK", "SYN,ACK", "-j", "DROP"),
            ],
        )
        lab.http_server(server.netns, REPLY_LOST)
        lab.http_server(server.netns, HTTP)
        silent = lab.popen(server.netns, [sys.executable, "-c", SILENT], stdout=subprocess.PIPE)
        assert silent.stdout is not None and silent.stdout.readline().strip() == b"ready"
        silent.stdout.close()
        where = tmp_path_factory.mktemp("verdicts")
        c_pcap, s_pcap = str(where / "client.pcap"), str(where / "server.pcap")
        ports: dict[str, int] = {}
        with lab.tcpdumps((node1, client.host_if, c_pcap), (node2, server.host_if, s_pcap)):
            ports["not_received"] = _connect(lab, NOT_RECEIVED, 1.2)
            ports["closed"] = _connect(lab, CLOSED, 2)
            ports["reply_lost"] = _connect(lab, REPLY_LOST, 1.2)
            ports["http"] = _connect(lab, HTTP, 5, b"GET /hello.txt HTTP/1.0\r\n\r\n")
            with netns_socket(client.netns, socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.bind(("0.0.0.0", 0))
                ports["dns"] = int(sock.getsockname()[1])
                question = b"\x03api\x04shop\x00\x00\x01\x00\x01"
                sock.sendto(
                    struct.pack("!HHHHHH", 0x3333, 0x0100, 1, 0, 0, 0) + question, (SERVER_IP, SILENT_DNS)
                )
            time.sleep(0.3)  # the query reaches the server's veth
        yield Both(ports, _summarised(c_pcap), _summarised(s_pcap))


def _ends(both: Both) -> list[End]:
    return [
        End(CLIENT, (CLIENT_IP, "fd00:251:1::10"), both.client),
        End(SERVER, (SERVER_IP, "fd00:251:2::10"), both.server),
    ]


def _verdict(found: list[common_pb2.Verdict], subject: str) -> common_pb2.Verdict:
    matches = [v for v in found if v.subject == subject]
    assert len(matches) == 1, [v.subject for v in found]
    return matches[0]


def _tcp(both: Both, scenario: str, port: int) -> str:
    return f"{CLIENT_IP}:{both.ports[scenario]} -> {SERVER_IP}:{port}"


def test_syn_dropped_on_the_client_node_never_reached_the_server(both: Both) -> None:
    v = _verdict(verdicts(_ends(both)), _tcp(both, "not_received", NOT_RECEIVED))
    assert (v.protocol, v.ok, v.code, v.verdict) == (
        "tcp",
        False,
        "syn_not_received",
        "the server never received the SYN",
    )
    assert v.evidence[0].startswith(f"{CLIENT}: 2 SYNs, 0 SYN+ACKs")
    assert v.evidence[1] == f"{SERVER}: nothing"


def test_closed_port_is_the_server_answering_rst(both: Both) -> None:
    v = _verdict(verdicts(_ends(both)), _tcp(both, "closed", CLOSED))
    assert (v.ok, v.code, v.verdict) == (False, "server_reset", "the server answered RST")
    assert list(v.evidence) == [
        f"{CLIENT}: 1 SYN, 0 SYN+ACKs, reset by the server",
        f"{SERVER}: 1 SYN, 0 SYN+ACKs, reset by the server",
    ]


def test_syn_ack_dropped_between_the_nodes_is_a_lost_reply(both: Both) -> None:
    v = _verdict(verdicts(_ends(both)), _tcp(both, "reply_lost", REPLY_LOST))
    assert (v.ok, v.code, v.verdict) == (False, "reply_lost", "the reply was lost between the nodes")
    assert v.evidence[0].startswith(f"{CLIENT}: 2 SYNs, 0 SYN+ACKs")
    assert v.evidence[1].startswith(f"{SERVER}: 2 SYNs, ")  # and the SYN+ACKs it sent, retransmitted or not


def test_working_request_is_connected(both: Both) -> None:
    v = _verdict(verdicts(_ends(both)), _tcp(both, "http", HTTP))
    assert (v.ok, v.code, v.verdict) == (True, "connected", "connected")


def test_dns_server_that_never_answers(both: Both) -> None:
    v = _verdict(
        verdicts(_ends(both)), f"A api.shop from {CLIENT_IP}:{both.ports['dns']} to {SERVER_IP}:{SILENT_DNS}"
    )
    assert (v.protocol, v.ok, v.code, v.verdict) == ("dns", False, "no_dns_answer", "no DNS answer")
    assert list(v.evidence) == [f"{CLIENT}: 1 query, no answer", f"{SERVER}: 1 query, no answer"]


def test_one_end_alone_tells_what_it_can(both: Both) -> None:
    alone = verdicts(_ends(both)[:1])
    codes = {v.subject: v.code for v in alone}
    assert codes[_tcp(both, "not_received", NOT_RECEIVED)] == "syn_unanswered"
    assert codes[_tcp(both, "reply_lost", REPLY_LOST)] == "syn_unanswered"
    assert codes[_tcp(both, "closed", CLOSED)] == "server_reset"
    assert codes[_tcp(both, "http", HTTP)] == "connected"
    assert _verdict(alone, _tcp(both, "not_received", NOT_RECEIVED)).verdict == "2 SYNs without an answer"
