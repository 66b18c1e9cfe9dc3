"""Both ends of a conversation at once: `podcap capture --between` captures a client pod and every ready endpoint
of a Service in another namespace, on whatever nodes they run, with one filter; `--download` gives one pcapng
merged by time whose interfaces name `namespace/pod@node`, and each end's pcap stays downloadable. Ends that do
not exist or cannot be captured get their documented codes, and a caller must be allowed in every namespace the
capture covers, to create it and to read it.

The lab: `shop/client` on node-1, `shop/server` on node-2, and Service `payments/api` with endpoints `api-1`
(node-2) and `api-2` (node-1); `payments/empty` has no ready endpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from podcap.api.v1 import capture_pb2, capture_pb2_grpc, common_pb2
from podcap.storage import AuditLog, AuditRow, create_engine_for, make_sessionmaker
from tests.e2e.conftest import Stack
from tests.support.lab import Lab, build_lab, require_netns
from tests.support.processes import PODCAP

pytestmark = pytest.mark.netns

PORT = 8080
# carol administers every namespace; dave supports shop only.
TOKENS = {"carol": "carol-" + "c" * 40, "dave": "dave-" + "d" * 40}


@pytest.fixture
def lab() -> Iterator[Lab]:
    """The default lab (shop/client on node-1, shop/server on node-2) and the api pods of namespace payments."""
    require_netns()
    with build_lab() as built:
        built.add_pod("node-2", "payments", "api-1", "10.251.2.20")
        built.add_pod("node-1", "payments", "api-2", "10.251.1.20")
        yield built


@pytest.fixture
def services() -> list[dict[str, Any]]:
    ports = [{"name": "http", "port": 80, "targetPort": PORT, "protocol": "TCP"}]
    return [
        {
            "namespace": "payments",
            "name": "api",
            "clusterIP": "10.96.0.20",
            "ports": ports,
            "endpoints": ["api-1", "api-2"],
        },
        {
            "namespace": "payments",
            "name": "empty",
            "clusterIP": "10.96.0.21",
            "ports": ports,
            "endpoints": [],
        },
    ]


@pytest.fixture
def controller_flags(tmp_path: Path) -> list[str]:
    document = {
        "roles": {"support": ["capture", "read", "download", "stop"], "admin": ["*"]},
        "users": [
            {
                "name": "carol",
                "token_sha256": hashlib.sha256(TOKENS["carol"].encode()).hexdigest(),
                "grants": [{"role": "admin", "namespaces": ["*"]}],
            },
            {
                "name": "dave",
                "token_sha256": hashlib.sha256(TOKENS["dave"].encode()).hexdigest(),
                "grants": [{"role": "support", "namespaces": ["shop"]}],
            },
        ],
    }
    path = tmp_path / "tokens.yaml"
    path.write_text(yaml.safe_dump(document))
    return ["--auth-tokens", str(path)]


def _cli(stack: Stack, *args: str, user: str = "carol") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PODCAP, *args],
        env={**os.environ, "PODCAP_SERVER": stack.server, "PODCAP_TOKEN": TOKENS[user]},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _tshark(path: Path, *fields: str) -> list[list[str]]:
    argv = ["tshark", "-r", str(path), "-T", "fields", "-E", "separator=|"]
    for field in fields:
        argv += ["-e", field]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60).stdout
    return [line.split("|") for line in out.splitlines()]


class _Traffic:
    """The client calls both api pods, over and over, until stopped."""

    def __init__(self, lab: Lab) -> None:
        self._lab = lab
        self._stop = threading.Event()
        self.answered: dict[str, int] = {"api-1": 0, "api-2": 0}
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        client = self._lab.pods["client"]
        while not self._stop.is_set():
            for name in self.answered:
                url = f"http://{self._lab.pods[name].ip}:{PORT}/to-{name}"
                if self._lab.http_get(client.netns, url, timeout=2) == 404:
                    self.answered[name] += 1
            self._stop.wait(0.1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def test_both_ends_are_captured_and_merged_with_named_interfaces(stack: Stack, tmp_path: Path) -> None:
    lab = stack.lab
    client, api1, api2 = lab.pods["client"], lab.pods["api-1"], lab.pods["api-2"]
    for pod in (api1, api2):
        lab.http_server(pod.netns, PORT)
    merged = tmp_path / "both.pcapng"
    traffic = _Traffic(lab)
    try:
        done = _cli(
            stack,
            "capture",
            "--between",
            "shop/client",
            "payments/svc/api",
            "--filter",
            f"tcp port {PORT}",
            "--duration",
            "2s",
            "--download",
            str(merged),
            "-o",
            "json",
        )
    finally:
        traffic.stop()
    assert done.returncode == 0, done.stderr
    assert min(traffic.answered.values()) > 0, traffic.answered
    capture = json.loads(done.stdout)
    assert capture["state"] == "COMPLETED", capture["error"]
    assert capture["between"] == ["shop/client", "payments/svc/api"]
    targets = {f"{t['namespace']}/{t['pod']}@{t['node']}": t for t in capture["targets"]}
    client_if, api1_if, api2_if = (f"{p.namespace}/{p.name}@{p.node}" for p in (client, api1, api2))
    assert sorted(targets) == sorted([client_if, api1_if, api2_if])
    assert {t["state"] for t in targets.values()} == {"COMPLETED"}
    assert client.node != api1.node  # one conversation crosses the nodes, the other stays on node-1

    rows = _tshark(merged, "frame.interface_name", "frame.time_epoch", "ip.dst", "tcp.payload")
    assert len(rows) == capture["packets"]
    times = [float(row[1]) for row in rows]
    assert times == sorted(times)
    assert {row[0] for row in rows} == {client_if, api1_if, api2_if}
    # Every request leaves the client and reaches its api pod: it is seen at both ends, on each one's interface.
    requests = {
        (interface, dst)
        for interface, _, dst, payload in rows
        if payload and bytes.fromhex(payload.replace(":", "")).startswith(b"GET ")
    }
    assert requests == {(client_if, api1.ip), (client_if, api2.ip), (api1_if, api1.ip), (api2_if, api2.ip)}

    for index, target in enumerate(capture["targets"]):
        one = tmp_path / f"target-{index}.pcap"
        saved = _cli(stack, "download", capture["id"], "--target", str(index), "-f", str(one))
        assert saved.returncode == 0, saved.stderr
        assert len(_tshark(one, "frame.number")) == target["packets"] > 0

    shown = _cli(stack, "get", capture["id"])
    assert "between: shop/client and payments/svc/api" in shown.stdout


def _as(user: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {TOKENS[user]}"),)


def _request(*ends: str, request_id: str = "") -> capture_pb2.CreateCaptureRequest:
    """Ends as NS/POD or NS/svc/NAME."""
    request = capture_pb2.CreateCaptureRequest(filter=f"tcp port {PORT}", request_id=request_id)
    request.duration.FromSeconds(1)
    for end in ends:
        namespace, _, name = end.partition("/")
        service = name.removeprefix("svc/") if name.startswith("svc/") else ""
        request.between.append(
            capture_pb2.CaptureEnd(namespace=namespace, pod="" if service else name, service=service)
        )
    return request


def _code(api: capture_pb2_grpc.CaptureServiceStub, request: Any, user: str = "carol") -> tuple[Any, str]:
    with pytest.raises(grpc.RpcError) as caught:
        api.CreateCapture(request, metadata=_as(user), timeout=30)
    error: Any = caught.value
    return error.code(), error.details()


def _audit(stack: Stack) -> list[AuditRow]:
    engine = create_engine_for(stack.db_url)
    try:
        with make_sessionmaker(engine).begin() as session:
            return AuditLog(session).entries()
    finally:
        engine.dispose()


def _wait_terminal(api: capture_pb2_grpc.CaptureServiceStub, capture_id: str) -> capture_pb2.Capture:
    for capture in api.WatchCapture(
        capture_pb2.WatchCaptureRequest(id=capture_id), metadata=_as("carol"), timeout=60
    ):
        last = capture
    return last


def test_bad_ends_and_callers_outside_a_namespace_are_refused(stack: Stack) -> None:
    codes = grpc.StatusCode
    with grpc.insecure_channel(stack.server) as channel:
        api = capture_pb2_grpc.CaptureServiceStub(channel)
        refused = [
            (_request("shop/client"), codes.INVALID_ARGUMENT, "at least two ends"),
            (_request("shop/client", "shop/client"), codes.INVALID_ARGUMENT, "the same end given twice"),
            (_request("shop/client", "Payments/api-1"), codes.INVALID_ARGUMENT, "not a valid DNS-1123 label"),
            (_request("shop/client", "payments/ghost"), codes.NOT_FOUND, "pod payments/ghost not found"),
            (
                _request("shop/client", "payments/svc/nope"),
                codes.NOT_FOUND,
                "service payments/nope not found",
            ),
            (_request("shop/client", "payments/svc/empty"), codes.FAILED_PRECONDITION, "no ready endpoint"),
            (_request("shop/api-1", "shop/client"), codes.NOT_FOUND, "pod shop/api-1 not found"),
        ]
        both = _request("shop/client", "payments/api-1")
        both.between[1].service = "api"
        refused.append((both, codes.INVALID_ARGUMENT, "exactly one of pod and service"))
        for request, code, message in refused:
            got, details = _code(api, request)
            assert (got, message in details) == (code, True), (request.between, details)

        # dave may capture in shop only: an end in payments is refused, and the denial is audited naming it.
        got, details = _code(api, _request("shop/client", "payments/api-1"), user="dave")
        assert got == codes.PERMISSION_DENIED and "'payments'" in details
        last = _audit(stack)[-1]
        assert (last.actor, last.action, last.result, last.namespace) == (
            "dave",
            "capture",
            "denied",
            "payments",
        )
        assert "between shop/client and payments/api-1" in last.detail
        listed = api.ListCaptures(capture_pb2.ListCapturesRequest(), metadata=_as("carol"), timeout=30)
        assert list(listed.captures) == []  # nothing refused was created

        # A capture across shop and payments is carol's to read, not dave's, though its first end is in shop.
        across = api.CreateCapture(
            _request("shop/client", "payments/svc/api", request_id="r1"), metadata=_as("carol"), timeout=30
        )
        allowed = [(a.namespace, a.capture_id) for a in _audit(stack) if a.result == "allowed"]
        assert allowed[-2:] == [("shop", across.id), ("payments", across.id)]  # each namespace's trail has it
        assert [(e.namespace, e.pod, e.service) for e in across.between] == [
            ("shop", "client", ""),
            ("payments", "", "api"),
        ]
        assert sorted(t.pod for t in across.targets) == ["api-1", "api-2", "client"]
        again = api.CreateCapture(
            _request("shop/client", "payments/svc/api", request_id="r1"), metadata=_as("carol"), timeout=30
        )
        assert again.id == across.id
        got, details = _code(api, _request("shop/client", "payments/api-1", request_id="r1"))
        assert got == codes.INVALID_ARGUMENT and "already used for a different capture" in details
        with pytest.raises(grpc.RpcError) as caught:
            api.GetCapture(capture_pb2.GetCaptureRequest(id=across.id), metadata=_as("dave"), timeout=30)
        error: Any = caught.value
        assert error.code() == codes.PERMISSION_DENIED and "'payments'" in error.details()

        # Within shop dave may: both ends there, on two nodes.
        mine = api.CreateCapture(_request("shop/client", "shop/server"), metadata=_as("dave"), timeout=30)
        seen = api.ListCaptures(
            capture_pb2.ListCapturesRequest(namespace="shop"), metadata=_as("dave"), timeout=30
        )
        assert [c.id for c in seen.captures] == [mine.id]
        for capture_id in (across.id, mine.id):
            assert _wait_terminal(api, capture_id).state == common_pb2.CAPTURE_STATE_COMPLETED
