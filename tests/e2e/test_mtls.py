"""Mutual TLS between the controller and the node agents, with real certificates and real handshakes.

An agent runs tcpdump on its node, so whoever can call it can capture any pod there: with `--tls-cert/--tls-key/
--client-ca` it must serve only callers holding a certificate from the controller's CA *and* naming the
controller. The test plays the controller with the right certificate (a capture works end to end through a real
controller process), and then every kind of stranger: no TLS, TLS without a certificate, a certificate from a
foreign CA, a genuine certificate with another name. None of them gets anything run; the agent keeps serving.
A controller that does not trust the agent's CA (or expects another name) fails the capture with UNAVAILABLE
naming the agent, and stores nothing that runs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
import yaml
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health_pb2, health_pb2_grpc

from podcap.api.v1 import agent_pb2, agent_pb2_grpc, capture_pb2, capture_pb2_grpc
from tests.support.agents import NodeAgent, tcpdumps_writing_into
from tests.support.lab import Lab
from tests.support.pcaps import http_uris
from tests.support.pki import CertificateAuthority, KeyPair
from tests.support.processes import channel, cli, controller

pytestmark = pytest.mark.netns

PORT = 8080
AGENT_NAME = "podcap-agent"


@dataclass
class Pki:
    ca: CertificateAuthority
    agent: KeyPair
    controller: KeyPair
    foreign_ca: CertificateAuthority
    foreign_controller: KeyPair  # says podcap-controller, signed by a CA the agent does not trust
    intruder: KeyPair  # signed by the trusted CA, but names another workload
    cn_only: KeyPair  # CN podcap-controller and no SAN: the CN is the name
    san_wins: KeyPair  # CN podcap-controller, but its SAN names another workload: the SAN is the name


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = CertificateAuthority(tmp_path / "pki", "podcap test CA")
    foreign = CertificateAuthority(tmp_path / "foreign", "someone else's CA")
    return Pki(
        ca=ca,
        agent=ca.issue(AGENT_NAME, server=True),
        controller=ca.issue("podcap-controller", client=True),
        foreign_ca=foreign,
        foreign_controller=foreign.issue("podcap-controller", client=True),
        intruder=ca.issue("podcap-intruder", client=True),
        cn_only=ca.issue("podcap-controller", client=True, sans=()),
        san_wins=ca.issue("podcap-controller", client=True, sans=["podcap-intruder"]),
    )


def _credentials(ca: CertificateAuthority, pair: KeyPair | None) -> grpc.ChannelCredentials:
    if pair is None:
        return grpc.ssl_channel_credentials(root_certificates=ca.cert.read_bytes())
    return grpc.ssl_channel_credentials(
        root_certificates=ca.cert.read_bytes(),
        private_key=pair.key_pem(),
        certificate_chain=pair.cert_pem(),
    )


@pytest.fixture
def agent(lab: Lab, pki: Pki, spool: Path, tmp_path: Path) -> Iterator[NodeAgent]:
    """A real agent on node-2 (the server pod's node), serving mutual TLS only."""
    node_agent = NodeAgent(
        lab,
        lab.nodes["node-2"],
        f"file://{tmp_path / 'store'}",
        spool,
        tmp_path,
        args=[
            "--tls-cert",
            str(pki.agent.cert),
            "--tls-key",
            str(pki.agent.key),
            "--client-ca",
            str(pki.ca.cert),
        ],
        credentials=_credentials(pki.ca, pki.controller),
        server_name=AGENT_NAME,
    )
    try:
        node_agent.start()
        yield node_agent
    finally:
        node_agent.close()


def _controller_args(lab: Lab, agent: NodeAgent, tmp_path: Path, *tls: str) -> list[str]:
    server = lab.pods["server"]
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(
        yaml.safe_dump(
            {
                "pods": [{"namespace": "shop", "name": "server", "node": server.node, "ips": [server.ip]}],
                "agents": {server.node: agent.address},
            }
        )
    )
    return [
        "--no-auth",  # the public API's authentication is not what this module tests
        "--db",
        f"sqlite:///{tmp_path / 'podcap.db'}",
        "--store",
        agent.store_url,
        "--inventory",
        str(inventory),
        *tls,
    ]


def _start_request(lab: Lab, capture_id: str) -> agent_pb2.StartCaptureRequest:
    duration = Duration()
    duration.FromTimedelta(timedelta(seconds=30))
    return agent_pb2.StartCaptureRequest(
        capture_id=capture_id,
        pod=agent_pb2.PodRef(namespace="shop", name="server", ips=[lab.pods["server"].ip]),
        filter=f"tcp port {PORT}",
        duration=duration,
        object_key=f"{capture_id}.pcap",
    )


def _assert_serving(agent: NodeAgent) -> None:
    assert agent.process is not None and agent.process.poll() is None, agent.log()[-3000:]
    with channel(agent.address, agent.credentials, agent.server_name) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_capture_works_end_to_end_over_mutual_tls(
    lab: Lab, pki: Pki, agent: NodeAgent, tmp_path: Path
) -> None:
    server = lab.pods["server"]
    lab.http_server(server.netns, PORT)
    tls = [
        "--agent-ca",
        str(pki.ca.cert),
        "--agent-cert",
        str(pki.controller.cert),
        "--agent-key",
        str(pki.controller.key),
    ]
    with controller(_controller_args(lab, agent, tmp_path, *tls), tmp_path) as address:
        started = cli(
            ["capture", "shop/server", "--filter", f"tcp port {PORT}", "--duration", "30s", "-o", "json"],
            address,
        )
        assert started.returncode == 0, started.stderr + agent.log()[-3000:]
        capture = json.loads(started.stdout)
        assert capture["state"] == "RUNNING"
        for i in range(3):
            url = f"http://{server.ip}:{PORT}/over-mtls-{i}"
            assert lab.http_get(lab.pods["client"].netns, url, timeout=5) == 404
        stopped = cli(["stop", capture["id"], "--wait", "-o", "json"], address)
        assert stopped.returncode == 0, stopped.stderr
        assert json.loads(stopped.stdout)["state"] == "COMPLETED"
        pcap = tmp_path / "server.pcap"
        downloaded = cli(["download", capture["id"], "-f", str(pcap)], address)
        assert downloaded.returncode == 0, downloaded.stderr
    assert http_uris(pcap) == [f"/over-mtls-{i}" for i in range(3)]
    assert "mutual TLS" in agent.log()


@pytest.mark.parametrize(
    ("who", "code"),
    [
        ("plaintext", grpc.StatusCode.UNAVAILABLE),
        ("tls-without-certificate", grpc.StatusCode.UNAVAILABLE),
        ("foreign-ca", grpc.StatusCode.UNAVAILABLE),
        ("trusted-ca-other-name", grpc.StatusCode.PERMISSION_DENIED),
        ("trusted-ca-controller-cn-other-san", grpc.StatusCode.PERMISSION_DENIED),
    ],
)
def test_strangers_get_nothing_run_and_the_agent_keeps_serving(
    lab: Lab, pki: Pki, agent: NodeAgent, spool: Path, who: str, code: grpc.StatusCode
) -> None:
    if who == "plaintext":
        stranger = grpc.insecure_channel(agent.address)
    else:
        pair = {
            "tls-without-certificate": None,
            "foreign-ca": pki.foreign_controller,
            "trusted-ca-other-name": pki.intruder,
            "trusted-ca-controller-cn-other-san": pki.san_wins,
        }[who]
        stranger = channel(agent.address, _credentials(pki.ca, pair), AGENT_NAME)
    with stranger:
        stub = agent_pb2_grpc.AgentServiceStub(stranger)
        with pytest.raises(grpc.RpcError) as refused:
            stub.StartCapture(_start_request(lab, f"stranger-{who}"), timeout=10)
        assert refused.value.code() == code, refused.value.details()
        if code == grpc.StatusCode.PERMISSION_DENIED:
            assert "podcap-intruder" in refused.value.details()
            assert "podcap-controller" in refused.value.details()
        # Nor can it read anything: the streaming and the listing calls are refused the same way.
        with pytest.raises(grpc.RpcError) as listing:
            stub.ListCaptures(agent_pb2.ListAgentCapturesRequest(), timeout=10)
        assert listing.value.code() == code
        with pytest.raises(grpc.RpcError) as watching:
            list(stub.WatchCapture(agent_pb2.AgentCaptureRef(capture_id="anything"), timeout=10))
        assert watching.value.code() == code

    assert tcpdumps_writing_into(spool) == []
    assert not any(spool.rglob("capture.json")) and not any(spool.rglob("*.pcap"))
    assert f"stranger-{who}" not in agent.log()
    _assert_serving(agent)
    # The real controller's identity still gets answers: the refusals did not break the agent.
    listed = agent.stub.ListCaptures(agent_pb2.ListAgentCapturesRequest(), timeout=10)
    assert list(listed.captures) == []


def test_a_certificate_without_sans_is_known_by_its_common_name(pki: Pki, agent: NodeAgent) -> None:
    with channel(agent.address, _credentials(pki.ca, pki.cn_only), AGENT_NAME) as ch:
        listed = agent_pb2_grpc.AgentServiceStub(ch).ListCaptures(
            agent_pb2.ListAgentCapturesRequest(), timeout=10
        )
    assert list(listed.captures) == []


@pytest.mark.parametrize("mistake", ["agent-ca-from-another-pki", "wrong-agent-server-name"])
def test_controller_that_cannot_verify_the_agent_answers_unavailable_naming_it(
    lab: Lab, pki: Pki, agent: NodeAgent, spool: Path, tmp_path: Path, mistake: str
) -> None:
    ca, name = (
        (pki.foreign_ca.cert, AGENT_NAME)
        if mistake == "agent-ca-from-another-pki"
        else (pki.ca.cert, "podcap-agent.elsewhere")
    )
    tls = [
        "--agent-ca",
        str(ca),
        "--agent-cert",
        str(pki.controller.cert),
        "--agent-key",
        str(pki.controller.key),
        "--agent-server-name",
        name,
    ]
    with (
        controller(_controller_args(lab, agent, tmp_path, *tls), tmp_path) as address,
        grpc.insecure_channel(address) as public,
    ):
        stub = capture_pb2_grpc.CaptureServiceStub(public)
        request = capture_pb2.CreateCaptureRequest(
            namespace="shop", pod="server", filter=f"tcp port {PORT}", duration=Duration(seconds=30)
        )
        with pytest.raises(grpc.RpcError) as failed:
            stub.CreateCapture(request, timeout=30)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value.details()
        assert agent.address in failed.value.details()
    assert tcpdumps_writing_into(spool) == []
    _assert_serving(agent)
