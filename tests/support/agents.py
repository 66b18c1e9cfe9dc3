"""A real `podcap agent` process inside a lab node's netns, reachable from the test through a relay.

Tests kill it (SIGTERM, SIGKILL) and start it again on the same spool, as a node would after a crash; the relay
on the root side stays, so the address the test uses does not change across restarts. A `prefix` (setpriv with a
capability list, strace) runs the agent under another program, as its own pid once that program execs it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import grpc

from podcap.api.v1 import agent_pb2, agent_pb2_grpc, common_pb2
from tests.support.lab import Lab, Node
from tests.support.processes import PODCAP, channel, free_port, stop, wait_healthy


class NodeAgent:
    def __init__(
        self,
        lab: Lab,
        node: Node,
        store_url: str,
        spool: Path,
        log_dir: Path,
        env: dict[str, str] | None = None,
        args: Sequence[str] = (),
        credentials: grpc.ChannelCredentials | None = None,
        server_name: str = "",
        prefix: Sequence[str] = (),
    ) -> None:
        self.lab, self.node, self.store_url, self.spool = lab, node, store_url, spool
        self._log_dir, self._env, self._args = log_dir, env or {}, list(args)
        self._prefix = list(prefix)
        self._port = free_port()
        relay = lab.forward_out("127.0.0.1", 0, node.netns, "127.0.0.1", self._port)
        self.address = f"{relay.host}:{relay.port}"
        self.process: subprocess.Popen[bytes] | None = None
        # With `credentials` the agent serves mutual TLS (its `args` say so): the test talks to it as the controller.
        self.credentials, self.server_name = credentials, server_name
        self._channel = channel(self.address, credentials, server_name)
        self.stub = agent_pb2_grpc.AgentServiceStub(self._channel)
        self._starts = 0

    def start(self) -> None:
        self._starts += 1
        log = (self._log_dir / f"agent-{self.node.name}-{self._starts}.log").open("wb")
        self.process = self.lab.popen(
            self.node.netns,
            [
                *self._prefix,
                PODCAP,
                "agent",
                "--node-name",
                self.node.name,
                "--listen",
                f"127.0.0.1:{self._port}",
                "--store",
                self.store_url,
                "--spool-dir",
                str(self.spool),
                *self._args,
            ],
            env={**os.environ, **self._env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        wait_healthy(self.address, self.process, credentials=self.credentials, server_name=self.server_name)

    def signal(self, signum: signal.Signals, timeout: float = 30.0) -> int:
        """Sends `signum` and waits for the agent to exit; returns its exit status."""
        assert self.process is not None
        self.process.send_signal(signum)
        return self.process.wait(timeout=timeout)

    def log(self) -> str:
        return "\n".join(
            p.read_text(errors="replace") for p in sorted(self._log_dir.glob(f"agent-{self.node.name}-*.log"))
        )

    def close(self) -> None:
        if self.process is not None:
            stop(self.process)
        self._channel.close()


def tcpdumps_writing_into(directory: Path) -> list[int]:
    """Pids of tcpdump processes whose command line names a file under `directory`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state == "Z" or not argv or not argv[0].endswith(b"tcpdump"):
            continue
        if any(arg.startswith(str(directory).encode()) for arg in argv):
            found.append(int(proc.name))
    return found


_ENDED = frozenset({common_pb2.CAPTURE_STATE_COMPLETED, common_pb2.CAPTURE_STATE_FAILED})


def wait_for(
    agent: NodeAgent, capture_id: str, states: frozenset[int] | set[int] = _ENDED, timeout: float = 60
) -> agent_pb2.AgentCapture:
    """The agent's capture once it is in one of `states`; an ended capture (the default) also has its summary
    made, since the summary follows the stored pcap. UNAVAILABLE while a restarted agent comes up is waited out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            capture = agent.stub.GetCapture(agent_pb2.AgentCaptureRef(capture_id=capture_id), timeout=5)
            pending = capture.summary.state == common_pb2.SUMMARY_STATE_PENDING
            if capture.state in states and not (capture.state in _ENDED and pending):
                return capture
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"capture {capture_id!r} never reached {states}:\n{agent.log()[-4000:]}")
        time.sleep(0.1)
