"""Who may do what, end to end: bearer tokens, grants per namespace and action, and the audit trail.

A controller with a token file, in front of real agents in lab namespaces: a caller without a valid token gets
UNAUTHENTICATED on every RPC; a caller allowed elsewhere gets PERMISSION_DENIED and nothing is created or
captured; every capture, stop, delete, download and download-URL decision is in the audit trail, allowed or
denied, written before the action; and when the audit trail cannot be written, nothing happens.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
import yaml

from podcap.api.v1 import agent_pb2, agent_pb2_grpc, capture_pb2, capture_pb2_grpc, common_pb2
from podcap.storage import AuditLog, AuditRow, create_engine_for, make_sessionmaker
from tests.e2e.conftest import Stack
from tests.support.processes import PODCAP

pytestmark = pytest.mark.netns

PORT = 8080
TOKENS = {"alice": "alice-" + "a" * 40, "bob": "bob-" + "b" * 40, "carol": "carol-" + "c" * 40}


def _sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    """alice supports shop (no delete), bob may only read payments, carol administers everything."""
    document = {
        "roles": {"support": ["capture", "read", "download", "stop"], "viewer": ["read"], "admin": ["*"]},
        "users": [
            {
                "name": "alice",
                "token_sha256": _sha256(TOKENS["alice"]),
                "grants": [{"role": "support", "namespaces": ["shop"]}],
            },
            {
                "name": "bob",
                "token_sha256": _sha256(TOKENS["bob"]),
                "grants": [{"role": "viewer", "namespaces": ["payments"]}],
            },
            {
                "name": "carol",
                "token_sha256": _sha256(TOKENS["carol"]),
                "grants": [{"role": "admin", "namespaces": ["*"]}],
            },
        ],
    }
    path = tmp_path / "tokens.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.fixture
def controller_flags(token_file: Path) -> list[str]:
    return [
        "--auth-tokens",
        str(token_file),
        "--max-active-captures-per-user",
        "2",
        "--max-bytes-per-namespace-per-day",
        str(10 << 20),
    ]


@pytest.fixture
def api(stack: Stack) -> Iterator[capture_pb2_grpc.CaptureServiceStub]:
    with grpc.insecure_channel(stack.server) as channel:
        yield capture_pb2_grpc.CaptureServiceStub(channel)


def _as(user: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {TOKENS[user]}"),)


def _code(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        result = call()
        if hasattr(result, "__iter__") and not hasattr(result, "ByteSize"):
            list(result)  # a stream fails when read
    error: Any = caught.value
    return error.code(), error.details()


def _audit(stack: Stack) -> list[AuditRow]:
    engine = create_engine_for(stack.db_url)
    try:
        with make_sessionmaker(engine).begin() as session:
            return AuditLog(session).entries()
    finally:
        engine.dispose()


def _agent_captures(stack: Stack) -> list[str]:
    ids = []
    for address in stack.agents.values():
        with grpc.insecure_channel(address) as channel:
            listed = agent_pb2_grpc.AgentServiceStub(channel).ListCaptures(
                agent_pb2.ListAgentCapturesRequest(), timeout=10
            )
            ids += [c.capture_id for c in listed.captures]
    return ids


def _create(
    pod: str = "server", namespace: str = "shop", seconds: int = 2
) -> capture_pb2.CreateCaptureRequest:
    request = capture_pb2.CreateCaptureRequest(namespace=namespace, pod=pod, filter=f"tcp port {PORT}")
    request.duration.FromSeconds(seconds)
    return request


def _wait_terminal(
    api: capture_pb2_grpc.CaptureServiceStub, capture_id: str, user: str
) -> capture_pb2.Capture:
    for capture in api.WatchCapture(
        capture_pb2.WatchCaptureRequest(id=capture_id), metadata=_as(user), timeout=60
    ):
        last = capture
    return last


def test_every_rpc_refuses_a_caller_without_a_valid_token(
    stack: Stack, api: capture_pb2_grpc.CaptureServiceStub
) -> None:
    some_id = "0" * 32
    calls: dict[str, Callable[[Any], Any]] = {
        "CreateCapture": lambda md: api.CreateCapture(_create(), metadata=md, timeout=10),
        "GetCapture": lambda md: api.GetCapture(
            capture_pb2.GetCaptureRequest(id=some_id), metadata=md, timeout=10
        ),
        "ListCaptures": lambda md: api.ListCaptures(
            capture_pb2.ListCapturesRequest(), metadata=md, timeout=10
        ),
        "WatchCapture": lambda md: api.WatchCapture(
            capture_pb2.WatchCaptureRequest(id=some_id), metadata=md, timeout=10
        ),
        "StopCapture": lambda md: api.StopCapture(
            capture_pb2.StopCaptureRequest(id=some_id), metadata=md, timeout=10
        ),
        "GetDownloadUrl": lambda md: api.GetDownloadUrl(
            capture_pb2.GetDownloadUrlRequest(id=some_id), metadata=md, timeout=10
        ),
        "DownloadCapture": lambda md: api.DownloadCapture(
            capture_pb2.DownloadCaptureRequest(id=some_id), metadata=md, timeout=10
        ),
        "DeleteCapture": lambda md: api.DeleteCapture(
            capture_pb2.DeleteCaptureRequest(id=some_id), metadata=md, timeout=10
        ),
    }
    credentials = {
        "none": (),
        "an unknown token": (("authorization", "Bearer not-a-token-anyone-has"),),
        "a malformed header": (("authorization", "Basic YWxpY2U6c2VjcmV0"),),
    }
    for name, call in calls.items():
        for what, metadata in credentials.items():
            code, details = _code(lambda call=call, metadata=metadata: call(metadata))
            assert code == grpc.StatusCode.UNAUTHENTICATED, (name, what, details)
            assert details, (name, what)
    assert _agent_captures(stack) == []
    # The refused attempts at audited actions are in the trail, with who tried from where.
    entries = _audit(stack)
    assert {(e.action, e.result) for e in entries} == {
        (action, "unauthenticated") for action in ("capture", "stop", "download-url", "download", "delete")
    }
    assert all(e.actor == "-" and e.peer.startswith("ipv4:127.0.0.1:") for e in entries)


def test_grants_decide_per_namespace_and_action_and_every_decision_is_audited(
    stack: Stack, api: capture_pb2_grpc.CaptureServiceStub, tmp_path: Path
) -> None:
    lab = stack.lab
    lab.http_server(lab.pods["server"].netns, PORT)

    # bob may only read payments: his capture in shop is refused and leaves nothing behind.
    code, details = _code(lambda: api.CreateCapture(_create(), metadata=_as("bob"), timeout=10))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert details == "bob may not capture captures in namespace 'shop'"
    assert (
        api.ListCaptures(capture_pb2.ListCapturesRequest(), metadata=_as("carol"), timeout=10).captures == []
    )
    assert _agent_captures(stack) == []

    # alice captures in shop, through the CLI as a user would (token from the environment).
    started = subprocess.run(
        [
            PODCAP,
            "capture",
            "shop/server",
            "--filter",
            f"tcp port {PORT}",
            "--duration",
            "2s",
            "--reason",
            "INC-7",
        ],
        env={**os.environ, "PODCAP_SERVER": stack.server, "PODCAP_TOKEN": TOKENS["alice"]},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert started.returncode == 0, started.stderr
    listed = api.ListCaptures(capture_pb2.ListCapturesRequest(), metadata=_as("alice"), timeout=10).captures
    assert [c.requester for c in listed] == ["alice"]
    capture_id = listed[0].id
    for _ in range(3):
        lab.http_get(lab.pods["client"].netns, f"http://{lab.pods['server'].ip}:{PORT}/x", timeout=5)
    done = _wait_terminal(api, capture_id, "alice")
    assert done.state == common_pb2.CAPTURE_STATE_COMPLETED, done.error

    # bob can neither see it nor get at its pcap; alice downloads it; she may not delete it, carol may.
    get = capture_pb2.GetCaptureRequest(id=capture_id)
    assert (
        _code(lambda: api.GetCapture(get, metadata=_as("bob"), timeout=10))[0]
        == grpc.StatusCode.PERMISSION_DENIED
    )
    assert api.ListCaptures(capture_pb2.ListCapturesRequest(), metadata=_as("bob"), timeout=10).captures == []
    url = capture_pb2.GetDownloadUrlRequest(id=capture_id)
    assert (
        _code(lambda: api.GetDownloadUrl(url, metadata=_as("bob"), timeout=10))[0]
        == grpc.StatusCode.PERMISSION_DENIED
    )
    download = capture_pb2.DownloadCaptureRequest(id=capture_id)
    assert (
        _code(lambda: api.DownloadCapture(download, metadata=_as("bob"), timeout=10))[0]
        == grpc.StatusCode.PERMISSION_DENIED
    )
    pcap = b"".join(c.data for c in api.DownloadCapture(download, metadata=_as("alice"), timeout=30))
    assert len(pcap) > 24 and done.targets[0].sha256
    assert api.GetDownloadUrl(url, metadata=_as("alice"), timeout=10).url
    delete = capture_pb2.DeleteCaptureRequest(id=capture_id)
    assert (
        _code(lambda: api.DeleteCapture(delete, metadata=_as("alice"), timeout=10))[0]
        == grpc.StatusCode.PERMISSION_DENIED
    )
    api.DeleteCapture(delete, metadata=_as("carol"), timeout=10)

    entries = _audit(stack)
    assert [(e.actor, e.action, e.namespace, e.result) for e in entries] == [
        ("bob", "capture", "shop", "denied"),
        ("alice", "capture", "shop", "allowed"),
        ("bob", "download-url", "shop", "denied"),
        ("bob", "download", "shop", "denied"),
        ("alice", "download", "shop", "allowed"),
        ("alice", "download-url", "shop", "allowed"),
        ("alice", "delete", "shop", "denied"),
        ("carol", "delete", "shop", "allowed"),
    ]
    create = entries[1]
    assert create.capture_id == capture_id
    assert "pod server" in create.detail and "tcp port 8080" in create.detail and "INC-7" in create.detail
    # Written before the action: the entry is older than the capture it allowed.
    assert create.at <= done.create_time.ToDatetime().replace(tzinfo=create.at.tzinfo)
    assert all(e.peer.startswith("ipv4:127.0.0.1:") for e in entries)


def test_no_action_happens_when_the_audit_trail_cannot_be_written(
    stack: Stack, api: capture_pb2_grpc.CaptureServiceStub
) -> None:
    _refuse_audit_inserts(stack.db_url)
    code, details = _code(lambda: api.CreateCapture(_create(), metadata=_as("alice"), timeout=10))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert "audit trail cannot be written" in details and "nothing was done" in details
    assert (
        api.ListCaptures(capture_pb2.ListCapturesRequest(), metadata=_as("carol"), timeout=10).captures == []
    )
    assert _agent_captures(stack) == []
    # Reading is not audited, so it still works; the controller keeps serving.
    assert (
        api.ListCaptures(
            capture_pb2.ListCapturesRequest(namespace="shop"), metadata=_as("alice"), timeout=10
        ).captures
        == []
    )


def _refuse_audit_inserts(db_url: str) -> None:
    """Makes the database itself refuse new audit entries, as a full disk or a revoked grant would."""
    if db_url.startswith("sqlite"):
        with sqlite3.connect(db_url.removeprefix("sqlite:///")) as connection:
            connection.execute(
                "CREATE TRIGGER test_refuse_audit BEFORE INSERT ON audit_events "
                "BEGIN SELECT RAISE(ABORT, 'audit storage refuses writes'); END"
            )
        return
    with psycopg.connect(db_url, autocommit=True) as connection:
        connection.execute(
            "CREATE FUNCTION test_refuse_audit() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'audit storage refuses writes'; END $$"
        )
        connection.execute(
            "CREATE TRIGGER test_refuse_audit BEFORE INSERT ON audit_events "
            "FOR EACH ROW EXECUTE FUNCTION test_refuse_audit()"
        )


def test_quotas_refuse_with_the_numbers(stack: Stack, api: capture_pb2_grpc.CaptureServiceStub) -> None:
    """Two running captures per caller; 10 MiB a day per namespace, running captures counting their max_bytes."""

    def create(user: str, pod: str, max_bytes: int) -> capture_pb2.Capture:
        request = _create(pod=pod, seconds=30)
        request.limits.max_bytes = max_bytes
        return api.CreateCapture(request, metadata=_as(user), timeout=30)

    first = create("alice", "server", 1 << 20)
    second = create("alice", "client", 1 << 20)
    code, details = _code(lambda: create("alice", "server", 1 << 20))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (
        details == "alice has 2 captures running; the quota is 2 at once (stop one, or wait for one to end)"
    )

    # 8 MiB are left in shop today: carol asks for 9 and gets what is left.
    third = create("carol", "server", 9 << 20)
    assert third.limits.max_bytes == 8 << 20
    code, details = _code(lambda: create("carol", "client", 0))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"has used {10 << 20} of its {10 << 20} bytes" in details

    for capture, user in ((first, "alice"), (second, "alice"), (third, "carol")):
        api.StopCapture(capture_pb2.StopCaptureRequest(id=capture.id), metadata=_as(user), timeout=30)
    refused = [e for e in _audit(stack) if e.result == "denied"]
    assert [(e.actor, e.action) for e in refused] == [("alice", "capture"), ("carol", "capture")]
    assert "the quota is 2" in refused[0].detail
    assert "0 bytes are left" in refused[1].detail


def test_concurrent_requests_cannot_together_pass_a_quota(
    stack: Stack, api: capture_pb2_grpc.CaptureServiceStub
) -> None:
    """Six captures asked for at once by a caller allowed two: two start, four are refused, none slips through."""

    def create(pod: str) -> grpc.StatusCode:
        request = _create(pod=pod, seconds=30)
        request.limits.max_bytes = 1 << 20
        try:
            api.CreateCapture(request, metadata=_as("alice"), timeout=60)
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[attr-defined, no-any-return]
        return grpc.StatusCode.OK

    with ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(create, ["server", "client"] * 3))
    assert sorted(c.name for c in codes) == ["OK"] * 2 + ["RESOURCE_EXHAUSTED"] * 4
    running = api.ListCaptures(capture_pb2.ListCapturesRequest(), metadata=_as("alice"), timeout=10).captures
    assert len(running) == 2
    assert len(_agent_captures(stack)) == 2
    for capture in running:
        api.StopCapture(capture_pb2.StopCaptureRequest(id=capture.id), metadata=_as("alice"), timeout=30)
