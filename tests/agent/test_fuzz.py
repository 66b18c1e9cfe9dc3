"""Hostile and broken requests to every AgentService RPC, sent to a real `podcap agent` on a lab node: each is
answered with a documented status and a short readable message (never UNKNOWN or INTERNAL), starts no tcpdump,
leaves nothing in the spool or the store and writes nothing outside them, and the agent keeps serving.

The agent runs tcpdump through a wrapper (`--tcpdump`) that logs every start, so "no tcpdump was started" is counted,
not guessed: a process that ran for a millisecond is in the log too. The one pod it can find is the lab's `server`;
a request valid in every field captures on it and is stopped at once.

The budget per hypothesis test is PODCAP_FUZZ_EXAMPLES (default 300).
"""

from __future__ import annotations

import hashlib
import secrets
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from podcap.api.v1 import agent_pb2, common_pb2
from podcap.storage import context_key
from tests.support.agents import NodeAgent, tcpdumps_writing_into
from tests.support.fuzz import (
    EXAMPLES,
    SLOW_FILTER,
    assert_answer,
    assert_serving_while,
    call,
    non_utf8,
    oversized,
    string_fields,
    with_raw_string,
)
from tests.support.lab import build_lab, require_netns
from tests.support.processes import spool_root, wait_healthy

pytestmark = pytest.mark.netns

SERVICE = agent_pb2.DESCRIPTOR.services_by_name["AgentService"]
RPCS = [method.name for method in SERVICE.methods]
Code = grpc.StatusCode
# What AgentService may answer to input it cannot act on: bad input, an unknown pod or capture, a hostNetwork pod,
# the node's limits.
FOR_BAD_INPUT = frozenset(
    {Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.FAILED_PRECONDITION, Code.RESOURCE_EXHAUSTED}
)
SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
LONG = pytest.mark.timeout(max(120, EXAMPLES // 4))
ESCAPE = f"podcap-fuzz-escape-{secrets.token_hex(4)}"
TERMINAL = {
    common_pb2.CAPTURE_STATE_COMPLETED,
    common_pb2.CAPTURE_STATE_FAILED,
    common_pb2.CAPTURE_STATE_CANCELLED,
}

# Refused by the agent's own checks: NUL, non-ASCII, length; option-like text does not compile as a filter.
HOSTILE_FILTERS = [
    "-z /evil.sh",
    "tcp -w /etc/passwd",
    "port 80 -Z root",
    "port 80; rm -rf /",
    "--version",
    "port 80\x00",
    "x" * 65536,
    "é",
    "port 80 \u2028",
]
# Refused by libpcap's compiler, which the agent runs itself before any tcpdump.
UNCOMPILABLE_FILTERS = [
    "$(reboot)",
    "`id`",
    "port 80; reboot",
    "port 80\nport 81",
    "tcp[",
    "port 99999",
    ";",
]
BAD_CAPTURE_IDS = [
    "",
    ".",
    "..",
    "../x",
    f"../../{ESCAPE}",
    f"/tmp/{ESCAPE}",
    "a/b",
    ".hidden",
    "-rf",
    "a\x00b",
    "a b",
    "a\nb",
    "é",
    "x" * 129,
    "x" * 65536,
]
BAD_KEYS = [
    "",
    "../../etc/passwd",
    f"../../{ESCAPE}.pcap",
    f"../{ESCAPE}.pcap",
    f"a/../../{ESCAPE}.pcap",
    f"/tmp/{ESCAPE}.pcap",
    "/etc/passwd",
    "a//b.pcap",
    "./a.pcap",
    "a/.",
    "a\\..\\..\\b.pcap",
    "a\x00b.pcap",
    "a\nb.pcap",
    "x" * 1025,
]
BAD_INTERFACES = ["x" * 16, "x" * 65536, "eth0/../lo", "a b", "eth:0", ".", "..", "a\x00", "nosuch0"]


@dataclass
class Agent:
    node: NodeAgent
    channel: grpc.Channel
    spool: Path
    store: Path
    starts: Path  # one line per tcpdump the agent ran
    pod_ip: str

    def tcpdump_starts(self) -> int:
        return len(self.starts.read_text().splitlines()) if self.starts.exists() else 0

    def request(self, capture_id: str = "fz-ok", **changes: object) -> agent_pb2.StartCaptureRequest:
        """A StartCaptureRequest valid in every field, with `changes` applied."""
        request = agent_pb2.StartCaptureRequest(
            capture_id=capture_id,
            pod=agent_pb2.PodRef(namespace="shop", name="server", ips=[self.pod_ip]),
            filter="tcp port 8080",
            duration=Duration(seconds=30),
            object_key=f"fuzz/{capture_id}.pcap",
        )
        for name, value in changes.items():
            if isinstance(value, Message):
                getattr(request, name).CopyFrom(value)
            else:
                setattr(request, name, value)
        return request


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    require_netns(tcpdump=True)
    tmp = tmp_path_factory.mktemp("agent-fuzz")
    store = tmp / "store"
    # tcpdump runs as its own user: the wrapper and its log must be reachable by it (pytest's tmp is not).
    tools = Path(tempfile.mkdtemp(prefix="podcap-fuzz-"))
    tools.chmod(0o755)
    starts = tools / "starts.log"
    starts.touch()
    starts.chmod(0o666)
    wrapper = tools / "tcpdump"
    wrapper.write_text(f'#!/bin/sh\necho "$$" >> {starts}\nexec {shutil.which("tcpdump")} "$@"\n')
    wrapper.chmod(0o755)
    try:
        with build_lab() as lab, spool_root() as spool:
            node = NodeAgent(
                lab, lab.nodes["node-2"], f"file://{store}", spool, tmp, args=["--tcpdump", str(wrapper)]
            )
            channel = grpc.insecure_channel(node.address)
            try:
                node.start()
                yield Agent(node, channel, spool, store, starts, lab.pods["server"].ip)
            finally:
                channel.close()
                node.close()
    finally:
        shutil.rmtree(tools, ignore_errors=True)


def _escapes(agent: Agent) -> list[Path]:
    """Where a hostile id or key would have written outside the spool or the store."""
    found = []
    for root in (agent.spool, agent.store, Path("/tmp"), Path("/")):
        found += [
            p for p in (root, *root.parents) if (p / ESCAPE).exists() or (p / f"{ESCAPE}.pcap").exists()
        ]
    return found


def _assert_nothing_left(agent: Agent, starts_before: int) -> None:
    started = agent.tcpdump_starts() - starts_before
    assert not started, f"{started} tcpdumps started for a refused request"
    assert not tcpdumps_writing_into(agent.spool), "a tcpdump still runs for a refused request"
    assert not list(agent.spool.iterdir()), f"the spool kept {sorted(p.name for p in agent.spool.iterdir())}"
    assert not agent.store.exists() or not [p for p in agent.store.rglob("*") if p.is_file()]
    assert not _escapes(agent)


def _refused(agent: Agent, request: agent_pb2.StartCaptureRequest, allowed: set[grpc.StatusCode]) -> str:
    before = agent.tcpdump_starts()
    code, details = call(agent.channel, SERVICE, "StartCapture", request.SerializeToString())
    assert_answer(code, details, allowed, "StartCapture")
    _assert_nothing_left(agent, before)
    return details


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("filter_expr", HOSTILE_FILTERS, ids=repr)
def test_hostile_filters_are_refused(agent: Agent, filter_expr: str) -> None:
    assert "filter" in _refused(agent, agent.request(filter=filter_expr), {Code.INVALID_ARGUMENT})


@pytest.mark.parametrize("filter_expr", UNCOMPILABLE_FILTERS, ids=repr)
def test_filters_that_do_not_compile_are_refused(agent: Agent, filter_expr: str) -> None:
    details = _refused(agent, agent.request(filter=filter_expr), {Code.INVALID_ARGUMENT})
    assert details.startswith("the filter does not compile: ")


@pytest.mark.parametrize("capture_id", BAD_CAPTURE_IDS, ids=repr)
def test_bad_capture_ids_are_refused(agent: Agent, capture_id: str) -> None:
    request = agent.request(capture_id=capture_id, object_key="fuzz/ok.pcap")
    assert "capture_id" in _refused(agent, request, {Code.INVALID_ARGUMENT})
    for rpc in ("GetCapture", "StopCapture", "WatchCapture", "StreamPcap"):
        raw = agent_pb2.AgentCaptureRef(capture_id=capture_id).SerializeToString()
        code, details = call(agent.channel, SERVICE, rpc, raw)
        assert_answer(code, details, {Code.INVALID_ARGUMENT}, rpc)


@pytest.mark.parametrize("key", BAD_KEYS, ids=repr)
def test_object_keys_that_leave_the_store_are_refused(agent: Agent, key: str) -> None:
    passwd = _sha256(Path("/etc/passwd"))
    assert "object_key" in _refused(agent, agent.request(object_key=key), {Code.INVALID_ARGUMENT})
    assert _sha256(Path("/etc/passwd")) == passwd


@pytest.mark.parametrize(
    ("ips", "interface", "expected"),
    [
        ([], "", Code.INVALID_ARGUMENT),
        (["not-an-ip"], "", Code.INVALID_ARGUMENT),
        (["10.251.2.10/32"], "", Code.INVALID_ARGUMENT),
        (["999.1.1.1"], "", Code.INVALID_ARGUMENT),
        (["fe80::1%" + "x" * 100], "", Code.INVALID_ARGUMENT),
        (["10.251.2.10"] * 9, "", Code.INVALID_ARGUMENT),
        (["x" * 65536], "", Code.INVALID_ARGUMENT),
        (["10.9.9.9"], "", Code.NOT_FOUND),  # no pod on this node holds it
        (["10.251.1.10"], "", Code.NOT_FOUND),  # the client pod, on the other node
        (["10.250.0.2"], "", Code.FAILED_PRECONDITION),  # node-2's own address: a hostNetwork pod
        *[(["10.251.2.10"], name, Code.INVALID_ARGUMENT) for name in BAD_INTERFACES],
    ],
    ids=repr,
)
def test_bad_pod_refs_are_refused(
    agent: Agent, ips: list[str], interface: str, expected: grpc.StatusCode
) -> None:
    pod = agent_pb2.PodRef(namespace="shop", name="server", ips=ips)
    _refused(agent, agent.request(pod=pod, pod_interface=interface), {expected})
    raw = agent_pb2.ResolvePodRequest(pod=pod, pod_interface=interface).SerializeToString()
    code, details = call(agent.channel, SERVICE, "ResolvePod", raw)
    assert_answer(code, details, {expected}, "ResolvePod")


@pytest.mark.parametrize(
    "changes",
    [
        {"duration": Duration()},
        {"duration": Duration(seconds=-1)},
        {"duration": Duration(nanos=-1)},
        {"duration": Duration(seconds=3601)},
        {"duration": Duration(seconds=315_576_000_000)},
        {"duration": Duration(seconds=2**62)},
        {"duration": Duration(seconds=-(2**63))},
        {"duration": Duration(seconds=5, nanos=-1)},
        {"duration": Duration(seconds=5, nanos=2**31 - 1)},
        {"limits": common_pb2.CaptureLimits(max_packets=-1)},
        {"limits": common_pb2.CaptureLimits(max_packets=2**31)},
        {"limits": common_pb2.CaptureLimits(max_packets=2**63 - 1)},
        {"limits": common_pb2.CaptureLimits(max_bytes=-1)},
        {"limits": common_pb2.CaptureLimits(max_bytes=-(2**63))},
        {"limits": common_pb2.CaptureLimits(snaplen=-1)},
        {"limits": common_pb2.CaptureLimits(snaplen=262145)},
        {"limits": common_pb2.CaptureLimits(snaplen=2**31 - 1)},
    ],
    ids=repr,
)
def test_bad_durations_and_limits_are_refused(agent: Agent, changes: dict[str, Message]) -> None:
    _refused(agent, agent.request(**changes), {Code.INVALID_ARGUMENT})


# Each field: a value the agent accepts, or a hostile or random one.
text = st.text(max_size=80)
filters = st.one_of(st.just("tcp port 8080"), st.sampled_from(HOSTILE_FILTERS + UNCOMPILABLE_FILTERS), text)
capture_ids = st.one_of(
    st.text("abcdef0123456789-", min_size=1, max_size=20), st.sampled_from(BAD_CAPTURE_IDS), text
)
keys = st.one_of(st.just("fuzz/random.pcap"), st.sampled_from(BAD_KEYS), text)
ip_lists = st.lists(
    st.one_of(st.just("10.251.2.10"), st.just("10.251.1.10"), st.ip_addresses().map(str), text), max_size=10
)
interfaces = st.one_of(st.just(""), st.just("eth0"), st.sampled_from(BAD_INTERFACES), text)
int32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)
int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
durations = st.one_of(
    st.builds(Duration, seconds=st.integers(1, 5)), st.builds(Duration, seconds=int64, nanos=int32)
)


def _stop_and_wait(agent: Agent, capture_id: str) -> agent_pb2.AgentCapture:
    stub = agent.node.stub
    stub.StopCapture(agent_pb2.AgentCaptureRef(capture_id=capture_id), timeout=10)
    deadline = time.monotonic() + 60
    while (
        capture := stub.GetCapture(agent_pb2.AgentCaptureRef(capture_id=capture_id), timeout=10)
    ).state not in (TERMINAL):
        assert time.monotonic() < deadline, f"capture {capture_id} never ended:\n{agent.node.log()[-4000:]}"
        time.sleep(0.1)
    return capture


@LONG
@SETTINGS
@given(
    capture_id=capture_ids,
    ips=ip_lists,
    namespace=text,
    name=text,
    filter_expr=filters,
    duration=durations,
    max_packets=st.one_of(st.just(0), int64),
    max_bytes=st.one_of(st.just(0), int64),
    snaplen=st.one_of(st.just(0), int32),
    key=keys,
    interface=interfaces,
    host_network=st.booleans(),
)
def test_start_capture(
    agent: Agent,
    capture_id: str,
    ips: list[str],
    namespace: str,
    name: str,
    filter_expr: str,
    duration: Duration,
    max_packets: int,
    max_bytes: int,
    snaplen: int,
    key: str,
    interface: str,
    host_network: bool,
) -> None:
    request = agent_pb2.StartCaptureRequest(
        capture_id=capture_id,
        pod=agent_pb2.PodRef(namespace=namespace, name=name, ips=ips),
        filter=filter_expr,
        duration=duration,
        limits=common_pb2.CaptureLimits(max_packets=max_packets, max_bytes=max_bytes, snaplen=snaplen),
        object_key=key,
        pod_interface=interface,
        host_network=host_network,
    )
    before = agent.tcpdump_starts()
    known = _known(agent)
    code, details = call(agent.channel, SERVICE, "StartCapture", request.SerializeToString())
    assert_answer(code, details, FOR_BAD_INPUT | {Code.OK}, "StartCapture")
    if code == Code.OK:
        _finish_accepted(agent, request, known, before)
    else:
        _assert_nothing_left(agent, before)


def _known(agent: Agent) -> set[str]:
    return {c.capture_id for c in agent.node.stub.ListCaptures(agent_pb2.ListAgentCapturesRequest()).captures}


def _finish_accepted(
    agent: Agent, request: agent_pb2.StartCaptureRequest, known: set[str], starts_before: int
) -> None:
    """A request valid in every field captured: stop it, check its pcap is in the store, and clear it away. (The
    same id again is that earlier capture, and starts nothing.)"""
    if request.capture_id in known:
        assert agent.tcpdump_starts() == starts_before
        return
    assert agent.tcpdump_starts() == starts_before + 1
    ended = _stop_and_wait(agent, request.capture_id)
    assert ended.state == common_pb2.CAPTURE_STATE_COMPLETED, ended.error
    stored = agent.store / request.object_key
    assert stored.resolve().is_relative_to(agent.store.resolve()) and stored.is_file()
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == ended.sha256
    context = agent.store / context_key(request.object_key)  # the network context, stored beside the pcap
    assert ended.context.object_key == context_key(request.object_key) and context.is_file()
    stored.unlink()
    context.unlink()
    _assert_nothing_left(agent, starts_before + 1)


@LONG
@SETTINGS
@given(
    rpc=st.sampled_from(["GetCapture", "StopCapture", "WatchCapture", "StreamPcap"]), capture_id=capture_ids
)
def test_rpcs_by_capture_id(agent: Agent, rpc: str, capture_id: str) -> None:
    known = _known(agent)
    raw = agent_pb2.AgentCaptureRef(capture_id=capture_id).SerializeToString()
    code, details = call(agent.channel, SERVICE, rpc, raw)
    # A known capture whose pcap has left the spool (stored and summarised) can no longer be streamed live.
    ok = {Code.OK, Code.FAILED_PRECONDITION} if rpc == "StreamPcap" else {Code.OK}
    assert_answer(code, details, ok if capture_id in known else {Code.INVALID_ARGUMENT, Code.NOT_FOUND}, rpc)


@LONG
@SETTINGS
@given(ips=ip_lists, interface=interfaces, namespace=text, name=text)
def test_resolve_pod(agent: Agent, ips: list[str], interface: str, namespace: str, name: str) -> None:
    request = agent_pb2.ResolvePodRequest(
        pod=agent_pb2.PodRef(namespace=namespace, name=name, ips=ips), pod_interface=interface
    )
    code, details = call(agent.channel, SERVICE, "ResolvePod", request.SerializeToString())
    assert_answer(code, details, FOR_BAD_INPUT | {Code.OK}, "ResolvePod")


# A timeout the agent accepts, short (a host that happens to be a DNS name is asked of a nameserver that never
# answers in the lab), or one it refuses.
PROBE_TIMEOUT = Duration(nanos=50_000_000)
probe_timeouts = st.sampled_from(
    [
        PROBE_TIMEOUT,
        Duration(),
        Duration(seconds=11),
        Duration(seconds=-1),
        Duration(nanos=-1),
        Duration(seconds=2**62),
    ]
)
hosts = st.one_of(st.just("127.0.0.1"), st.just("localhost"), st.ip_addresses().map(str), text)
probe_addresses = st.builds(
    agent_pb2.ProbeAddress,
    step=st.one_of(st.just("service"), text),
    label=text,
    address=st.one_of(st.just("127.0.0.1"), text),
    port=st.one_of(st.just(9), int32),
)


@LONG
@SETTINGS
@given(
    ips=ip_lists,
    host=hosts,
    port=st.one_of(st.just(9), int32),
    also=st.lists(probe_addresses, max_size=6),
    timeout=probe_timeouts,
)
def test_probe(
    agent: Agent, ips: list[str], host: str, port: int, also: list[agent_pb2.ProbeAddress], timeout: Duration
) -> None:
    request = agent_pb2.ProbeRequest(
        pod=agent_pb2.PodRef(namespace="shop", name="server", ips=ips), host=host, port=port, also=also
    )
    if timeout != Duration():
        request.timeout.CopyFrom(timeout)
    before = agent.tcpdump_starts()
    code, details = call(agent.channel, SERVICE, "Probe", request.SerializeToString())
    assert_answer(code, details, FOR_BAD_INPUT | {Code.OK}, "Probe")
    _assert_nothing_left(agent, before)


def _templates(agent: Agent) -> dict[str, Message]:
    """One well-formed request per RPC, every string field set, to break one field at a time."""
    ref = agent_pb2.AgentCaptureRef(capture_id="fz-unknown")
    return {
        "StartCapture": agent.request(pod_interface="eth0"),
        "StopCapture": ref,
        "GetCapture": ref,
        "WatchCapture": ref,
        "StreamPcap": ref,
        "ListCaptures": agent_pb2.ListAgentCapturesRequest(),
        "ResolvePod": agent_pb2.ResolvePodRequest(
            pod=agent_pb2.PodRef(namespace="shop", name="server", ips=["10.251.2.10"]), pod_interface="eth0"
        ),
        "ListInterfaces": agent_pb2.ListInterfacesRequest(),
        # The pod's own loopback: every connect is answered at once (RST), whatever part of it survives.
        "Probe": agent_pb2.ProbeRequest(
            pod=agent_pb2.PodRef(namespace="shop", name="server", ips=[agent.pod_ip]),
            host="127.0.0.1",
            port=9,
            also=[agent_pb2.ProbeAddress(step="service", label="ClusterIP", address="127.0.0.1", port=9)],
            timeout=PROBE_TIMEOUT,
        ),
    }


CASES = [(rpc, path) for rpc in RPCS for path in string_fields(SERVICE.methods_by_name[rpc].input_type)]


def test_every_rpc_is_fuzzed(agent: Agent) -> None:
    assert set(_templates(agent)) == set(RPCS)
    assert {rpc for rpc, _ in CASES} == set(RPCS) - {"ListCaptures", "ListInterfaces"}  # they have no fields
    assert ("StartCapture", "pod.ips") in CASES


@LONG
@SETTINGS
@given(case=st.sampled_from(CASES), raw=non_utf8)
def test_a_string_that_is_not_utf8_names_its_field(agent: Agent, case: tuple[str, str], raw: bytes) -> None:
    rpc, path = case
    template = _templates(agent)[rpc]
    before = agent.tcpdump_starts()
    code, details = call(agent.channel, SERVICE, rpc, with_raw_string(template, path, raw))
    assert_answer(code, details, {Code.INVALID_ARGUMENT}, f"{rpc} with {path} not UTF-8")
    assert details == (
        f"the request is not a valid {template.DESCRIPTOR.full_name}: string field '{path}' is not UTF-8"
    )
    _assert_nothing_left(agent, before)


@LONG
@SETTINGS
@given(rpc=st.sampled_from(RPCS), data=st.data())
def test_garbage_and_truncated_requests(agent: Agent, rpc: str, data: st.DataObject) -> None:
    valid = _templates(agent)[rpc].SerializeToString()
    pieces = [st.binary(max_size=200)]
    if valid:
        pieces.append(st.integers(min_value=0, max_value=len(valid) - 1).map(lambda n: valid[:n]))
    pieces.append(
        st.tuples(st.integers(0, len(valid)), st.binary(min_size=1, max_size=8)).map(
            lambda cut: valid[: cut[0]] + cut[1] + valid[cut[0] :]
        )
    )
    raw = data.draw(st.one_of(pieces), label="raw")
    before = agent.tcpdump_starts()
    known = _known(agent)
    code, details = call(agent.channel, SERVICE, rpc, raw)
    assert_answer(code, details, FOR_BAD_INPUT | {Code.OK}, rpc)
    if rpc == "StartCapture" and code == Code.OK:  # bytes that happen to parse into a valid request
        _finish_accepted(agent, agent_pb2.StartCaptureRequest.FromString(raw), known, before)
    else:
        _assert_nothing_left(agent, before)


@pytest.mark.parametrize("rpc", RPCS)
def test_a_request_over_4_mib_is_resource_exhausted(agent: Agent, rpc: str) -> None:
    before = agent.tcpdump_starts()
    raw = oversized(_templates(agent)[rpc].SerializeToString())
    code, details = call(agent.channel, SERVICE, rpc, raw)
    assert_answer(code, details, {Code.RESOURCE_EXHAUSTED}, f"{rpc} of {len(raw)} bytes")
    _assert_nothing_left(agent, before)


def test_a_filter_slow_to_compile_does_not_stall_other_calls(agent: Agent) -> None:
    """libpcap's optimiser takes seconds on some 4 KiB filters: the agent compiles in a worker thread, so its
    other calls (health, a controller's watch) go on meanwhile. tcpdump compiles the filter again before it
    listens, and on a loaded machine both compiles take long: the agent waits for a tcpdump that is still working
    (capture-agent/_tcpdump.py), so the deadline here is generous."""
    request, before = agent.request("fz-slow", filter=SLOW_FILTER), agent.tcpdump_starts()
    start = agent.node.stub.StartCapture.future(request, timeout=240)
    assert_serving_while(start, agent.channel)
    assert start.result().state == common_pb2.CAPTURE_STATE_RUNNING  # the filter is valid, just slow
    _finish_accepted(agent, request, set(), before)


def test_the_agent_still_captures_after_the_fuzzing(agent: Agent) -> None:
    assert agent.node.process is not None and agent.node.process.poll() is None
    wait_healthy(agent.node.address, timeout=5)
    before = agent.tcpdump_starts()
    started = agent.node.stub.StartCapture(agent.request(capture_id="fz-last"), timeout=15)
    assert started.state == common_pb2.CAPTURE_STATE_RUNNING
    assert agent.tcpdump_starts() == before + 1
    ended = _stop_and_wait(agent, "fz-last")
    assert ended.state == common_pb2.CAPTURE_STATE_COMPLETED, ended.error
    assert (agent.store / "fuzz" / "fz-last.pcap").is_file()
    log = agent.node.log()
    assert "Traceback" not in log and "unexpected error" not in log, log[-4000:]
    assert not _escapes(agent)
    assert stat.S_ISDIR(agent.spool.stat().st_mode) and not list(agent.spool.iterdir())
