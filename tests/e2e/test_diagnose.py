"""`podcap diagnose` end to end: the CLI, a controller with bearer tokens, the real `kubernetes` client against the
fake API server (which knows the Service), and the agents in the lab.

The client pod's container has its own resolv.conf naming a DNS server pod; Service shop/web has ClusterIP
10.96.0.20:80, made real by a DNAT rule in node-1's netns (kube-proxy's part), and one ready endpoint, the
server pod on node-2 at :8080. The ladder must come back step by step, and the capture it started must
complete holding the ladder's own packets: the DNS query from the pod, the SYNs to the ClusterIP and to the
endpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from podcap.storage import AuditLog, create_engine_for, make_sessionmaker
from tests.e2e.conftest import Stack
from tests.support.fakekube import FakeKube
from tests.support.lab import Lab, build_lab, require_netns
from tests.support.processes import PODCAP

pytestmark = [
    pytest.mark.netns,
    # The Service comes from the Kubernetes API here; the static inventory's Services are tested with it.
    pytest.mark.parametrize("stack", ["s3-postgresql-kubernetes"], indirect=True),
]

CLIENT, SERVER, DNS = "10.251.1.10", "10.251.2.10", "10.251.2.53"
CLUSTER_IP = "10.96.0.20"
TOKENS = {"alice": "alice-" + "a" * 40, "bob": "bob-" + "b" * 40}


@pytest.fixture
def lab() -> Iterator[Lab]:
    require_netns()
    resolv_conf = f"nameserver {DNS}\nsearch shop.svc.cluster.local svc.cluster.local cluster.local\n"
    with build_lab(default_pods=False) as built:
        built.add_pod("node-1", "shop", "client", CLIENT, resolv_conf=resolv_conf + "options ndots:5\n")
        built.add_pod("node-2", "shop", "server", SERVER)
        built.add_pod("node-2", "kube-system", "coredns", DNS)
        yield built


@pytest.fixture
def controller_flags(tmp_path: Path) -> list[str]:
    """alice may capture in shop; bob may only read there."""
    users = [
        {"name": "alice", "grants": [{"role": "support", "namespaces": ["shop"]}]},
        {"name": "bob", "grants": [{"role": "viewer", "namespaces": ["shop"]}]},
    ]
    for user in users:
        user["token_sha256"] = hashlib.sha256(TOKENS[str(user["name"])].encode()).hexdigest()
    document = {"roles": {"support": ["capture", "read", "download"], "viewer": ["read"]}, "users": users}
    path = tmp_path / "tokens.yaml"
    path.write_text(yaml.safe_dump(document))
    return ["--auth-tokens", str(path)]


@pytest.fixture
def service(stack: Stack, fake_kube: FakeKube) -> None:
    """Service shop/web, its endpoint, kube-proxy's DNAT on the client's node, and DNS that knows it."""
    lab = stack.lab
    fake_kube.add_service(
        "shop",
        "web",
        ports=[{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
        cluster_ip=CLUSTER_IP,
        selector={"app": "web"},
    )
    fake_kube.add_endpoint_slice(
        "shop",
        "web",
        endpoints=[{"ip": SERVER, "pod": "server", "node": "node-2", "ready": True}],
        ports=[{"name": "http", "port": 8080, "protocol": "TCP"}],
    )
    dnat = ["-t", "nat", "-A", "PREROUTING", "-d", CLUSTER_IP, "-p", "tcp", "--dport", "80"]
    lab.run(lab.nodes["node-1"], ["iptables", *dnat, "-j", "DNAT", "--to-destination", f"{SERVER}:8080"])
    lab.dns_server(lab.pods["coredns"], {"web.shop.svc.cluster.local": CLUSTER_IP})
    lab.http_server(lab.pods["server"], 8080)


def _podcap(stack: Stack, user: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PODCAP_SERVER": stack.server, "PODCAP_TOKEN": TOKENS[user], **stack.s3_env}
    return subprocess.run([PODCAP, *args], env=env, capture_output=True, text=True, timeout=60, check=False)


def _tshark(pcap: Path, display_filter: str, *fields: str) -> list[list[str]]:
    argv = ["tshark", "-r", str(pcap), "-Y", display_filter, "-T", "fields", "-E", "separator=|"]
    for field in fields:
        argv += ["-e", field]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60).stdout
    return [line.split("|") for line in out.splitlines()]


def _completed(stack: Stack, capture_id: str) -> dict[str, object]:
    deadline = time.monotonic() + 60
    while True:
        shown = json.loads(_podcap(stack, "alice", "get", capture_id, "-o", "json").stdout)
        if shown["state"] not in ("PENDING", "RUNNING", "UPLOADING") or time.monotonic() > deadline:
            return dict(shown)
        time.sleep(0.2)


@pytest.mark.usefixtures("service")
def test_the_ladder_to_a_service_and_the_capture_that_holds_it(stack: Stack, tmp_path: Path) -> None:
    done = _podcap(
        stack, "alice", "diagnose", "shop/client", "--to", "web:80", "--duration", "2s", "-o", "json"
    )
    assert done.returncode == 0, done.stderr + done.stdout
    shown = json.loads(done.stdout)
    steps = {step["name"]: step for step in shown["steps"]}
    assert list(steps) == ["resolver", "dns", "connect", "service", "endpoint"]
    assert all(step["ok"] for step in steps.values()), shown
    assert all(isinstance(step["milliseconds"], int) for step in steps.values())
    assert steps["resolver"]["detail"].startswith(f"nameserver {DNS}; search shop.svc.cluster.local")
    assert steps["dns"]["detail"] == f"web.shop.svc.cluster.local -> {CLUSTER_IP} via {DNS}:53"
    assert steps["connect"]["detail"] == f"connected to {CLUSTER_IP}:80"
    assert steps["service"]["detail"] == f"ClusterIP of shop/web: connected to {CLUSTER_IP}:80"
    assert steps["endpoint"]["detail"] == f"endpoint server of shop/web on node-2: connected to {SERVER}:8080"

    capture = _completed(stack, shown["capture_id"])
    assert capture["state"] == "COMPLETED", capture
    assert capture["pod"] == "client" and "podcap diagnose shop/client --to web:80" in str(capture["reason"])
    pcap = tmp_path / "diagnose.pcap"
    downloaded = _podcap(stack, "alice", "download", shown["capture_id"], "-f", str(pcap))
    assert downloaded.returncode == 0, downloaded.stderr
    queries = _tshark(pcap, "dns.flags.response == 0", "ip.src", "ip.dst", "dns.qry.name")
    assert [CLIENT, DNS, "web.shop.svc.cluster.local"] in queries
    syns = _tshark(pcap, "tcp.flags.syn == 1 && tcp.flags.ack == 0", "ip.src", "ip.dst", "tcp.dstport")
    # The connect and the ClusterIP step (DNAT happens past the pod's veth), then the endpoint directly.
    assert syns.count([CLIENT, CLUSTER_IP, "80"]) == 2 and [CLIENT, SERVER, "8080"] in syns

    # A failed step: the exit status says so, and the table shows which.
    refused = _podcap(stack, "alice", "diagnose", "shop/client", "--to", f"{SERVER}:8081", "--duration", "1s")
    assert refused.returncode == 1, refused.stderr
    lines = refused.stdout.splitlines()
    assert lines[0].split()[:2] == ["ok", "resolver"]
    assert lines[1].split()[:2] == ["FAIL", "connect"]
    assert lines[1].endswith(f"refused (RST) by {SERVER}:8081")
    assert "podcap download" in refused.stdout


def test_refusals(stack: Stack) -> None:
    denied = _podcap(stack, "bob", "diagnose", "shop/client", "--to", "web:80")
    assert denied.returncode == 1
    assert "PERMISSION_DENIED: bob may not capture captures in namespace 'shop'" in denied.stderr
    bad = _podcap(stack, "alice", "diagnose", "shop/client", "--to", "no such host:80")
    assert bad.returncode == 1
    assert "INVALID_ARGUMENT: host 'no such host' is neither an IP address nor a DNS name" in bad.stderr
    assert _podcap(stack, "alice", "list", "-o", "json").stdout.strip() == "[]"  # nothing was captured
    engine = create_engine_for(stack.db_url)
    try:
        with make_sessionmaker(engine).begin() as session:
            entries = [(e.actor, e.action, e.result) for e in AuditLog(session).entries()]
    finally:
        engine.dispose()
    assert entries == [("bob", "diagnose", "denied")]  # a refused request is not audited as allowed
