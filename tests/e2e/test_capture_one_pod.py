"""The walking skeleton, end to end, with real parts only.

Two simulated nodes (network namespaces) meet on a bridge; a client pod on node-1 and a server pod on node-2 hang
off them by Calico-style veths. A real capture agent runs in each node's netns, one controller process in the
root netns; a support engineer runs `podcap capture shop/server --filter 'tcp port 8080' --download ...` while
the pods exchange HTTP and UDP. The pcap must hold exactly the filtered traffic of the server pod, and its row in
SQL must say so, with the sha256 of the file the engineer downloaded.

Run 1: S3 (moto's server over HTTP, boto3 configured by AWS_* variables) + PostgreSQL + the Kubernetes inventory
(the real `kubernetes` client against the fake API server). Run 2: the local directory store + SQLite + the
static YAML inventory.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
import urllib.request
from pathlib import Path

import boto3
import pytest
import sqlalchemy as sa

from tests.e2e.conftest import Stack, aws_credentials
from tests.support.processes import PODCAP

pytestmark = pytest.mark.netns

HTTP_PORT = 8080
UDP_PORT = 9999
PROBES = [f"/probe-{i}" for i in range(5)]


def _tshark(pcap: Path, *fields: str) -> list[list[str]]:
    argv = ["tshark", "-r", str(pcap), "-T", "fields", "-E", "separator=|"]
    for field in fields:
        argv += ["-e", field]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60).stdout
    return [line.split("|") for line in out.splitlines()]


def test_capture_of_one_pod_holds_exactly_its_filtered_traffic(stack: Stack, tmp_path: Path) -> None:
    lab = stack.lab
    client, server = lab.pods["client"], lab.pods["server"]
    lab.http_server(server.netns, HTTP_PORT)
    lab.http_server(client.netns, HTTP_PORT)

    pcap = tmp_path / "server.pcap"
    capture = subprocess.Popen(
        [
            PODCAP,
            "capture",
            "shop/server",
            "--filter",
            f"tcp port {HTTP_PORT}",
            "--duration",
            "4s",
            "--download",
            str(pcap),
            "-o",
            "json",
            "--reason",
            "e2e",
            "--buffer-size",
            "8M",
            "--max-bytes",
            "10M",
        ],
        env={**os.environ, "PODCAP_SERVER": stack.server},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        progress = _wait_for_line(capture, "RUNNING")
        # Only now is tcpdump listening: this traffic must all be in the pcap, and nothing else.
        for path in PROBES:
            assert lab.http_get(client.netns, f"http://{server.ip}:{HTTP_PORT}{path}", timeout=5) == 404
        lab.udp_send(client.netns, server.ip, UDP_PORT, b"not-for-the-filter", count=5)
        # The other pod's traffic on the filtered port never crosses the server pod's veth.
        assert (
            lab.http_get(lab.nodes[client.node].netns, f"http://{client.ip}:{HTTP_PORT}/other", timeout=5)
            == 404
        )
        stdout, stderr = capture.communicate(timeout=60)
    finally:
        if capture.poll() is None:
            capture.kill()
            capture.communicate()
    assert capture.returncode == 0, progress + stderr
    shown = json.loads(stdout)

    data = pcap.read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    assert shown["state"] == "COMPLETED"
    assert shown["namespace"] == "shop" and shown["pod"] == "server"
    assert shown["node"] == server.node
    assert shown["interface"] == server.host_if and server.host_if.startswith("cali")
    assert shown["filter"] == f"tcp port {HTTP_PORT}"
    assert shown["sha256"] == sha256
    assert shown["bytes"] == len(data)
    assert shown["drops"] == 0
    assert shown["limits"]["buffer_size"] == 8 << 20 and shown["limits"]["max_bytes"] == 10 << 20
    # Why that device: the agent's explanation, kept with the target.
    resolution = shown["targets"][0]["resolution"]
    assert resolution["interface"] == server.host_if and resolution["pod_interface"] == "eth0"
    assert resolution["pod_ip"] == server.ip and resolution["pod_mac"] == server.pod_mac
    assert resolution["strategy"].startswith("netns-scan") and resolution["netns"]
    assert resolution["host_mac"] and resolution["ifindex"] > 0 and resolution["pod_ifindex"] > 0

    packets = _tshark(pcap, "ip.src", "ip.dst", "tcp.srcport", "tcp.dstport", "udp.port", "http.request.uri")
    assert len(packets) == shown["packets"] > 0
    for src, dst, sport, dport, udp, _ in packets:
        assert {src, dst} == {client.ip, server.ip}
        assert HTTP_PORT in (int(sport), int(dport))
        assert udp == ""
    assert sorted(uri for *_, uri in packets if uri) == PROBES

    engine = sa.create_engine(stack.db_url)
    try:
        with engine.connect() as conn:
            row = conn.execute(
                sa.text(
                    "SELECT c.state, c.filter, t.state AS target_state, t.node, t.interface, t.packets, "
                    "t.kernel_drops, t.bytes, t.object_key, t.sha256 "
                    "FROM captures c JOIN capture_targets t ON t.capture_id = c.id WHERE c.id = :id"
                ),
                {"id": shown["id"]},
            ).one()
    finally:
        engine.dispose()
    assert row.state == row.target_state == "COMPLETED"
    assert (row.node, row.interface, row.filter) == (server.node, server.host_if, f"tcp port {HTTP_PORT}")
    assert (row.packets, row.kernel_drops, row.bytes) == (len(packets), 0, len(data))
    assert row.sha256 == sha256
    assert row.object_key == shown["object_key"] and shown["id"] in row.object_key

    if stack.s3_bucket is not None:
        s3 = boto3.client(
            "s3", endpoint_url=stack.s3_env["AWS_ENDPOINT_URL_S3"], **aws_credentials(stack.s3_env)
        )
        stored = s3.get_object(Bucket=stack.s3_bucket, Key=f"captures/{row.object_key}")["Body"].read()
    else:
        stored = (Path(stack.store_url.removeprefix("file://")) / row.object_key).read_bytes()
    assert stored == data

    # What the engineer sees afterwards: the capture in the list, in detail, and behind a short-lived URL.
    shown_text = _cli(stack, "get", shown["id"])
    assert f"found by {resolution['strategy']}: {server.ip} on pod eth0" in shown_text
    assert f"<-> node {server.host_if} (ifindex {resolution['ifindex']}" in shown_text
    listed = json.loads(_cli(stack, "list", "-n", "shop", "-o", "json"))
    assert [c["id"] for c in listed] == [shown["id"]]
    detail = json.loads(_cli(stack, "get", shown["id"], "-o", "json"))
    history = detail.pop("history")
    # What is inside, summarised on the node from the stored pcap (protobuf JSON: 64-bit numbers are strings).
    summary = detail["targets"][0]["summary"]
    assert int(summary["packets"]) == len(packets)
    assert any(p["protocol"].endswith(":tcp") for p in summary["protocols"])
    assert {
        summary["conversations"][0]["endpointA"].rsplit(":", 1)[0],
        summary["conversations"][0]["endpointB"].rsplit(":", 1)[0],
    } == {client.ip, server.ip}
    assert int(summary.get("tcpResets", 0)) == 0 and not summary.get("error")
    # The network around the capture, read by the agent on node-2 at both ends (the whole record beside the pcap).
    context = detail["targets"][0]["context"]
    assert any(a.startswith(f"eth0 {server.ip}/") for a in context["pod_addresses"])
    assert context["host_device_end"]["device"] == server.host_if
    to_server = sum(1 for _src, dst, *_ in packets if dst == server.ip)
    sent = int(context["host_device_end"]["tx_packets"]) - int(
        context["host_device_start"].get("tx_packets", 0)
    )
    assert sent >= to_server
    assert context["object_key"] == row.object_key.removesuffix(".pcap") + ".context.json"
    assert f"network: pod eth0 {server.ip}/" in shown_text, shown_text
    assert shown.pop("history") == []  # snapshots from WatchCapture carry no history; GetCapture does
    assert detail == shown
    # Every transition once, in order, for the capture and for its one pod.
    assert [h["state"] for h in history if not h["pod"]] == ["PENDING", "RUNNING", "UPLOADING", "COMPLETED"]
    assert [h["state"] for h in history if h["pod"] == "shop/server"] == [
        "PENDING",
        "RUNNING",
        "UPLOADING",
        "COMPLETED",
    ]
    url = _cli(stack, "url", shown["id"]).strip()
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == data
    again = tmp_path / "again.pcap"
    _cli(stack, "download", shown["id"], "-f", str(again))
    assert again.read_bytes() == data

    # Deleting removes the pcap from the store and the capture from view; its row stays, marked.
    _cli(stack, "delete", shown["id"])
    gone = subprocess.run(
        [PODCAP, "get", shown["id"]],
        env={**os.environ, "PODCAP_SERVER": stack.server},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert gone.returncode != 0 and "NOT_FOUND" in gone.stderr and "was deleted" in gone.stderr
    assert json.loads(_cli(stack, "list", "-n", "shop", "-o", "json")) == []
    if stack.s3_bucket is not None:
        s3 = boto3.client(
            "s3", endpoint_url=stack.s3_env["AWS_ENDPOINT_URL_S3"], **aws_credentials(stack.s3_env)
        )
        assert s3.list_objects_v2(Bucket=stack.s3_bucket).get("KeyCount", 0) == 0
    else:
        assert not (Path(stack.store_url.removeprefix("file://")) / row.object_key).exists()


def test_stop_ends_a_long_capture_early_and_keeps_what_was_captured(stack: Stack, tmp_path: Path) -> None:
    lab = stack.lab
    client, server = lab.pods["client"], lab.pods["server"]
    lab.http_server(server.netns, HTTP_PORT)
    started = json.loads(
        _cli(
            stack,
            "capture",
            "shop/server",
            "--filter",
            f"tcp port {HTTP_PORT}",
            "--duration",
            "10m",
            "-o",
            "json",
        )
    )
    assert started["state"] == "RUNNING"
    assert started["interface"] == server.host_if
    assert lab.http_get(client.netns, f"http://{server.ip}:{HTTP_PORT}/before-stop", timeout=5) == 404
    # A unique prefix of the id is enough, as with git.
    stopped = json.loads(_cli(stack, "stop", started["id"][:8], "--wait", "-o", "json"))
    assert stopped["state"] == "COMPLETED" and stopped["id"] == started["id"]
    pcap = tmp_path / "stopped.pcap"
    _cli(stack, "download", started["id"][:6], "-f", str(pcap))
    uris = [uri for (uri,) in _tshark(pcap, "http.request.uri") if uri]
    assert uris == ["/before-stop"]
    final = json.loads(_cli(stack, "get", started["id"], "-o", "json"))
    assert final["state"] == "COMPLETED" and final["sha256"] == hashlib.sha256(pcap.read_bytes()).hexdigest()
    # Recorded as stopped: by whom and when, in the capture and in its history; the text says how long it ran.
    assert final["stopped_by"] == "anonymous" and final["started"] < final["stopped"] <= final["ended"]
    assert any(h["detail"] == "stop requested by anonymous" and not h["pod"] for h in final["history"])
    assert "600.0 requested; stopped by anonymous after" in _cli(stack, "get", started["id"])
    # Stopping it again is refused before acting: no second `allowed` entry in the audit trail.
    again = subprocess.run(
        [PODCAP, "stop", started["id"]],
        env={**os.environ, "PODCAP_SERVER": stack.server},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (
        again.returncode != 0
        and "FAILED_PRECONDITION" in again.stderr
        and "already COMPLETED" in again.stderr
    )
    assert _audit(stack, started["id"], "stop") == ["allowed"]


def test_download_before_completion_is_refused(stack: Stack, tmp_path: Path) -> None:
    started = json.loads(_cli(stack, "capture", "shop/client", "--duration", "10m", "-o", "json"))
    result = subprocess.run(
        [PODCAP, "download", started["id"], "-f", str(tmp_path / "early.pcap")],
        env={**os.environ, "PODCAP_SERVER": stack.server},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode != 0
    assert "FAILED_PRECONDITION" in result.stderr and "RUNNING" in result.stderr
    assert not (tmp_path / "early.pcap").exists() and not (tmp_path / "early.pcap.part").exists()
    assert _audit(stack, started["id"], "download") == []  # refused before acting: nothing was handed out
    url = subprocess.run(
        [PODCAP, "url", started["id"]],
        env={**os.environ, "PODCAP_SERVER": stack.server},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert url.returncode != 0 and "FAILED_PRECONDITION" in url.stderr and url.stdout == ""
    _cli(stack, "stop", started["id"])


def test_downloads_are_verified_and_never_leave_a_partial_file(stack: Stack, tmp_path: Path) -> None:
    """Streamed or through the URL, a download must match the metadata's sha256; a name the user gave never
    holds anything else, an existing file is replaced only on request, and `-f -` is standard output."""
    done = json.loads(_cli(stack, "capture", "shop/client", "--duration", "1s", "--wait", "-o", "json"))
    assert done["state"] == "COMPLETED" and done["sha256"]
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    streamed, fetched = downloads / "streamed.pcap", downloads / "fetched.pcap"
    _cli(stack, "download", done["id"], "-f", str(streamed))
    _cli(stack, "download", done["id"], "-f", str(fetched), "--url")
    assert hashlib.sha256(streamed.read_bytes()).hexdigest() == done["sha256"]
    assert fetched.read_bytes() == streamed.read_bytes()
    to_stdout = subprocess.run(
        [PODCAP, "download", done["id"], "-f", "-"],
        env={**os.environ, "PODCAP_SERVER": stack.server},
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert to_stdout.returncode == 0 and to_stdout.stdout == streamed.read_bytes()
    assert not (Path.cwd() / "-").exists()

    again = _podcap(stack, "download", done["id"], "-f", str(streamed))
    assert again.returncode != 0 and "exists" in again.stderr and "--force" in again.stderr
    _cli(stack, "download", done["id"], "-f", str(streamed), "--force")

    # The stored object altered behind podcap's back: every way of downloading it refuses, and saves nothing.
    if stack.s3_bucket is not None:
        s3 = boto3.client(
            "s3", endpoint_url=stack.s3_env["AWS_ENDPOINT_URL_S3"], **aws_credentials(stack.s3_env)
        )
        key = f"captures/{done['object_key']}"
        s3.put_object(Bucket=stack.s3_bucket, Key=key, Body=b"X" + streamed.read_bytes()[1:])
    else:
        stored = Path(stack.store_url.removeprefix("file://")) / done["object_key"]
        stored.write_bytes(b"X" + stored.read_bytes()[1:])
    for how in ([], ["--url"]):
        target = downloads / f"altered{len(how)}.pcap"
        refused = _podcap(stack, "download", done["id"], "-f", str(target), *how)
        assert refused.returncode != 0, how
        assert "does not match its metadata" in refused.stderr and done["sha256"] in refused.stderr
        assert sorted(p.name for p in downloads.iterdir()) == ["fetched.pcap", "streamed.pcap"]
    refused_stdout = subprocess.run(
        [PODCAP, "download", done["id"], "-f", "-"],
        env={**os.environ, "PODCAP_SERVER": stack.server},
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert refused_stdout.returncode != 0 and b"discard what was written" in refused_stdout.stderr


def _audit(stack: Stack, capture_id: str, action: str) -> list[str]:
    """The results of the audit entries of one action on one capture, oldest first."""
    engine = sa.create_engine(stack.db_url)
    try:
        with engine.connect() as conn:
            query = "SELECT result FROM audit_events WHERE capture_id = :id AND action = :action ORDER BY id"
            return list(conn.execute(sa.text(query), {"id": capture_id, "action": action}).scalars())
    finally:
        engine.dispose()


def _podcap(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PODCAP, *args],
        env={**os.environ, "PODCAP_SERVER": stack.server},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _cli(stack: Stack, *args: str) -> str:
    result = subprocess.run(
        [PODCAP, *args],
        env={**os.environ, "PODCAP_SERVER": stack.server},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"podcap {' '.join(args)}: {result.stderr}"
    return result.stdout


def _wait_for_line(process: subprocess.Popen[str], word: str, timeout: float = 30.0) -> str:
    """Reads the CLI's progress (stderr) until a line holds `word`; returns what it read."""
    assert process.stderr is not None
    seen: list[str] = []
    found = threading.Event()

    def read() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            seen.append(line)
            if word in line:
                found.set()
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    if not found.wait(timeout):
        raise AssertionError(f"the CLI never reported {word}: {''.join(seen)}")
    reader.join()
    return "".join(seen)
