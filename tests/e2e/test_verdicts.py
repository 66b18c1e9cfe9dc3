"""A capture of both ends of a conversation (a label selector takes the client and the server pod) tells, once
both ends are summarised, where each attempt died: the server answered RST, the SYNs to a port the server's netns
drops got no answer, a request to the HTTP server connected."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from typing import Any

import pytest

from tests.e2e.conftest import Stack
from tests.support.netns import netns_socket
from tests.support.processes import PODCAP

pytestmark = pytest.mark.netns

HTTP, CLOSED, DROPPED = 8080, 9102, 9101


def _cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PODCAP, *args],
        env={**os.environ, "PODCAP_SERVER": stack.server},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _connect(netns: str, ip: str, port: int, timeout: float) -> int:
    with netns_socket(netns) as sock:
        sock.settimeout(timeout)
        sock.bind(("0.0.0.0", 0))
        with contextlib.suppress(TimeoutError, ConnectionRefusedError):
            sock.connect((ip, port))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("stack", ["localdir-sqlite-static"], indirect=True)
def test_get_shows_where_each_attempt_died(stack: Stack) -> None:
    lab = stack.lab
    client, server = lab.pods["client"], lab.pods["server"]
    lab.http_server(server.netns, HTTP)
    lab.run(server.netns, ["iptables", "-A", "INPUT", "-p", "tcp", "--dport", str(DROPPED), "-j", "DROP"])
    started = _cli(
        stack, "capture", "-n", "shop", "-l", "tier=web", "--filter", "tcp", "--duration", "3s", "-o", "json"
    )
    assert started.returncode == 0, started.stderr
    capture = json.loads(started.stdout)
    reset = _connect(client.netns, server.ip, CLOSED, 2)
    silent = _connect(client.netns, server.ip, DROPPED, 1.2)
    assert lab.http_get(client.netns, f"http://{server.ip}:{HTTP}/hello.txt", timeout=5) == 200

    deadline = time.monotonic() + 40
    shown: dict[str, Any] = json.loads(_cli(stack, "get", capture["id"], "-o", "json").stdout)
    while not shown["verdicts"] and time.monotonic() < deadline:
        time.sleep(0.3)
        shown = json.loads(_cli(stack, "get", capture["id"], "-o", "json").stdout)
    assert shown["state"] == "COMPLETED", shown["error"]
    by_subject = {v["subject"]: v for v in shown["verdicts"]}
    refused = by_subject[f"{client.ip}:{reset} -> {server.ip}:{CLOSED}"]
    assert (refused["protocol"], refused["ok"], refused["code"]) == ("tcp", False, "server_reset")
    assert refused["verdict"] == "the server answered RST"
    assert len(refused["evidence"]) == 2
    unanswered = by_subject[f"{client.ip}:{silent} -> {server.ip}:{DROPPED}"]
    assert (unanswered["code"], unanswered["verdict"]) == (
        "server_silent",
        "the server received the SYN and never answered",
    )
    assert [v["code"] for v in shown["verdicts"] if v["subject"].endswith(f"{server.ip}:{HTTP}")] == [
        "connected"
    ]

    text = _cli(stack, "get", capture["id"]).stdout
    assert "  Verdicts:" in text
    assert f"    !! {client.ip}:{reset} -> {server.ip}:{CLOSED}: the server answered RST" in text
