"""The agent's capabilities, from its DaemonSet: enough for a whole capture, and none of them there for nothing.

deploy/base/agent/daemonset.yaml runs the agent as root but not privileged: every capability dropped, a short list
added back. Here a real `podcap agent` runs in a lab node the way a container runtime starts it from that
manifest: root, with exactly that list as its bounding, permitted and effective sets (setpriv), and with
no_new_privs when the manifest says `allowPrivilegeEscalation: false`. It captures a pod's real traffic to a
completed upload and, after a SIGKILL, recovers a spooled capture; tcpdump holds CAP_NET_RAW alone, and tshark,
which summarises, runs as the tcpdump user with no capability at all. The same agent captures on a bridge port veth
(flannel, the bridge plugin) and on the node's own interface (hostNetwork pods) too. Then agents each lacking one
capability of the list show that every one is needed, and what a caller sees without it: FAILED_PRECONDITION
naming the capability, never INTERNAL.

The pod captured has no name in /run/netns: only its process's /proc/<pid>/ns/net leads to its network
namespace, as under runtimes that do not name namespaces, so the agent's whole resolution path runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import re
import signal
import threading
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
from tests.support.agents import NodeAgent, tcpdumps_writing_into, wait_for
from tests.support.lab import Lab, LabPod, build_lab, require_netns
from tests.support.pcaps import http_uris
from tests.support.processes import spool_root

pytestmark = pytest.mark.netns

DAEMONSET = Path(__file__).resolve().parents[2] / "deploy" / "base" / "agent" / "daemonset.yaml"
PORT = 8080
HIDDEN_IP = "10.251.2.40"
BRIDGED_IP = "10.251.2.41"
HOST_PORT = 8081  # served in node-2's own network namespace, as a hostNetwork pod would
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


def _launch(capability: str) -> str:
    return re.escape(f"FAILED_PRECONDITION: cannot start tcpdump: the agent lacks CAP_{capability}. ") + ".*"


# What a caller sees of a capture when the agent lacks one capability of the manifest's list (a pattern of the
# whole "CODE: details" of a refused StartCapture, or "STATE: error" of the capture's end), and what the agent's log
# says about it. The missing capability is named, and the code is FAILED_PRECONDITION: the deployment is wrong.
WITHOUT: dict[str, tuple[str, str]] = {
    "NET_RAW": (_launch("NET_RAW"), ""),
    "SETUID": (_launch("SETUID"), ""),
    "SETGID": (_launch("SETGID"), ""),
    # Without it setpriv would start tcpdump all the same, silently with the agent's whole bounding set.
    "SETPCAP": (_launch("SETPCAP"), ""),
    "SYS_ADMIN": (
        re.escape(
            "FAILED_PRECONDITION: cannot read network namespaces on node node-2: setns into a pod network "
            "namespace: Operation not permitted; the agent needs CAP_SYS_ADMIN"
        ),
        "",
    ),
    # The pod's /proc/<pid>/ns/net cannot be opened, and the agent says so rather than that the pod is elsewhere.
    "SYS_PTRACE": (
        re.escape(f"FAILED_PRECONDITION: no network namespace on node node-2 holds pod IP {HIDDEN_IP} (")
        + r"[1-9]\d* "
        + re.escape(
            "network namespace paths could not be opened: permission denied; the agent needs CAP_SYS_PTRACE "
            "to open /proc/<pid>/ns/net of other containers' processes)"
        ),
        "",
    ),
    # Neither SIGINT nor the parent-death signal reaches tcpdump, another user's process, without it: tcpdump
    # could be neither stopped nor ended with its agent.
    "KILL": (_launch("KILL"), ""),
    # The spool directory cannot be given to the tcpdump user.
    "CHOWN": (
        re.escape(
            "FAILED_PRECONDITION: cannot give the capture's spool directory to tcpdump's user 'tcpdump': "
            "Operation not permitted; the agent needs CAP_CHOWN"
        ),
        "",
    ),
    # The capture's record cannot be written into the spool directory, which is tcpdump's, once tcpdump has
    # started: the agent ends that tcpdump, but cannot remove the directory either, and logs that.
    "DAC_OVERRIDE": (
        re.escape("FAILED_PRECONDITION: cannot write the capture's record into its spool directory ")
        + r"/\S+/attempt"
        + re.escape(", which belongs to tcpdump's user: Permission denied; the agent needs CAP_DAC_OVERRIDE"),
        "cannot remove the spool directory",
    ),
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


@contextlib.contextmanager
def _agent(lab: Lab, caps: Sequence[str], spool: Path, log_dir: Path) -> Iterator[NodeAgent]:
    """An agent in node-2 running as root with only `caps`, as a container runtime starts it from the manifest."""
    prefix = ["setpriv", "--bounding-set=-all," + ",".join(f"+{c.lower()}" for c in caps)]
    prefix += ["--inh-caps=-all", "--ambient-caps=-all"]
    if _no_new_privs():
        prefix.append("--no-new-privs")
    agent = NodeAgent(
        lab, lab.nodes["node-2"], f"file://{log_dir / 'store'}", spool, log_dir, prefix=[*prefix, "--"]
    )
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
    """The lab, with pods on node-2 serving HTTP: one wired like Calico (a routed /32 veth) whose namespace is
    reachable only through /proc, one on a bridge (flannel, the bridge plugin); and node-2 itself serving HTTP, as
    a hostNetwork pod would."""
    require_netns(tcpdump=True)
    with build_lab() as lab:
        hidden = lab.add_pod("node-2", "shop", "hidden", HIDDEN_IP, netns_dir=None)
        lab.http_server(hidden.netns, PORT)
        bridged = lab.add_pod("node-2", "shop", "bridged", BRIDGED_IP, cni="bridge")
        lab.http_server(bridged.netns, PORT)
        lab.http_server(lab.nodes["node-2"].netns, HOST_PORT)
        yield lab


def _hidden(lab: Lab) -> LabPod:
    return lab.pods["hidden"]


def _start(
    agent: NodeAgent,
    lab: Lab,
    capture_id: str,
    ip: str = HIDDEN_IP,
    port: int = PORT,
    host_network: bool = False,
) -> agent_pb2.AgentCapture:
    duration = Duration()
    duration.FromTimedelta(timedelta(minutes=10))
    request = agent_pb2.StartCaptureRequest(
        capture_id=capture_id,
        pod=agent_pb2.PodRef(namespace="shop", name="pod", ips=[ip]),
        filter=f"tcp port {port}",
        duration=duration,
        object_key=f"{capture_id}.pcap",
        host_network=host_network,
    )
    return agent.stub.StartCapture(request, timeout=15)


def _probe(lab: Lab, path: str, ip: str = HIDDEN_IP, port: int = PORT) -> None:
    assert lab.http_get(lab.pods["client"].netns, f"http://{ip}:{port}{path}", timeout=5) == 404


def _assert_stored(capture: agent_pb2.AgentCapture, store: Path, uri: str) -> None:
    assert capture.state == COMPLETED, capture.error
    pcap = store / capture.object_key
    assert capture.sha256 == hashlib.sha256(pcap.read_bytes()).hexdigest()
    assert http_uris(pcap) == [uri]


@contextlib.contextmanager
def _children_named(pid: int, name: str) -> Iterator[dict[int, dict[str, str]]]:
    """/proc/<child>/status of every child of process `pid` named `name`, sampled every 2 ms while in the block
    (each child's last sample: it has exec'd `name` by then, so its credentials are final)."""
    seen: dict[int, dict[str, str]] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.002):
            for children in Path(f"/proc/{pid}/task").glob("*/children"):
                with contextlib.suppress(OSError):
                    for child in children.read_text().split():
                        with contextlib.suppress(OSError):
                            status = _status(int(child))
                            if status["Name"] == name:
                                seen[int(child)] = status

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield seen
    finally:
        done.set()
        sampler.join(timeout=10)


def test_the_manifests_capabilities_are_enough_for_a_whole_capture(node_lab: Lab, tmp_path: Path) -> None:
    caps = granted()
    store = tmp_path / "store"
    tcpdump_user = pwd.getpwnam("tcpdump")
    with spool_root() as spool, _agent(node_lab, caps, spool, tmp_path) as agent:
        assert agent.process is not None
        status = _status(agent.process.pid)
        assert _caps(status["CapEff"]) == _caps(status["CapBnd"]) == set(caps)
        assert status["NoNewPrivs"] == ("1" if _no_new_privs() else "0")

        with _children_named(agent.process.pid, "tshark") as tsharks:
            started = _start(agent, node_lab, "whole-1")
            assert started.resolution.netns.startswith("/proc/")  # found through the pod's process
            (tcpdump,) = tcpdumps_writing_into(spool)
            dumped = _status(tcpdump)
            assert dumped["Uid"].split()[0] == str(tcpdump_user.pw_uid)
            assert _caps(dumped["CapEff"]) == _caps(dumped["CapBnd"]) == {"NET_RAW"}
            _probe(node_lab, "/confined-1")
            agent.stub.StopCapture(agent_pb2.AgentCaptureRef(capture_id="whole-1"))
            capture = wait_for(agent, "whole-1")
        _assert_stored(capture, store, "/confined-1")
        assert capture.summary.error == "" and capture.summary.protocols  # tshark's statistics ran
        # ... as the tcpdump user, without a single capability: it parses what the pods sent.
        assert tsharks, "no tshark of the agent was seen"
        for summarising in tsharks.values():
            assert set(summarising["Uid"].split()) == {str(tcpdump_user.pw_uid)}, summarising
            assert set(summarising["Gid"].split()) == {str(tcpdump_user.pw_gid)}, summarising
            assert summarising["Groups"] == ""
            for kind in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
                assert _caps(summarising[kind]) == set(), (kind, summarising)
            assert summarising["NoNewPrivs"] == "1"
        assert list(spool.iterdir()) == []

        # A capture cut short by SIGKILL is recovered from the spool by the next, equally confined, agent.
        _start(agent, node_lab, "whole-2")
        _probe(node_lab, "/confined-2")
        time.sleep(1.3)  # its ring block handed over to tcpdump: a SIGKILL loses a block still open
        agent.signal(signal.SIGKILL)
        deadline = time.monotonic() + 5
        while tcpdumps_writing_into(spool) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert tcpdumps_writing_into(spool) == [], "tcpdump outlived its agent"
        agent.start()
        _assert_stored(wait_for(agent, "whole-2"), store, "/confined-2")
        assert list(spool.iterdir()) == []


@pytest.mark.parametrize("wiring", ["bridge", "host-network"])
def test_the_manifests_capabilities_capture_on_a_bridge_port_and_on_the_node_interface(
    node_lab: Lab, tmp_path: Path, wiring: str
) -> None:
    """The Calico-style veth is captured above; tcpdump's CAP_NET_RAW alone is enough on these too."""
    node = node_lab.nodes["node-2"]
    ip, port = (BRIDGED_IP, PORT) if wiring == "bridge" else (node.ip, HOST_PORT)
    with spool_root() as spool, _agent(node_lab, granted(), spool, tmp_path) as agent:
        started = _start(agent, node_lab, wiring, ip=ip, port=port, host_network=wiring == "host-network")
        expected = node_lab.pods["bridged"].host_if if wiring == "bridge" else "eth0"
        assert started.resolution.interface == expected
        _probe(node_lab, f"/{wiring}", ip=ip, port=port)
        agent.stub.StopCapture(agent_pb2.AgentCaptureRef(capture_id=wiring))
        _assert_stored(wait_for(agent, wiring), tmp_path / "store", f"/{wiring}")


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
            capture = wait_for(agent, "attempt")
            outcome = f"{common_pb2.CaptureState.Name(capture.state)}: {capture.error}"
        assert re.fullmatch(seen, outcome, re.DOTALL), outcome
        assert logged in agent.log()
        # Refused, and nothing is left running: a tcpdump started before the refusal is ended at once. Its spool
        # directory is removed too, except without DAC_OVERRIDE, which removing tcpdump's directory takes.
        assert tcpdumps_writing_into(spool) == []
        assert [p.name for p in spool.iterdir()] == (["attempt"] if missing == "DAC_OVERRIDE" else [])
