"""The agent as a process on a node: bounded, never outliving its captures, never losing a pcap.

A real `podcap agent` runs in a lab node's netns, captures the server pod's real traffic with real tcpdump and
stores to moto's S3 server over HTTP (or a local directory). The tests stop the S3 server, SIGTERM and SIGKILL
the agent, restart it on the same spool, and check every stored object's bytes and sha256.
"""

from __future__ import annotations

import hashlib
import json
import pwd
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from podcap.api.v1 import agent_pb2, common_pb2
from tests.support.agents import NodeAgent, tcpdumps_writing_into, wait_for
from tests.support.lab import Lab
from tests.support.pcaps import http_uris
from tests.support.processes import PODCAP, spool_root
from tests.support.s3 import S3Server

pytestmark = pytest.mark.netns

PORT = 8080
COMPLETED, FAILED, UPLOADING, RUNNING = (
    common_pb2.CAPTURE_STATE_COMPLETED,
    common_pb2.CAPTURE_STATE_FAILED,
    common_pb2.CAPTURE_STATE_UPLOADING,
    common_pb2.CAPTURE_STATE_RUNNING,
)


@pytest.fixture
def spool() -> Iterator[Path]:
    with spool_root() as path:
        yield path


@pytest.fixture
def s3(s3_server: S3Server, lab: Lab) -> Iterator[tuple[S3Server, str]]:
    """A bucket on moto's server, reachable from node-2's netns at the same URL as from the test."""
    if not s3_server.running:
        s3_server.start()
    bucket = f"agent-{time.monotonic_ns()}"
    s3_server.client().create_bucket(Bucket=bucket)
    lab.forward_into(lab.nodes["node-2"].netns, s3_server.port, "127.0.0.1", s3_server.port)
    yield s3_server, bucket
    if not s3_server.running:
        s3_server.start()


def _agent(
    lab: Lab, store_url: str, spool: Path, tmp_path: Path, env: dict[str, str] | None = None, *args: str
) -> NodeAgent:
    agent = NodeAgent(lab, lab.nodes["node-2"], store_url, spool, tmp_path, env=env, args=args)
    agent.start()
    return agent


@pytest.fixture
def agents() -> Iterator[list[NodeAgent]]:
    started: list[NodeAgent] = []
    yield started
    for agent in started:
        agent.close()


def _start(
    agent: NodeAgent, lab: Lab, capture_id: str, seconds: float = 30, **fields: object
) -> agent_pb2.AgentCapture:
    server = lab.pods["server"]
    duration = Duration()
    duration.FromTimedelta(timedelta(seconds=seconds))
    request = agent_pb2.StartCaptureRequest(
        capture_id=capture_id,
        pod=agent_pb2.PodRef(namespace="shop", name="server", ips=[fields.pop("ip", server.ip)]),  # type: ignore[list-item]
        filter=fields.pop("filter", f"tcp port {PORT}"),  # type: ignore[arg-type]
        duration=duration,
        object_key=f"{capture_id}.pcap",
        **fields,  # type: ignore[arg-type]
    )
    return agent.stub.StartCapture(request, timeout=15)


def _probe(lab: Lab, path: str) -> None:
    assert (
        lab.http_get(lab.pods["client"].netns, f"http://{lab.pods['server'].ip}:{PORT}{path}", timeout=5)
        == 404
    )


def _uris(pcap: bytes, tmp_path: Path) -> list[str]:
    path = tmp_path / f"check-{hashlib.sha256(pcap).hexdigest()[:8]}.pcap"
    path.write_bytes(pcap)
    return http_uris(path)


def _object(s3: tuple[S3Server, str], key: str) -> bytes:
    server, bucket = s3
    body: bytes = server.client().get_object(Bucket=bucket, Key=f"pcaps/{key}")["Body"].read()
    return body


def _assert_stored(capture: agent_pb2.AgentCapture, data: bytes) -> None:
    assert capture.sha256 == hashlib.sha256(data).hexdigest()
    assert capture.stats.bytes == len(data)


def test_sigterm_stops_captures_and_finishes_their_uploads(
    lab: Lab, s3: tuple[S3Server, str], spool: Path, tmp_path: Path, agents: list[NodeAgent]
) -> None:
    lab.http_server(lab.pods["server"].netns, PORT)
    agent = _agent(lab, f"s3://{s3[1]}/pcaps", spool, tmp_path, s3[0].env)
    agents.append(agent)
    _start(agent, lab, "term-1", seconds=600)
    (tcpdump,) = tcpdumps_writing_into(spool)
    uid = next(
        line.split()[1]
        for line in Path(f"/proc/{tcpdump}/status").read_text().splitlines()
        if line.startswith("Uid:")
    )
    assert int(uid) == pwd.getpwnam("tcpdump").pw_uid  # tcpdump never runs as root
    _probe(lab, "/before-sigterm")
    assert agent.signal(signal.SIGTERM) == 0
    assert tcpdumps_writing_into(spool) == []
    data = _object(s3, "term-1.pcap")
    assert _uris(data, tmp_path) == ["/before-sigterm"]
    # Stored before the agent exited; only the summary, which never delays a shutdown, is left to the next start.
    stored = json.loads((spool / "term-1" / "stored.json").read_text())
    assert stored["sha256"] == hashlib.sha256(data).hexdigest()

    agent.start()
    capture = wait_for(agent, "term-1")
    assert capture.state == COMPLETED and capture.sha256 == stored["sha256"], capture.error
    assert capture.summary.state == common_pb2.SUMMARY_STATE_READY and capture.summary.packets > 0
    assert list(spool.iterdir()) == []
    assert _object(s3, "term-1.pcap") == data


def test_sigkill_leaves_no_tcpdump_and_the_next_start_uploads_the_pcap(
    lab: Lab, s3: tuple[S3Server, str], spool: Path, tmp_path: Path, agents: list[NodeAgent]
) -> None:
    lab.http_server(lab.pods["server"].netns, PORT)
    agent = _agent(lab, f"s3://{s3[1]}/pcaps", spool, tmp_path, s3[0].env)
    agents.append(agent)
    _start(agent, lab, "kill-1", seconds=600)
    _probe(lab, "/before-sigkill")
    # tcpdump gets packets a ring block at a time, a block at the latest 1 s after it opened (capture-agent/
    # _tcpdump.py); an end without StopCapture loses a block still open: let the last one be handed over first.
    time.sleep(1.3)
    killed_at = datetime.now(UTC)
    agent.signal(signal.SIGKILL)
    deadline = time.monotonic() + 5
    while tcpdumps_writing_into(spool) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert tcpdumps_writing_into(spool) == [], "tcpdump outlived its agent"

    agent.start()
    capture = wait_for(agent, "kill-1", {COMPLETED, FAILED})
    assert capture.state == COMPLETED, capture.error
    data = _object(s3, "kill-1.pcap")
    _assert_stored(capture, data)
    assert _uris(data, tmp_path) == ["/before-sigkill"]
    assert capture.stats.packets >= 4  # the handshake and the request at least, counted from the pcap
    # Said as it is: cut short, when and over what span, and drops unknown rather than 0.
    assert capture.stats.kernel_drops_unknown and capture.stats.kernel_drops == 0
    assert capture.interruption.startswith("cut short: the agent stopped (killed or crashed) about ")
    assert "s into this 600 s capture, and tcpdump with it; the pcap covers " in capture.interruption
    assert "kernel drops unknown" in capture.interruption
    ended = capture.end_time.ToDatetime(UTC)
    assert capture.start_time.ToDatetime(UTC) < ended <= killed_at  # the pcap's last write, not the restart
    assert list(spool.iterdir()) == []


def test_s3_outage_keeps_the_capture_uploading_until_it_is_back(
    lab: Lab, s3: tuple[S3Server, str], spool: Path, tmp_path: Path, agents: list[NodeAgent]
) -> None:
    server, bucket = s3
    lab.http_server(lab.pods["server"].netns, PORT)
    agent = _agent(lab, f"s3://{bucket}/pcaps", spool, tmp_path, server.env)
    agents.append(agent)
    server.stop()
    _start(agent, lab, "outage-1", seconds=1)
    _probe(lab, "/during-outage")
    uploading = wait_for(agent, "outage-1", {UPLOADING, COMPLETED, FAILED})
    assert uploading.state == UPLOADING
    deadline = time.monotonic() + 20
    while "retrying" not in agent.stub.GetCapture(agent_pb2.AgentCaptureRef(capture_id="outage-1")).error:
        assert time.monotonic() < deadline, "the agent never reported a retry"
        time.sleep(0.1)
    assert (spool / "outage-1" / "capture.pcap").stat().st_size > 0  # kept until the upload is confirmed

    server.start()
    server.client().create_bucket(Bucket=bucket)  # moto keeps buckets in memory: a restart loses them
    capture = wait_for(agent, "outage-1", {COMPLETED, FAILED})
    assert capture.state == COMPLETED, capture.error
    data = _object(s3, "outage-1.pcap")
    _assert_stored(capture, data)
    assert _uris(data, tmp_path) == ["/during-outage"]
    assert server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_agent_killed_while_uploading_finishes_after_restart(
    lab: Lab, s3: tuple[S3Server, str], spool: Path, tmp_path: Path, agents: list[NodeAgent]
) -> None:
    server, bucket = s3
    lab.http_server(lab.pods["server"].netns, PORT)
    agent = _agent(lab, f"s3://{bucket}/pcaps", spool, tmp_path, server.env)
    agents.append(agent)
    server.stop()
    _start(agent, lab, "restart-1", seconds=1)
    _probe(lab, "/before-restart")
    assert wait_for(agent, "restart-1", {UPLOADING, COMPLETED, FAILED}).state == UPLOADING
    stats = agent.stub.GetCapture(agent_pb2.AgentCaptureRef(capture_id="restart-1")).stats
    agent.signal(signal.SIGKILL)

    server.start()
    server.client().create_bucket(Bucket=bucket)
    agent.start()
    capture = wait_for(agent, "restart-1", {COMPLETED, FAILED})
    assert capture.state == COMPLETED, capture.error
    assert (capture.stats.packets, capture.stats.kernel_drops) == (stats.packets, stats.kernel_drops)
    data = _object(s3, "restart-1.pcap")
    _assert_stored(capture, data)
    assert _uris(data, tmp_path) == ["/before-restart"]


def test_node_limits_refuse_with_the_numbers(
    lab: Lab, spool: Path, tmp_path: Path, agents: list[NodeAgent]
) -> None:
    agent = _agent(lab, f"file://{tmp_path / 'store'}", spool, tmp_path, None, "--max-concurrent", "1")
    agents.append(agent)
    _start(agent, lab, "first", seconds=600)
    with pytest.raises(grpc.RpcError) as refused:
        _start(agent, lab, "second", seconds=600)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "already runs 1 captures (at most 1)" in refused.value.details()
    agent.stub.StopCapture(agent_pb2.AgentCaptureRef(capture_id="first"))
    assert wait_for(agent, "first", {COMPLETED, FAILED}).state == COMPLETED

    full = _agent(
        lab, f"file://{tmp_path / 'store'}", spool, tmp_path, None, "--min-free-bytes", str(1 << 60)
    )
    agents.append(full)
    with pytest.raises(grpc.RpcError) as refused:
        _start(full, lab, "third")
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "bytes free on the spool's disk" in refused.value.details()
    assert tcpdumps_writing_into(spool) == []


def test_several_captures_of_one_pod_and_packet_and_byte_limits(
    lab: Lab, spool: Path, tmp_path: Path, agents: list[NodeAgent]
) -> None:
    store = tmp_path / "store"
    lab.http_server(lab.pods["server"].netns, PORT)
    agent = _agent(lab, f"file://{store}", spool, tmp_path)
    agents.append(agent)
    _start(agent, lab, "all-a", seconds=600)
    _start(agent, lab, "all-b", seconds=600)
    _start(agent, lab, "three", seconds=600, limits=common_pb2.CaptureLimits(max_packets=3))
    _start(agent, lab, "small", seconds=600, limits=common_pb2.CaptureLimits(max_bytes=2000))
    for i in range(5):
        _probe(lab, f"/probe-{i}")
        time.sleep(0.5)  # the byte limit is checked a few times a second: spread the traffic over time
    three = wait_for(agent, "three", {COMPLETED, FAILED}, timeout=30)
    small = wait_for(agent, "small", {COMPLETED, FAILED}, timeout=30)
    for capture_id in ("all-a", "all-b"):
        agent.stub.StopCapture(agent_pb2.AgentCaptureRef(capture_id=capture_id))
    a, b = (wait_for(agent, c, {COMPLETED, FAILED}) for c in ("all-a", "all-b"))

    expected = [f"/probe-{i}" for i in range(5)]
    assert _uris((store / "all-a.pcap").read_bytes(), tmp_path) == expected
    assert _uris((store / "all-b.pcap").read_bytes(), tmp_path) == expected
    assert a.stats.packets == b.stats.packets > 3
    assert three.state == COMPLETED and three.stats.packets == 3
    assert small.state == COMPLETED and 2000 <= small.stats.bytes < a.stats.bytes
    for capture in (a, b, three, small):
        _assert_stored(capture, (store / capture.object_key).read_bytes())


def test_a_pod_deleted_mid_capture_fails_the_capture_but_keeps_the_pcap(
    lab: Lab, spool: Path, tmp_path: Path, agents: list[NodeAgent]
) -> None:
    store = tmp_path / "store"
    doomed = lab.add_pod("node-2", "shop", "doomed", "10.251.2.20")
    lab.http_server(doomed.netns, PORT)
    agent = _agent(lab, f"file://{store}", spool, tmp_path)
    agents.append(agent)
    _start(agent, lab, "doomed-1", seconds=600, ip=doomed.ip)
    assert lab.http_get(lab.pods["client"].netns, f"http://{doomed.ip}:{PORT}/last-words", timeout=5) == 404
    time.sleep(
        1.3
    )  # the ring block holding them handed over to tcpdump (see the SIGKILL test) before the device goes
    lab.delete_pod("doomed")
    capture = wait_for(agent, "doomed-1", {COMPLETED, FAILED}, timeout=30)
    assert capture.state == FAILED
    assert "network namespace vanished" in capture.error
    data = (store / "doomed-1.pcap").read_bytes()
    _assert_stored(capture, data)
    assert _uris(data, tmp_path) == ["/last-words"]


def test_host_network_pod_is_refused_unless_asked_for_and_then_captured_on_the_node_interface(
    lab: Lab, spool: Path, tmp_path: Path, agents: list[NodeAgent]
) -> None:
    node = lab.nodes["node-2"]
    agent = _agent(lab, f"file://{tmp_path / 'store'}", spool, tmp_path)
    agents.append(agent)
    with pytest.raises(grpc.RpcError) as refused:
        _start(agent, lab, "hostnet-0", ip=node.ip)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "hostNetwork" in refused.value.details()

    started = _start(agent, lab, "hostnet-1", ip=node.ip, host_network=True, filter="icmp")
    assert started.resolution.interface == "eth0"
    assert started.resolution.strategy.startswith("host-network")
    agent.stub.StopCapture(agent_pb2.AgentCaptureRef(capture_id="hostnet-1"))
    assert wait_for(agent, "hostnet-1", {COMPLETED, FAILED}).state == COMPLETED


def test_resolve_pod_and_list_interfaces_explain_the_choice(
    lab: Lab, spool: Path, tmp_path: Path, agents: list[NodeAgent]
) -> None:
    server, client = lab.pods["server"], lab.pods["client"]
    agent = _agent(lab, f"file://{tmp_path / 'store'}", spool, tmp_path)
    agents.append(agent)
    found = agent.stub.ResolvePod(
        agent_pb2.ResolvePodRequest(pod=agent_pb2.PodRef(ips=[server.ip])), timeout=10
    )
    assert (found.interface, found.pod_interface, found.pod_mac, found.pod_ip) == (
        server.host_if,
        "eth0",
        server.pod_mac,
        server.ip,
    )
    assert found.strategy.startswith("netns-scan") and found.netns and found.pod_ifindex > 0
    listed = agent.stub.ListInterfaces(agent_pb2.ListInterfacesRequest(), timeout=10).interfaces
    cali = next(i for i in listed if i.name == server.host_if)
    assert (cali.ifindex, cali.peer_ifindex, cali.kind) == (found.ifindex, found.pod_ifindex, "veth")

    with pytest.raises(grpc.RpcError) as elsewhere:
        agent.stub.ResolvePod(agent_pb2.ResolvePodRequest(pod=agent_pb2.PodRef(ips=[client.ip])), timeout=10)
    assert elsewhere.value.code() == grpc.StatusCode.NOT_FOUND
    assert "node-2" in elsewhere.value.details() and client.ip in elsewhere.value.details()


def test_node_spool_limit_ends_a_capture_with_the_reason_and_keeps_its_pcap(
    lab: Lab, spool: Path, tmp_path: Path, agents: list[NodeAgent]
) -> None:
    store = tmp_path / "store"
    lab.http_server(lab.pods["server"].netns, PORT)
    agent = _agent(lab, f"file://{store}", spool, tmp_path, None, "--max-spool-bytes", "3000")
    agents.append(agent)
    _start(agent, lab, "spool-1", seconds=600)
    for i in range(10):
        _probe(lab, f"/fill-{i}")
        time.sleep(0.3)
    capture = wait_for(agent, "spool-1", {COMPLETED, FAILED}, timeout=30)
    assert capture.state == FAILED
    assert "spool limit of 3000 bytes was reached" in capture.error
    data = (store / "spool-1.pcap").read_bytes()
    _assert_stored(capture, data)
    assert len(data) >= 3000 and _uris(data, tmp_path)[0] == "/fill-0"


@pytest.mark.parametrize("missing", ["setpriv", "tcpdump", "tshark"])
def test_the_agent_refuses_to_start_without_a_program_it_runs(tmp_path: Path, missing: str) -> None:
    """setpriv, tcpdump and tshark are looked up on PATH once, at start (and then run by absolute path): a missing
    one stops the agent before it does anything, saying which."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for program in {"setpriv", "tcpdump", "tshark"} - {missing}:
        found = shutil.which(program)
        assert found is not None
        (bin_dir / program).symlink_to(found)
    argv = [PODCAP, "agent", "--node-name", "node-x", "--listen", "127.0.0.1:0"]
    argv += ["--store", f"file://{tmp_path}", "--spool-dir", str(tmp_path / "spool")]
    done = subprocess.run(
        argv, env={"PATH": str(bin_dir)}, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 1
    last = done.stderr.splitlines()[-1]
    assert last.startswith(f"podcap agent: cannot start: {missing!r} not found on PATH"), done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "spool").exists()  # nothing was done


def test_a_request_sets_the_capture_buffer_within_the_nodes_cap(
    lab: Lab, spool: Path, tmp_path: Path, agents: list[NodeAgent]
) -> None:
    lab.http_server(lab.pods["server"].netns, PORT)
    agent = _agent(
        lab, f"file://{tmp_path / 'store'}", spool, tmp_path, None, "--max-buffer-size", str(64 << 20)
    )
    agents.append(agent)

    def tcpdump_buffer() -> str:
        (tcpdump,) = tcpdumps_writing_into(spool)
        argv = Path(f"/proc/{tcpdump}/cmdline").read_bytes().split(b"\0")
        return argv[argv.index(b"-B") + 1].decode()

    _start(agent, lab, "default-buffer", seconds=30)
    assert tcpdump_buffer() == str(32 << 10)  # the node's default, in tcpdump's KiB
    agent.stub.StopCapture(agent_pb2.AgentCaptureRef(capture_id="default-buffer"))
    wait_for(agent, "default-buffer")

    _start(agent, lab, "big-buffer", seconds=30, limits=common_pb2.CaptureLimits(buffer_size=64 << 20))
    assert tcpdump_buffer() == str(64 << 10)
    _probe(lab, "/with-a-big-buffer")
    agent.stub.StopCapture(agent_pb2.AgentCaptureRef(capture_id="big-buffer"))
    assert wait_for(agent, "big-buffer").state == COMPLETED

    with pytest.raises(grpc.RpcError) as refused:
        _start(agent, lab, "too-big", limits=common_pb2.CaptureLimits(buffer_size=128 << 20))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "up to 64 MiB on this node" in (refused.value.details() or "")
    assert tcpdumps_writing_into(spool) == []
