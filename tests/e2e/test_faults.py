"""Faults seen from the support engineer's side: whatever breaks in between, the capture ends right and its pcap
is the one that was captured.

A real controller (SQLite, S3 on moto's server) and a real agent in node-2's netns, both killed and restarted by
the test; the engineer only uses the `podcap` CLI.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from podcap.api.v1 import agent_pb2
from tests.support.agents import NodeAgent, tcpdumps_writing_into
from tests.support.lab import Lab
from tests.support.pcaps import http_uris
from tests.support.processes import PODCAP, ControllerProcess, spool_root
from tests.support.s3 import S3Server

pytestmark = pytest.mark.netns

PORT = 8080


@dataclass
class Rig:
    lab: Lab
    s3: S3Server
    bucket: str
    agent: NodeAgent
    controller: ControllerProcess

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [PODCAP, *args],
            env={**os.environ, "PODCAP_SERVER": self.controller.address},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if check:
            assert result.returncode == 0, (
                f"podcap {' '.join(args)}: {result.stderr}\n{self.controller.log()[-3000:]}"
            )
        return result

    def get(self, capture_id: str) -> dict[str, object]:
        shown: dict[str, object] = json.loads(self.cli("get", capture_id, "-o", "json").stdout)
        return shown

    def wait_for(self, capture_id: str, states: set[str], timeout: float = 60) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        while True:
            shown = self.get(capture_id)
            if shown["state"] in states:
                return shown
            assert time.monotonic() < deadline, (
                f"{capture_id} stuck in {shown['state']}:\n{self.agent.log()[-3000:]}"
            )
            time.sleep(0.2)


@pytest.fixture
def rig(lab: Lab, s3_server: S3Server, tmp_path: Path) -> Iterator[Rig]:
    if not s3_server.running:
        s3_server.start()
    bucket = f"faults-{time.monotonic_ns()}"
    s3_server.client().create_bucket(Bucket=bucket)
    node = lab.nodes["node-2"]
    lab.forward_into(node.netns, s3_server.port, "127.0.0.1", s3_server.port)
    store = f"s3://{bucket}/captures"
    server = lab.pods["server"]
    inventory = tmp_path / "inventory.yaml"
    with spool_root() as spool:
        agent = NodeAgent(lab, node, store, spool, tmp_path, env=s3_server.env)
        inventory.write_text(
            yaml.safe_dump(
                {
                    "pods": [{"namespace": "shop", "name": "server", "node": node.name, "ips": [server.ip]}],
                    "agents": {node.name: agent.address},
                }
            )
        )
        controller = ControllerProcess(
            [
                *(
                    "--db",
                    f"sqlite:///{tmp_path / 'podcap.db'}",
                    "--store",
                    store,
                    "--inventory",
                    str(inventory),
                ),
                *("--lease-ttl", "2s", "--agent-lost-after", "5s"),
            ],
            tmp_path,
            env=s3_server.env,
        )
        try:
            agent.start()
            controller.start()
            lab.http_server(server.netns, PORT)
            yield Rig(lab, s3_server, bucket, agent, controller)
        finally:
            controller.stop()
            agent.close()
            if not s3_server.running:
                s3_server.start()


def _probe(rig: Rig, path: str) -> None:
    server = rig.lab.pods["server"]
    assert (
        rig.lab.http_get(rig.lab.pods["client"].netns, f"http://{server.ip}:{PORT}{path}", timeout=5) == 404
    )


def _downloaded(rig: Rig, capture_id: str, tmp_path: Path) -> tuple[bytes, list[str]]:
    pcap = tmp_path / f"{capture_id}.pcap"
    rig.cli("download", capture_id, "-f", str(pcap))
    return pcap.read_bytes(), http_uris(pcap)


def test_agent_killed_while_uploading_and_s3_down_still_completes(rig: Rig, tmp_path: Path) -> None:
    rig.s3.stop()
    started = json.loads(
        rig.cli(
            "capture", "shop/server", "--filter", f"tcp port {PORT}", "--duration", "1s", "-o", "json"
        ).stdout
    )
    _probe(rig, "/through-it-all")
    uploading = rig.wait_for(started["id"], {"UPLOADING", "COMPLETED", "FAILED"})
    assert uploading["state"] == "UPLOADING"
    rig.agent.signal(signal.SIGKILL)
    rig.s3.start()
    rig.s3.client().create_bucket(Bucket=rig.bucket)  # moto forgets its buckets when it restarts
    rig.agent.start()

    final = rig.wait_for(started["id"], {"COMPLETED", "FAILED"})
    assert final["state"] == "COMPLETED", final["error"]
    data, uris = _downloaded(rig, started["id"], tmp_path)
    assert uris == ["/through-it-all"]
    assert final["sha256"] == hashlib.sha256(data).hexdigest() and final["bytes"] == len(data)


def test_controller_killed_mid_capture_follows_it_again_after_restart(rig: Rig, tmp_path: Path) -> None:
    started = json.loads(
        rig.cli(
            "capture", "shop/server", "--filter", f"tcp port {PORT}", "--duration", "3s", "-o", "json"
        ).stdout
    )
    rig.controller.kill()
    _probe(rig, "/while-the-controller-was-down")
    rig.controller.start()
    final = rig.wait_for(started["id"], {"COMPLETED", "FAILED"})
    assert final["state"] == "COMPLETED", final["error"]
    data, uris = _downloaded(rig, started["id"], tmp_path)
    assert uris == ["/while-the-controller-was-down"]
    assert final["sha256"] == hashlib.sha256(data).hexdigest()


def test_controller_killed_while_pending_neither_loses_nor_duplicates_the_capture(
    rig: Rig, tmp_path: Path
) -> None:
    """The controller dies after writing PENDING and sending StartCapture, before the agent answered."""
    assert rig.agent.process is not None
    rig.agent.process.send_signal(signal.SIGSTOP)  # the agent receives the call but cannot answer yet
    creating = subprocess.Popen(
        [PODCAP, "capture", "shop/server", "--filter", f"tcp port {PORT}", "--duration", "3s"],
        env={**os.environ, "PODCAP_SERVER": rig.controller.address},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        listed: list[dict[str, object]] = []
        while not listed:
            assert time.monotonic() < deadline, "the capture was never written PENDING"
            time.sleep(0.1)
            listed = json.loads(rig.cli("list", "-o", "json").stdout)
        assert listed[0]["state"] == "PENDING"
        capture_id = str(listed[0]["id"])
        rig.controller.kill()
    finally:
        creating.kill()
        creating.wait()
        rig.agent.process.send_signal(signal.SIGCONT)

    rig.controller.start()
    # The restarted controller finds the target PENDING and unknown to the agent (the call died with the old
    # controller), so it starts it now: the capture runs late, but it runs, once.
    assert rig.wait_for(capture_id, {"RUNNING", "COMPLETED", "FAILED"})["state"] == "RUNNING"
    _probe(rig, "/after-the-crash")
    final = rig.wait_for(capture_id, {"COMPLETED", "FAILED"})
    assert final["state"] == "COMPLETED", final["error"]
    on_node = [
        c.capture_id for c in rig.agent.stub.ListCaptures(agent_pb2.ListAgentCapturesRequest()).captures
    ]
    assert on_node == [f"{capture_id}-0"]  # one tcpdump, not two
    data, uris = _downloaded(rig, capture_id, tmp_path)
    assert uris == ["/after-the-crash"]
    assert final["sha256"] == hashlib.sha256(data).hexdigest()


def test_capture_whose_agent_is_gone_fails_with_the_reason(rig: Rig) -> None:
    started = json.loads(rig.cli("capture", "shop/server", "--duration", "10m", "-o", "json").stdout)
    rig.agent.signal(signal.SIGKILL)
    final = rig.wait_for(started["id"], {"COMPLETED", "FAILED"}, timeout=60)
    assert final["state"] == "FAILED"
    assert "unreachable" in str(final["error"]) and "gave up" in str(final["error"])


def test_an_agent_back_after_its_capture_failed_still_delivers_the_pcap(rig: Rig, tmp_path: Path) -> None:
    """Past --agent-lost-after the target is FAILED (whoever waits is told); when the agent comes back and uploads
    the capture from its spool, that late result reaches the capture: the pcap is downloadable, its figures and
    sha256 are in SQL, and the history says what happened."""
    started = json.loads(
        rig.cli(
            "capture", "shop/server", "--filter", f"tcp port {PORT}", "--duration", "10m", "-o", "json"
        ).stdout
    )
    _probe(rig, "/before-the-agent-died")
    time.sleep(1.3)  # the ring block holding it handed over to tcpdump before tcpdump is ended with the agent
    rig.agent.signal(signal.SIGKILL)
    failed = rig.wait_for(started["id"], {"COMPLETED", "FAILED"}, timeout=60)
    assert failed["state"] == "FAILED" and "gave up" in str(failed["error"]) and not failed["sha256"]

    rig.agent.start()
    deadline = time.monotonic() + 60
    while not (late := rig.get(started["id"]))["sha256"]:
        assert time.monotonic() < deadline, f"no late result:\n{rig.controller.log()[-3000:]}"
        time.sleep(0.5)
    assert late["state"] == "FAILED"  # terminal states are final; the late result is added to it
    data, uris = _downloaded(rig, started["id"], tmp_path)
    assert uris == ["/before-the-agent-died"]
    assert late["sha256"] == hashlib.sha256(data).hexdigest() and late["bytes"] == len(data)
    assert "late result: the agent came back and stored the pcap" in str(late["error"])
    history = [h["detail"] for h in late["history"] if h["pod"] == "shop/server"]  # type: ignore[union-attr]
    assert any(str(d).startswith("late result: the agent came back") for d in history), history


def test_a_capture_cut_short_by_a_killed_agent_says_so(rig: Rig, tmp_path: Path) -> None:
    """A 20 s capture whose agent is SIGKILLed a few seconds in: the pcap is kept and stored, but the capture
    says it was cut short (when, over what span) and that the kernel's drops are unknown, not 0."""
    started = json.loads(
        rig.cli(
            "capture", "shop/server", "--filter", f"tcp port {PORT}", "--duration", "20s", "-o", "json"
        ).stdout
    )
    _probe(rig, "/before-the-kill")
    time.sleep(1.3)  # the ring block holding it handed over to tcpdump
    rig.agent.signal(signal.SIGKILL)
    rig.agent.start()  # back before --agent-lost-after: the capture is followed through
    final = rig.wait_for(started["id"], {"COMPLETED", "FAILED"}, timeout=60)
    assert final["state"] == "COMPLETED", final["error"]
    (target,) = final["targets"]  # type: ignore[misc]
    assert final["drops"] is None and target["drops"] is None
    assert str(target["interruption"]).startswith("cut short: the agent stopped (killed or crashed) about ")
    assert "into this 20 s capture" in str(target["interruption"])
    shown = rig.cli("get", started["id"]).stdout
    assert "kernel drops unknown" in shown and "cut short: the agent stopped" in shown
    _, uris = _downloaded(rig, started["id"], tmp_path)
    assert uris == ["/before-the-kill"]


def test_a_capture_stopped_before_it_started_is_cancelled_and_never_captures(rig: Rig) -> None:
    """The agent is frozen, so the capture waits PENDING for its StartCapture; a stop then cancels it: CANCELLED,
    by whom, and when the agent thaws, its tcpdump (if the start got there after all) is stopped at once."""
    assert rig.agent.process is not None
    rig.agent.process.send_signal(signal.SIGSTOP)
    creating: dict[str, subprocess.CompletedProcess[str]] = {}
    thread = threading.Thread(
        target=lambda: creating.setdefault(
            "result", rig.cli("capture", "shop/server", "--duration", "10m", "-o", "json", check=False)
        )
    )
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not (listed := json.loads(rig.cli("list", "-o", "json").stdout)):
            assert time.monotonic() < deadline, "the capture never appeared"
            time.sleep(0.1)
        (pending,) = listed
        assert pending["state"] == "PENDING"
        stopped = json.loads(rig.cli("stop", pending["id"], "-o", "json").stdout)
        assert stopped["state"] == "CANCELLED" and stopped["stopped_by"] == "anonymous"
    finally:
        rig.agent.process.send_signal(signal.SIGCONT)
        thread.join(timeout=60)
    shown = rig.get(pending["id"])
    assert shown["state"] == "CANCELLED"
    history = [h["detail"] for h in shown["history"] if h["pod"] == "shop/server"]  # type: ignore[union-attr]
    assert "cancelled by anonymous before it started" in history
    # The frozen agent had the StartCapture in its socket: thawed, it starts tcpdump, is told to stop at once,
    # and what it stored is the cancelled target's, as a late result.
    deadline = time.monotonic() + 30
    while not (shown := rig.get(pending["id"]))["sha256"]:
        assert time.monotonic() < deadline, f"no late result:\n{rig.controller.log()[-3000:]}"
        time.sleep(0.2)
    assert shown["state"] == "CANCELLED"
    assert "late result: the start reached the agent first; it stored the pcap" in str(shown["error"])
    assert tcpdumps_writing_into(rig.agent.spool) == []
