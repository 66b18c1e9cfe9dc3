"""A label selector captures every matching running pod at once, one pcap per pod, as one capture; the engineer
gets one pcapng merged by time in which every packet's interface names the pod it came from."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import Stack
from tests.support.processes import PODCAP

pytestmark = pytest.mark.netns

PORT = 8080


def _cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PODCAP, *args],
        env={**os.environ, "PODCAP_SERVER": stack.server},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_selector_capture_covers_every_matching_pod_and_merges_them(stack: Stack, tmp_path: Path) -> None:
    lab = stack.lab
    client, server = lab.pods["client"], lab.pods["server"]
    lab.http_server(server.netns, PORT)
    lab.http_server(client.netns, PORT)
    started = _cli(
        stack,
        "capture",
        "-n",
        "shop",
        "-l",
        "tier=web",
        "--filter",
        f"tcp port {PORT}",
        "--duration",
        "3s",
        "-o",
        "json",
    )
    assert started.returncode == 0, started.stderr
    capture = json.loads(started.stdout)
    assert capture["state"] == "RUNNING"
    assert sorted((t["pod"], t["node"], t["state"]) for t in capture["targets"]) == [
        ("client", client.node, "RUNNING"),
        ("server", server.node, "RUNNING"),
    ]
    assert lab.http_get(client.netns, f"http://{server.ip}:{PORT}/to-server", timeout=5) == 404
    assert lab.http_get(server.netns, f"http://{client.ip}:{PORT}/to-client", timeout=5) == 404

    merged = tmp_path / "both.pcapng"
    deadline = time.monotonic() + 30
    shown = json.loads(_cli(stack, "get", capture["id"], "-o", "json").stdout)
    while shown["state"] not in ("COMPLETED", "FAILED") and time.monotonic() < deadline:
        time.sleep(0.2)
        shown = json.loads(_cli(stack, "get", capture["id"], "-o", "json").stdout)
    assert shown["state"] == "COMPLETED", shown["error"]
    assert shown["packets"] == sum(t["packets"] for t in shown["targets"])
    text = _cli(stack, "get", capture["id"]).stdout
    assert f"label_selector: {shown['label_selector']}" in text and "             pod:" not in text

    single = _cli(stack, "download", capture["id"], "-f", str(tmp_path / "one.pcap"))
    assert single.returncode != 0 and "--target N, --all or --merge" in single.stderr
    assert _cli(stack, "download", capture["id"], "-f", str(tmp_path / "each"), "--all").returncode == 0
    assert sorted(p.name.split("_")[1] for p in (tmp_path / "each").iterdir()) == ["client", "server"]
    done = _cli(stack, "download", capture["id"], "-f", str(merged), "--merge")
    assert done.returncode == 0, done.stderr

    out = subprocess.run(
        [
            "tshark",
            "-r",
            str(merged),
            "-T",
            "fields",
            "-E",
            "separator=|",
            "-e",
            "frame.interface_name",
            "-e",
            "frame.time_epoch",
            "-e",
            "tcp.payload",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.splitlines()
    rows = [line.split("|") for line in out]
    times = [float(t) for _, t, _ in rows]
    assert times == sorted(times)
    # Each request crosses both pods' veths, so it is in both pods' pcaps, each named after its pod. (Read from
    # the raw payload: tshark's HTTP dissector would take the second copy of a stream for a retransmission.)
    requests = {
        (iface, bytes.fromhex(payload.replace(":", "")).split(b" ")[1].decode())
        for iface, _, payload in rows
        if payload and bytes.fromhex(payload.replace(":", "")).startswith(b"GET ")
    }
    assert sorted(requests) == [
        (f"shop/client@{client.node}", "/to-client"),
        (f"shop/client@{client.node}", "/to-server"),
        (f"shop/server@{server.node}", "/to-client"),
        (f"shop/server@{server.node}", "/to-server"),
    ]
    assert len(rows) == shown["packets"]


def test_selector_matching_no_running_pod_is_not_found(stack: Stack) -> None:
    result = _cli(stack, "capture", "-n", "shop", "-l", "tier=db", "--duration", "5s")
    assert result.returncode != 0
    assert "NOT_FOUND" in result.stderr and "tier=db" in result.stderr


def test_bad_selector_is_invalid_argument(stack: Stack) -> None:
    result = _cli(stack, "capture", "-n", "shop", "-l", "tier in (web", "--duration", "5s")
    assert result.returncode != 0
    assert "INVALID_ARGUMENT" in result.stderr
