"""The simulated cluster the netns tests stand on: traffic flows like on a Calico node, relays cross into and out
of the root namespace without routes, and nothing survives teardown."""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from tests.support import lab as lab_module
from tests.support.lab import Lab, build_lab, calico_if_name, require_netns, sweep_stale_namespaces
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


@pytest.mark.parametrize(("ci", "outcome"), [("true", pytest.fail.Exception), ("", pytest.skip.Exception)])
def test_missing_namespaces_skip_locally_but_fail_under_ci(
    monkeypatch: pytest.MonkeyPatch, ci: str, outcome: type[BaseException]
) -> None:
    monkeypatch.setattr(lab_module, "netns_problem", lambda: "needs root to create network namespaces")
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="needs root"):
        require_netns()
