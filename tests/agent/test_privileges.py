"""The agent's capabilities, from its DaemonSet: enough for a whole capture, and none of them there for nothing.

deploy/base/agent/daemonset.yaml runs the agent as root but not privileged: every capability dropped, a short list
added back. Here a real `podcap agent` runs in a lab node the way a container runtime starts it from that
manifest: root, with exactly that list as its bounding, permitted and effective sets (setpriv), and with
no_new_privs when the manifest says `allowPrivilegeEscalation: false`. It captures a pod's real traffic to a
completed upload and, after a SIGKILL, recovers a spooled capture. Then agents each lacking one capability of the
list show that every one is needed, and what a caller sees without it.

The pod captured has no name in /run/netns: only its process's /proc/<pid>/ns/net leads to its network
namespace, as under runtimes that do not name namespaces, so the agent's whole resolution path runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
import yaml
from google.protobuf.duration_pb2 import Duration

from podcap.api.v1 import agent_pb2, common_pb2
from tests.support.agents import NodeAgent, tcpdumps_writing_into
from tests.support.lab import Lab, LabPod, build_lab, require_netns
from tests.support.processes import spool_root

pytestmark = pytest.mark.netns

DAEMONSET = Path(__file__).resolve().parents[2] / "deploy" / "base" / "agent" / "daemonset.yaml"
PORT = 8080
HIDDEN_IP = "10.251.2.40"
COMPLETED, FAILED = common_pb2.CAPTURE_STATE_COMPLETED, common_pb2.CAPTURE_STATE_FAILED
# linux/capability.h, in bit order.
_CAPABILITY_H = (
    "chown dac_override dac_read_search fowner fsetid kill setgid setuid setpcap linux_immutable "
    "net_bind_service net_broadcast net_admin net_raw ipc_lock ipc_owner sys_module sys_rawio sys_chroot "
    "sys_ptrace sys_pacct sys_admin sys_boot sys_nice sys_resource sys_time sys_tty_config mknod lease "
    "audit_write audit_control setfcap mac_override mac_admin syslog wake_alarm block_suspend audit_read "
    "perfmon bpf checkpoint_restore"
)
CAPABILITIES = _CAPABILITY_H.upper().split()
_INTERNAL = "INTERNAL: internal error; see the server log"

# What a caller sees of a capture when the agent lacks one capability of the manifest's list ("CODE: details" of
# a refused StartCapture, or "STATE: error" of the capture's end), and what the agent's log says about it.
WITHOUT: dict[str, tuple[str, str]] = {
    "NET_RAW": ("INTERNAL: cannot start tcpdump: the agent lacks CAP_NET_RAW.", ""),
    "NET_ADMIN": ("INTERNAL: cannot start tcpdump: the agent lacks CAP_NET_ADMIN.", ""),
    "SETUID": ("INTERNAL: cannot start tcpdump: the agent lacks CAP_SETUID.", ""),
    "SETGID": ("INTERNAL: cannot start tcpdump: the agent lacks CAP_SETGID.", ""),
    # Without it setpriv would start tcpdump all the same, silently with the agent's whole bounding set.
    "SETPCAP": ("INTERNAL: cannot start tcpdump: the agent lacks CAP_SETPCAP.", ""),
    "SYS_ADMIN": (
        "INTERNAL: cannot read network namespaces on node node-2: [Errno 1] setns into a pod network "
        "namespace: Operation not permitted",
        "",
    ),
    # The pod's /proc/<pid>/ns/net cannot be opened, so no namespace on the node seems to hold its IP.
    "SYS_PTRACE": (f"NOT_FOUND: no network namespace on node node-2 holds pod IP {HIDDEN_IP}", ""),
    # Neither SIGINT nor the parent-death signal reaches tcpdump, another user's process, without it: tcpdump
    # could be neither stopped nor ended with its agent.
    "KILL": ("INTERNAL: cannot start tcpdump: the agent lacks CAP_KILL.", ""),
    # The spool directory cannot be given to the tcpdump user.
    "CHOWN": (_INTERNAL, "PermissionError: [Errno 1] Operation not permitted"),
    # The capture's record cannot be written into the spool directory, which is tcpdump's.
    "DAC_OVERRIDE": (_INTERNAL, "PermissionError: [Errno 13] Permission denied"),
}


def _agent_container() -> dict[str, Any]:
    for doc in yaml.safe_load_all(DAEMONSET.read_text()):
        if doc and doc.get("kind") == "DaemonSet":
            (container,) = (c for c in doc["spec"]["template"]["spec"]["containers"] if c["name"] == "agent")
            return cast(dict[str, Any], container)
    raise AssertionError(f"no DaemonSet in {DAEMONSET}")


def granted() -> list[str]:
    """The capabilities the manifest adds back, as it spells them (NET_RAW, ...)."""
    return [str(cap) for cap in _agent_container()["securityContext"]["capabilities"]["add"]]


def _no_new_privs() -> bool:
    return _agent_container()["securityContext"].get("allowPrivilegeEscalation") is False


def _caps(mask_hex: str) -> set[str]:
    mask = int(mask_hex, 16)
    return {name for bit, name in enumerate(CAPABILITIES) if mask >> bit & 1}


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


class _Confined:
    """The lab as NodeAgent uses it, except that the agent starts under `prefix` (setpriv)."""

    def __init__(self, lab: Lab, prefix: Sequence[str]) -> None:
        self._lab, self._prefix = lab, list(prefix)

    def popen(self, netns: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        return self._lab.popen(netns, [*self._prefix, *argv], **kw)

    def forward_out(self, *args: Any) -> Any:
        return self._lab.forward_out(*args)


@contextlib.contextmanager
def _agent(lab: Lab, caps: Sequence[str], spool: Path, log_dir: Path) -> Iterator[NodeAgent]:
    """An agent in node-2 running as root with only `caps`, as a container runtime starts it from the manifest."""
    prefix = ["setpriv", "--bounding-set=-all," + ",".join(f"+{c.lower()}" for c in caps)]
    prefix += ["--inh-caps=-all", "--ambient-caps=-all"]
    if _no_new_privs():
        prefix.append("--no-new-privs")
    launcher = cast(Lab, _Confined(lab, [*prefix, "--"]))
    agent = NodeAgent(launcher, lab.nodes["node-2"], f"file://{log_dir / 'store'}", spool, log_dir)
    try:
        agent.start()
        yield agent
    finally:
        agent.close()
        # tcpdump ends with its agent (its parent-death signal); one that does not is killed, and fails the test.
        deadline = time.monotonic() + 10
        while (left := tcpdumps_writing_into(spool)) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert left == [], "tcpdump outlived its agent"


@pytest.fixture(scope="module")
def node_lab() -> Iterator[Lab]:
    """The lab, with a pod on node-2 whose namespace is reachable only through /proc, serving HTTP."""
    require_netns(tcpdump=True)
    with build_lab() as lab:
        hidden = lab.add_pod("node-2", "shop", "hidden", HIDDEN_IP, netns_dir=None)
        lab.http_server(hidden.netns, PORT)
        yield lab


def _hidden(lab: Lab) -> LabPod:
    return lab.pods["hidden"]


def _start(agent: NodeAgent, lab: Lab, capture_id: str) -> agent_pb2.AgentCapture:
    duration = Duration()
    duration.FromTimedelta(timedelta(minutes=10))
    request = agent_pb2.StartCaptureRequest(
        capture_id=capture_id,
        pod=agent_pb2.PodRef(namespace="shop", name="hidden", ips=[_hidden(lab).ip]),
        filter=f"tcp port {PORT}",
        duration=duration,
        object_key=f"{capture_id}.pcap",
    )
    return agent.stub.StartCapture(request, timeout=15)


def _wait(agent: NodeAgent, capture_id: str, timeout: float = 60) -> agent_pb2.AgentCapture:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(grpc.RpcError):  # UNAVAILABLE while a restarted agent comes up
            capture = agent.stub.GetCapture(agent_pb2.AgentCaptureRef(capture_id=capture_id), timeout=5)
            if capture.state in (COMPLETED, FAILED):
                return capture
        if time.monotonic() > deadline:
            raise AssertionError(f"capture {capture_id} never ended:\n{agent.log()[-4000:]}")
        time.sleep(0.1)


def _probe(lab: Lab, path: str) -> None:
    url = f"http://{_hidden(lab).ip}:{PORT}{path}"
    assert lab.http_get(lab.pods["client"].netns, url, timeout=5) == 404


def _uris(pcap: Path) -> list[str]:
    out = subprocess.run(
        ["tshark", "-r", str(pcap), "-T", "fields", "-e", "http.request.uri"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return [line for line in out.splitlines() if line]


def _assert_stored(capture: agent_pb2.AgentCapture, store: Path, uri: str) -> None:
    assert capture.state == COMPLETED, capture.error
    pcap = store / capture.object_key
    assert capture.sha256 == hashlib.sha256(pcap.read_bytes()).hexdigest()
    assert _uris(pcap) == [uri]


def test_the_manifests_capabilities_are_enough_for_a_whole_capture(node_lab: Lab, tmp_path: Path) -> None:
    caps = granted()
    store = tmp_path / "store"
    with spool_root() as spool, _agent(node_lab, caps, spool, tmp_path) as agent:
        assert agent.process is not None
        status = _status(agent.process.pid)
        assert _caps(status["CapEff"]) == _caps(status["CapBnd"]) == set(caps)
        assert status["NoNewPrivs"] == ("1" if _no_new_privs() else "0")

        started = _start(agent, node_lab, "whole-1")
        assert started.resolution.netns.startswith("/proc/")  # found through the pod's process
        (tcpdump,) = tcpdumps_writing_into(spool)
        dumped = _status(tcpdump)
        assert dumped["Uid"].split()[0] == str(pwd.getpwnam("tcpdump").pw_uid)
        assert _caps(dumped["CapEff"]) == _caps(dumped["CapBnd"]) == {"NET_RAW", "NET_ADMIN"}
        _probe(node_lab, "/confined-1")
        agent.stub.StopCapture(agent_pb2.AgentCaptureRef(capture_id="whole-1"))
        capture = _wait(agent, "whole-1")
        _assert_stored(capture, store, "/confined-1")
        assert capture.summary.error == "" and capture.summary.protocols  # tshark's statistics ran
        assert list(spool.iterdir()) == []

        # A capture cut short by SIGKILL is recovered from the spool by the next, equally confined, agent.
        _start(agent, node_lab, "whole-2")
        _probe(node_lab, "/confined-2")
        time.sleep(0.3)  # tcpdump -U writes each packet as it comes; let the last one reach the file
        agent.signal(signal.SIGKILL)
        deadline = time.monotonic() + 5
        while tcpdumps_writing_into(spool) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert tcpdumps_writing_into(spool) == [], "tcpdump outlived its agent"
        agent.start()
        _assert_stored(_wait(agent, "whole-2"), store, "/confined-2")
        assert list(spool.iterdir()) == []


def test_every_capability_in_the_manifest_is_shown_to_be_needed() -> None:
    assert set(granted()) == set(WITHOUT), "say in WITHOUT what breaks without each added capability"


@pytest.mark.parametrize("missing", sorted(WITHOUT))
def test_without_one_capability_a_capture_fails_and_says_why(
    node_lab: Lab, tmp_path: Path, missing: str
) -> None:
    assert missing in granted()
    seen, logged = WITHOUT[missing]
    with (
        spool_root() as spool,
        _agent(node_lab, [c for c in granted() if c != missing], spool, tmp_path) as agent,
    ):
        try:
            _start(agent, node_lab, "attempt")
        except grpc.RpcError as refused:
            outcome = f"{refused.code().name}: {refused.details()}"
        else:
            agent.stub.StopCapture(agent_pb2.AgentCaptureRef(capture_id="attempt"))
            capture = _wait(agent, "attempt")
            outcome = f"{common_pb2.CaptureState.Name(capture.state)}: {capture.error}"
        assert outcome.startswith(seen), outcome
        assert logged in agent.log()
        if seen.startswith("INTERNAL: cannot start tcpdump"):
            assert tcpdumps_writing_into(spool) == []  # refused before anything ran
            assert list(spool.iterdir()) == []
