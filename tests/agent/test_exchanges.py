"""TCP attempts and DNS queries found by pyshark over real tshark in pcaps real tcpdump wrote in the lab.

The client pod (node-1) tries the server pod (node-2) five ways while tcpdump listens on the client's host veth:
a port whose SYNs an iptables rule in the server's netns drops, a closed port (RST), an HTTP server (a completed
handshake), and DNS to a UDP server that reads and never answers and to one that answers. The pass runs as the
unprivileged tcpdump user, as on a node, and from a working directory holding a config.ini that pyshark would
choke on if it read it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from podcap.agent._exchanges import Exchanges, add_exchanges, find_exchanges
from podcap.agent._summary import Summary, SummaryState, TcpAttempt, summarise
from tests.support.lab import Lab, build_lab, require_netns
from tests.support.netns import netns_socket

pytestmark = pytest.mark.netns

SERVER_IP = "10.251.2.10"
DROPPED, CLOSED, HTTP, SILENT_DNS, DNS = 9001, 9002, 8080, 5301, 5302

# A DNS server in the server pod: answers queries on one port (NOERROR, no records), reads and ignores them on
# the other, like a resolver that is overloaded or firewalled on its way back.
RESPONDER = f"""
import select, socket
answering, silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM), socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
answering.bind(("0.0.0.0", {DNS})); silent.bind(("0.0.0.0", {SILENT_DNS}))
print("ready", flush=True)
while True:
    for sock in select.select([answering, silent], [], [])[0]:
        query, peer = sock.recvfrom(512)
        if sock is answering:
            answering.sendto(query[:2] + b"\\x81\\x80" + query[4:], peer)
"""


def dns_query(ident: int, name: str) -> bytes:
    question = b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0\0\1\0\1"
    return struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + question


@dataclass
class Seen:
    lab: Lab
    pcap: Path
    ports: dict[str, int]  # scenario -> the client's source port
    exchanges: Exchanges


def _connect(lab: Lab, port: int, timeout: float, *, request: bytes = b"") -> int:
    """Connects from the client pod; returns the source port whatever happens."""
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


def _ask(lab: Lab, port: int, ident: int, name: str, wait: float) -> int:
    with netns_socket(lab.pods["client"].netns, socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("0.0.0.0", 0))
        sock.settimeout(wait)
        sock.sendto(dns_query(ident, name), (SERVER_IP, port))
        with contextlib.suppress(TimeoutError):
            sock.recvfrom(512)
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def seen(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seen]:
    require_netns(tcpdump=True)
    with build_lab() as lab:
        client, server = lab.pods["client"], lab.pods["server"]
        lab.run(server.netns, ["iptables", "-A", "INPUT", "-p", "tcp", "--dport", str(DROPPED), "-j", "DROP"])
        lab.http_server(server.netns, HTTP)
        responder = lab.popen(server.netns, [sys.executable, "-c", RESPONDER], stdout=subprocess.PIPE)
        assert responder.stdout is not None and responder.stdout.readline().strip() == b"ready"
        pcap = tmp_path_factory.mktemp("exchanges") / "client.pcap"
        ports: dict[str, int] = {}
        with lab.tcpdumps((lab.nodes[client.node].netns, client.host_if, str(pcap))):
            # Linux resends an unanswered SYN after 1 s: 1.3 s sees the first retry.
            ports["dropped"] = _connect(lab, DROPPED, 1.3)
            ports["closed"] = _connect(lab, CLOSED, 2)
            ports["http"] = _connect(lab, HTTP, 5, request=b"GET /hello.txt HTTP/1.0\r\n\r\n")
            ports["silent_dns"] = _ask(lab, SILENT_DNS, 0x1111, "nobody.shop.svc.cluster.local", 0.3)
            ports["dns"] = _ask(lab, DNS, 0x2222, "server.shop.svc.cluster.local", 2)
            time.sleep(0.2)  # the last answers reach the host veth
        responder.stdout.close()
        yield Seen(lab, pcap, ports, find_exchanges(pcap, user="tcpdump"))


def _attempt(seen: Seen, scenario: str, port: int) -> TcpAttempt:
    matches = [a for a in seen.exchanges.tcp_attempts if a.client == f"10.251.1.10:{seen.ports[scenario]}"]
    assert len(matches) == 1, seen.exchanges.tcp_attempts
    assert matches[0].server == f"{SERVER_IP}:{port}"
    return matches[0]


def test_syns_dropped_by_the_server_are_unanswered_retries(seen: Seen) -> None:
    attempt = _attempt(seen, "dropped", DROPPED)
    assert attempt.syns >= 2
    assert (attempt.syn_acks, attempt.server_reset, attempt.established) == (0, False, False)


def test_closed_port_is_a_server_reset(seen: Seen) -> None:
    attempt = _attempt(seen, "closed", CLOSED)
    assert (attempt.syns, attempt.syn_acks, attempt.server_reset, attempt.established) == (1, 0, True, False)


def test_completed_handshake_is_established(seen: Seen) -> None:
    attempt = _attempt(seen, "http", HTTP)
    assert (attempt.syns, attempt.syn_acks, attempt.server_reset, attempt.established) == (1, 1, False, True)
    assert attempt.retransmissions == 0


def test_dns_queries_with_and_without_an_answer(seen: Seen) -> None:
    by_id = {q.id: q for q in seen.exchanges.dns_queries}
    assert set(by_id) == {0x1111, 0x2222}
    silent, answered = by_id[0x1111], by_id[0x2222]
    assert (silent.client, silent.server) == (
        f"10.251.1.10:{seen.ports['silent_dns']}",
        f"{SERVER_IP}:{SILENT_DNS}",
    )
    assert (silent.name, silent.type, silent.queries, silent.answered, silent.rcode) == (
        "nobody.shop.svc.cluster.local",
        "A",
        1,
        False,
        "",
    )
    assert (answered.name, answered.answered, answered.rcode) == (
        "server.shop.svc.cluster.local",
        True,
        "NOERROR",
    )
    assert seen.exchanges.truncated is False


def test_limit_keeps_the_earliest_and_says_more_were_seen(seen: Seen) -> None:
    few = find_exchanges(seen.pcap, user="tcpdump", limit=1)
    assert [a.client for a in few.tcp_attempts] == [seen.exchanges.tcp_attempts[0].client]
    assert [q.id for q in few.dns_queries] == [0x1111]
    assert few.truncated is True


def test_chunks_fold_into_the_same_attempts(seen: Seen) -> None:
    # Two packets a chunk: every SYN+ACK, reset and handshake ACK lands in another tshark than its SYN.
    assert find_exchanges(seen.pcap, user="tcpdump", chunk_packets=2) == seen.exchanges


def test_a_config_ini_in_the_working_directory_is_ignored(
    seen: Seen, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # pyshark 0.6 reads ./config.ini before anything else; this one would make its ConfigParser raise, and its
    # tshark_path a program that leaves a mark.
    mark = tmp_path / "ran"
    evil = tmp_path / "tshark"
    evil.write_text(f"#!/bin/sh\ntouch {mark}\n")
    evil.chmod(0o755)
    (tmp_path / "config.ini").write_text(f"tshark_path = {evil}\n[tshark\n")
    monkeypatch.chdir(tmp_path)
    assert find_exchanges(seen.pcap, user="tcpdump") == seen.exchanges
    assert not mark.exists()


def test_summary_carries_the_exchanges(seen: Seen) -> None:
    summary = add_exchanges(summarise(seen.pcap, user="tcpdump"), seen.pcap, user="tcpdump")
    assert summary.state is SummaryState.READY
    assert summary.tcp_attempts == seen.exchanges.tcp_attempts
    assert summary.dns_queries == seen.exchanges.dns_queries
    assert Summary.from_json(summary.to_json()) == summary


def test_a_failing_pass_makes_the_summary_incomplete_not_an_error(seen: Seen) -> None:
    summary = summarise(seen.pcap, user="tcpdump")
    broken = add_exchanges(summary, seen.pcap, user="tcpdump", tshark="/nonexistent/tshark")
    assert broken.state is SummaryState.INCOMPLETE
    assert broken.error == "no TCP attempts or DNS queries: /nonexistent/tshark not found"
    assert broken.packets == summary.packets and broken.protocols == summary.protocols
    assert os.path.exists(seen.pcap)
