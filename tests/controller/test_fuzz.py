"""Hostile and broken requests to every CaptureService RPC, generated: each is answered with a documented status and
a short message a person can read (never UNKNOWN or INTERNAL), nothing is stored for it, and the controller keeps
serving.

Every field of every request is fuzzed, through the client library and as raw bytes: strings that are not UTF-8
(which protobuf's parser refuses before any podcap code runs), truncated and garbage messages, Durations and
Timestamps outside their types' ranges, messages over the 4 MiB limit.

No tcpdump can start here: the inventory's one agent address has no listener (checked below), so the worst a
request can do is store a capture whose dispatch fails UNAVAILABLE, which is what a request valid in every field
does. The budget per test is PODCAP_FUZZ_EXAMPLES (default 300); raise it locally to search harder.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from podcap.api.v1 import capture_pb2, capture_pb2_grpc, common_pb2
from tests.support.fuzz import (
    EXAMPLES,
    SLOW_FILTER,
    assert_answer,
    assert_serving_while,
    call,
    message_class,
    non_utf8,
    oversized,
    string_fields,
    with_raw_string,
)
from tests.support.processes import ControllerProcess, free_port, wait_healthy

SERVICE = capture_pb2.DESCRIPTOR.services_by_name["CaptureService"]
RPCS = [method.name for method in SERVICE.methods]
BY_ID = [
    "GetCapture",
    "WatchCapture",
    "StopCapture",
    "GetDownloadUrl",
    "DownloadCapture",
    "StreamPackets",
    "DeleteCapture",
]
Code = grpc.StatusCode
# What CaptureService may answer to input it cannot act on (DESIGN.md, "API contract").
FOR_BAD_INPUT = frozenset(
    {Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.FAILED_PRECONDITION, Code.RESOURCE_EXHAUSTED}
)
# A request valid in every field is stored, then its dispatch to the absent agent fails; the same request_id and
# body again is a retry, answered with that stored capture.
CREATE_ANSWERS = FOR_BAD_INPUT | {Code.UNAVAILABLE, Code.OK}
_CAPTURE_ID = re.compile(r"[0-9a-f]{32}")
_CAPTURE_ID_PREFIX = re.compile(r"[0-9a-f]{4,31}")
SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
# Long local runs (PODCAP_FUZZ_EXAMPLES=3000) need more than the default per-test timeout.
LONG = pytest.mark.timeout(max(120, EXAMPLES // 4))

HOSTILE = [
    "-z /tmp/evil.sh",
    "tcp port 80 -w /etc/passwd",
    "$(reboot)",
    "`id`",
    "port 80; rm -rf /",
    "port 80\nport 81",
    "port 80\x00",
    "tcp[",
    "port 99999",
    "é",
    "\u202e\u2028",
    "../../etc/passwd",
    "/etc/passwd",
    "x" * 65536,
]
text = st.one_of(st.sampled_from(HOSTILE), st.text(max_size=300))
names = st.one_of(st.just("shop"), st.just("web-1"), text)
int32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)
int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
# Durations and Timestamps sensible, or anywhere in their wire range, valid or not (seconds int64, nanos int32).
durations = st.one_of(
    st.builds(Duration, seconds=st.integers(1, 3600)), st.builds(Duration, seconds=int64, nanos=int32)
)
timestamps = st.one_of(
    st.none(),
    st.builds(Timestamp, seconds=st.integers(0, 2**32)),
    st.builds(Timestamp, seconds=int64, nanos=int32),
)


@dataclass
class Api:
    process: ControllerProcess
    channel: grpc.Channel
    stub: capture_pb2_grpc.CaptureServiceStub
    engine: sa.Engine
    store: Path
    stored_id: str  # a real capture: FAILED, one target, no pcap

    def captures(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.text("SELECT count(*) FROM captures")).scalar_one())


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    tmp = tmp_path_factory.mktemp("fuzz")
    agent_port = free_port()
    inventory = tmp / "inventory.yaml"
    inventory.write_text(
        "pods:\n  - {namespace: shop, name: web-1, node: node-1, ips: [10.1.0.5]}\n"
        f"agents:\n  node-1: 127.0.0.1:{agent_port}\n"
    )
    db = f"sqlite:///{tmp / 'podcap.db'}"
    store = tmp / "store"
    args = ["--no-auth", "--db", db, "--store", f"file://{store}", "--inventory", str(inventory)]
    args += ["--max-duration", "1h"]
    process = ControllerProcess(args, tmp)
    process.start()
    engine = sa.create_engine(db)
    channel = grpc.insecure_channel(process.address)
    try:
        with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", agent_port)):
            pass  # no agent, so no tcpdump, whatever a request gets through
        stub = capture_pb2_grpc.CaptureServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.CreateCapture(_valid_create(), timeout=30)
        assert refused.value.code() == Code.UNAVAILABLE, refused.value.details()
        (stored,) = stub.ListCaptures(capture_pb2.ListCapturesRequest(), timeout=30).captures
        assert stored.state == common_pb2.CAPTURE_STATE_FAILED and len(stored.targets) == 1
        yield Api(process, channel, stub, engine, store, stored.id)
    finally:
        channel.close()
        engine.dispose()
        process.stop()


def _valid_create() -> capture_pb2.CreateCaptureRequest:
    return capture_pb2.CreateCaptureRequest(
        namespace="shop", pod="web-1", filter="tcp port 80", duration=Duration(seconds=10)
    )


def _templates() -> dict[str, Message]:
    """One well-formed request per RPC, every string field set, to break one field at a time."""
    return {
        "CreateCapture": capture_pb2.CreateCaptureRequest(
            namespace="shop",
            pod="web-1",
            filter="tcp port 80",
            duration=Duration(seconds=10),
            request_id="r-1",
            reason="ticket 1",
            pod_interface="eth0",
        ),
        "ListCaptures": capture_pb2.ListCapturesRequest(
            namespace="shop", pod="web-1", page_token="abc", requester="anonymous"
        ),
        "ListPods": capture_pb2.ListPodsRequest(namespace="shop"),
        "Diagnose": capture_pb2.DiagnoseRequest(
            namespace="shop",
            pod="web-1",
            host="checkout",
            port=80,
            capture_duration=Duration(seconds=5),
            reason="ticket 1",
        ),
        **{name: message_class(SERVICE.methods_by_name[name].input_type)(id="0" * 32) for name in BY_ID},
    }


@LONG
@SETTINGS
@given(
    namespace=names,
    pod=names,
    selector=st.one_of(st.just(""), st.just("app=web"), text),
    filter_expr=st.one_of(st.just("tcp port 80"), text),
    duration=durations,
    max_packets=st.one_of(st.just(0), int64),
    max_bytes=st.one_of(st.just(0), int64),
    snaplen=st.one_of(st.just(0), int32),
    request_id=st.one_of(st.just(""), text),
    reason=st.one_of(st.just(""), text),
    interface=st.one_of(st.just(""), st.just("eth0"), text),
    host_network=st.booleans(),
)
def test_create_capture(
    api: Api,
    namespace: str,
    pod: str,
    selector: str,
    filter_expr: str,
    duration: Duration,
    max_packets: int,
    max_bytes: int,
    snaplen: int,
    request_id: str,
    reason: str,
    interface: str,
    host_network: bool,
) -> None:
    request = capture_pb2.CreateCaptureRequest(
        namespace=namespace,
        pod=pod,
        label_selector=selector,
        filter=filter_expr,
        duration=duration,
        limits=common_pb2.CaptureLimits(max_packets=max_packets, max_bytes=max_bytes, snaplen=snaplen),
        request_id=request_id,
        reason=reason,
        pod_interface=interface,
        host_network=host_network,
    )
    before = api.captures()
    code, details = call(api.channel, SERVICE, "CreateCapture", request.SerializeToString())
    assert_answer(code, details, CREATE_ANSWERS, "CreateCapture")
    if code != Code.UNAVAILABLE:
        assert api.captures() == before, f"{code.name} left a row behind"


@LONG
@SETTINGS
@given(
    namespace=st.one_of(st.just(""), names),
    pod=st.one_of(st.just(""), names),
    state=st.one_of(st.integers(0, 6), int32),
    page_size=st.one_of(st.integers(0, 600), int32),
    page_token=st.one_of(st.just(""), text, st.binary(max_size=64).map(lambda b: b.hex())),
    requester=st.one_of(st.just(""), st.just("anonymous"), text),
    created_after=timestamps,
    created_before=timestamps,
)
def test_list_captures(
    api: Api,
    namespace: str,
    pod: str,
    state: int,
    page_size: int,
    page_token: str,
    requester: str,
    created_after: Timestamp | None,
    created_before: Timestamp | None,
) -> None:
    request = capture_pb2.ListCapturesRequest(
        namespace=namespace,
        pod=pod,
        state=state,
        page_size=page_size,
        page_token=page_token,
        requester=requester,
        created_after=created_after,
        created_before=created_before,
    )
    code, details = call(api.channel, SERVICE, "ListCaptures", request.SerializeToString())
    assert_answer(code, details, {Code.OK, Code.INVALID_ARGUMENT}, "ListCaptures")


@LONG
@SETTINGS
@given(
    namespace=names,
    pod=names,
    host=st.one_of(
        st.just("checkout"), st.just("10.1.0.9"), st.just("checkout.shop.svc.cluster.local"), text
    ),
    port=st.one_of(st.just(80), int32),
    duration=st.one_of(st.none(), durations),
    reason=st.one_of(st.just(""), text),
)
def test_diagnose(
    api: Api, namespace: str, pod: str, host: str, port: int, duration: Duration | None, reason: str
) -> None:
    request = capture_pb2.DiagnoseRequest(
        namespace=namespace, pod=pod, host=host, port=port, capture_duration=duration, reason=reason
    )
    before = api.captures()
    code, details = call(api.channel, SERVICE, "Diagnose", request.SerializeToString())
    # A request valid in every field starts its capture, whose dispatch to the absent agent fails.
    assert_answer(code, details, FOR_BAD_INPUT | {Code.UNAVAILABLE}, "Diagnose")
    if code != Code.UNAVAILABLE:
        assert api.captures() == before


def _expected_by_id(api: Api, rpc: str, capture_id: str, target: int) -> set[grpc.StatusCode]:
    if _CAPTURE_ID_PREFIX.fullmatch(capture_id):  # a unique prefix stands for the whole id, as with git
        capture_id = api.stored_id if api.stored_id.startswith(capture_id) else capture_id
    elif not _CAPTURE_ID.fullmatch(capture_id):
        return {Code.INVALID_ARGUMENT}
    if capture_id != api.stored_id:
        return {Code.NOT_FOUND}
    # The stored capture is FAILED with one target and no pcap.
    if rpc in ("GetCapture", "WatchCapture"):
        return {Code.OK}
    if rpc == "StopCapture":
        return {Code.FAILED_PRECONDITION}
    return {Code.FAILED_PRECONDITION} if target == 0 else {Code.INVALID_ARGUMENT}


@LONG
@pytest.mark.parametrize("rpc", BY_ID)
@SETTINGS
@given(data=st.data(), target=st.one_of(st.just(0), int32))
def test_rpcs_by_capture_id(api: Api, rpc: str, data: st.DataObject, target: int) -> None:
    ids = [text, st.text("0123456789abcdef", min_size=32, max_size=32), st.text("0123456789abcdefABCDEF-")]
    if rpc != "DeleteCapture":  # deleting the one stored capture would leave the other RPCs nothing to find
        ids.append(st.just(api.stored_id))
    capture_id = data.draw(st.one_of(ids), label="id")
    request = message_class(SERVICE.methods_by_name[rpc].input_type)(id=capture_id)
    if "target" in request.DESCRIPTOR.fields_by_name:
        request.target = target  # type: ignore[attr-defined]
    before = api.captures()
    code, details = call(api.channel, SERVICE, rpc, request.SerializeToString())
    assert_answer(code, details, _expected_by_id(api, rpc, capture_id, target), rpc)
    assert api.captures() == before


CASES = [(rpc, path) for rpc in RPCS for path in string_fields(SERVICE.methods_by_name[rpc].input_type)]


def test_every_rpc_is_fuzzed() -> None:
    assert (
        set(_templates())
        == set(RPCS)
        == {rpc for rpc, _ in CASES}
        == {"CreateCapture", "ListCaptures", "ListPods", "Diagnose", *BY_ID}
    )


@LONG
@SETTINGS
@given(case=st.sampled_from(CASES), raw=non_utf8)
def test_a_string_that_is_not_utf8_names_its_field(api: Api, case: tuple[str, str], raw: bytes) -> None:
    rpc, path = case
    template = _templates()[rpc]
    before = api.captures()
    code, details = call(api.channel, SERVICE, rpc, with_raw_string(template, path, raw))
    assert_answer(code, details, {Code.INVALID_ARGUMENT}, f"{rpc} with {path} not UTF-8")
    assert details == (
        f"the request is not a valid {template.DESCRIPTOR.full_name}: string field '{path}' is not UTF-8"
    )
    assert api.captures() == before


@LONG
@SETTINGS
@given(rpc=st.sampled_from(RPCS), data=st.data())
def test_garbage_and_truncated_requests(api: Api, rpc: str, data: st.DataObject) -> None:
    valid = _templates()[rpc].SerializeToString()
    raw = data.draw(
        st.one_of(
            st.binary(max_size=200),
            st.integers(min_value=0, max_value=len(valid) - 1).map(lambda n: valid[:n]),
            st.tuples(st.integers(0, len(valid)), st.binary(min_size=1, max_size=8)).map(
                lambda cut: valid[: cut[0]] + cut[1] + valid[cut[0] :]
            ),
        ),
        label="raw",
    )
    before = api.captures()
    code, details = call(api.channel, SERVICE, rpc, raw)
    # Bytes that happen to parse are an ordinary request, answered as such.
    allowed = CREATE_ANSWERS if rpc in ("CreateCapture", "Diagnose") else FOR_BAD_INPUT | {Code.OK}
    assert_answer(code, details, allowed, rpc)
    if code != Code.UNAVAILABLE:
        assert api.captures() == before


@pytest.mark.parametrize("rpc", RPCS)
def test_a_request_over_4_mib_is_resource_exhausted(api: Api, rpc: str) -> None:
    raw = oversized(_templates()[rpc].SerializeToString())
    before = api.captures()
    code, details = call(api.channel, SERVICE, rpc, raw)
    assert_answer(code, details, {Code.RESOURCE_EXHAUSTED}, f"{rpc} of {len(raw)} bytes")
    assert api.captures() == before


def test_a_filter_slow_to_compile_does_not_stall_other_calls(api: Api) -> None:
    request = capture_pb2.CreateCaptureRequest(
        namespace="shop",
        pod="web-1",
        filter=SLOW_FILTER,
        duration=Duration(seconds=5),
        request_id="slow-filter",
    )
    assert_serving_while(api.stub.CreateCapture.future(request, timeout=60), api.channel)


def test_the_controller_still_serves_after_the_fuzzing(api: Api) -> None:
    assert api.process.process is not None and api.process.process.poll() is None
    wait_healthy(api.process.address, timeout=5)
    assert (
        api.stub.GetCapture(capture_pb2.GetCaptureRequest(id=api.stored_id), timeout=10).id == api.stored_id
    )
    listed = api.stub.ListCaptures(capture_pb2.ListCapturesRequest(page_size=500), timeout=10).captures
    assert api.stored_id in {capture.id for capture in listed}
    assert not [p for p in api.store.rglob("*") if p.is_file()], "no pcap was stored for anything"
    log = api.process.log()
    assert "Traceback" not in log and "unexpected error" not in log, log[-4000:]
