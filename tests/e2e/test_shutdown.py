"""A peer that goes away while a capture runs: cleanly (SIGTERM), or by freezing (SIGSTOP, a hung node).

SIGTERM, to the controller or to the agent, must end the streams a client holds open with a status or a final
snapshot (never a hang), and the process must exit 0 within its grace period without a traceback. A frozen agent
keeps its TCP connection open (the kernel still acknowledges), so only the keepalive pings of the controller's
channel can notice it: the capture must end FAILED naming the agent instead of staying RUNNING for ever.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import yaml

from podcap.api.v1 import agent_pb2, capture_pb2, capture_pb2_grpc, common_pb2
from tests.support.agents import NodeAgent
from tests.support.lab import Lab
from tests.support.processes import ControllerProcess, cli

pytestmark = pytest.mark.netns

PORT = 8080


@dataclass
class Rig:
    lab: Lab
    agent: NodeAgent
    controller: ControllerProcess

    def capture(self) -> str:
        """A 10-minute capture of shop/server, RUNNING when this returns."""
        started = cli(
            ["capture", "shop/server", "--filter", f"tcp port {PORT}", "--duration", "10m", "-o", "json"],
            self.controller.address,
        )
        assert started.returncode == 0, started.stderr + self.agent.log()[-3000:]
        capture = json.loads(started.stdout)
        assert capture["state"] == "RUNNING"
        return str(capture["id"])

    def agent_capture(self) -> agent_pb2.AgentCapture:
        """The one capture the agent runs, as it reports it."""
        (running,) = self.agent.stub.ListCaptures(agent_pb2.ListAgentCapturesRequest(), timeout=10).captures
        return running


@pytest.fixture
def rig(lab: Lab, spool: Path, tmp_path: Path) -> Iterator[Rig]:
    agent = NodeAgent(lab, lab.nodes["node-2"], f"file://{tmp_path / 'store'}", spool, tmp_path)
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
    controller = ControllerProcess(
        [
            "--db",
            f"sqlite:///{tmp_path / 'podcap.db'}",
            "--store",
            agent.store_url,
            "--inventory",
            str(inventory),
            "--agent-lost-after",
            "5s",
        ],
        tmp_path,
    )
    try:
        agent.start()
        controller.start()
        yield Rig(lab, agent, controller)
    finally:
        if agent.process is not None and agent.process.poll() is None:
            agent.process.send_signal(signal.SIGCONT)  # a frozen agent cannot act on SIGTERM
        controller.stop()
        agent.close()


def _no_traceback(log: str) -> None:
    assert "Traceback" not in log, log[-4000:]


def test_sigterm_to_the_controller_ends_a_watch_with_a_status_and_exits_cleanly(rig: Rig) -> None:
    capture_id = rig.capture()
    process = rig.controller.process
    assert process is not None
    with grpc.insecure_channel(rig.controller.address) as channel, ThreadPoolExecutor(1) as pool:
        watch = capture_pb2_grpc.CaptureServiceStub(channel).WatchCapture(
            capture_pb2.WatchCaptureRequest(id=capture_id), timeout=60
        )
        assert next(watch).state == common_pb2.CAPTURE_STATE_RUNNING
        rest = pool.submit(lambda: list(watch))
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        exited_in = time.monotonic() - signalled
        with pytest.raises(grpc.RpcError) as ended:
            rest.result(timeout=30)
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE, ended.value.details()
    assert exited_in < 12, f"the controller took {exited_in:.1f}s to stop (grace 5s)"
    _no_traceback(rig.controller.log())
    # The agent did not notice: the capture still runs there, for the next controller to follow.
    assert rig.agent_capture().state == common_pb2.CAPTURE_STATE_RUNNING


def test_sigterm_to_the_agent_ends_its_watch_with_the_final_snapshot_and_exits_cleanly(rig: Rig) -> None:
    rig.capture()
    process = rig.agent.process
    assert process is not None
    with ThreadPoolExecutor(1) as pool:
        ref = agent_pb2.AgentCaptureRef(capture_id=rig.agent_capture().capture_id)
        watch = rig.agent.stub.WatchCapture(ref, timeout=60)
        assert next(watch).state == common_pb2.CAPTURE_STATE_RUNNING
        rest = pool.submit(lambda: list(watch))
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=40) == 0
        exited_in = time.monotonic() - signalled
        snapshots = rest.result(timeout=30)
    assert snapshots, "the watch ended without telling how the capture ended"
    assert snapshots[-1].state == common_pb2.CAPTURE_STATE_COMPLETED, snapshots[-1]
    assert exited_in < 25, f"the agent took {exited_in:.1f}s to stop"
    _no_traceback(rig.agent.log())


def test_a_frozen_agent_is_noticed_by_keepalive_and_the_capture_fails_naming_it(rig: Rig) -> None:
    capture_id = rig.capture()
    process = rig.agent.process
    assert process is not None
    process.send_signal(signal.SIGSTOP)
    # Keepalive: a ping within 20 s, unanswered after 10 s more; then --agent-lost-after (5 s) has long passed.
    deadline = time.monotonic() + 50
    while True:
        shown = json.loads(cli(["get", capture_id, "-o", "json"], rig.controller.address).stdout)
        if shown["state"] != "RUNNING":
            break
        assert time.monotonic() < deadline, "the capture still says RUNNING on a frozen agent"
        time.sleep(1)
    assert shown["state"] == "FAILED", shown
    assert rig.agent.address in shown["targets"][0]["error"], shown["targets"][0]["error"]
    assert "ping timeout" in shown["targets"][0]["error"]
    process.send_signal(signal.SIGCONT)
