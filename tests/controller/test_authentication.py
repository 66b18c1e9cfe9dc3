"""Authentication and authorisation at the controller's front door, with real controller processes.

- Kubernetes delegation: TokenReview names the caller, SubjectAccessReview on `pods/capture` decides, both asked
  of the fake API server through the real `kubernetes` client.
- TLS for the API: the CLI talks to the controller over TLS, checking its certificate.
- Exposure: a controller refuses to serve without authentication, or to take tokens in plaintext, beyond
  loopback.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from google.protobuf.duration_pb2 import Duration

from podcap.api.v1 import capture_pb2, capture_pb2_grpc
from podcap.storage import AuditLog, create_engine_for, make_sessionmaker
from tests.support.fakekube import FakeKube
from tests.support.pki import CertificateAuthority
from tests.support.processes import PODCAP, controller, free_port, stop, wait_healthy

ALICE, MALLORY = "alice-service-account-token", "mallory-token"


def _create(namespace: str) -> capture_pb2.CreateCaptureRequest:
    return capture_pb2.CreateCaptureRequest(namespace=namespace, pod="web-1", duration=Duration(seconds=5))


def _as(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def _refused(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error: Any = caught.value
    return error.code(), error.details()


@pytest.fixture
def kube_controller(
    fake_kube: FakeKube, tmp_path: Path
) -> Iterator[tuple[capture_pb2_grpc.CaptureServiceStub, str]]:
    """A controller that asks Kubernetes who callers are and what they may do. alice (group support) may
    create and get captures in shop; there is no agent anywhere, so an allowed capture stops at dispatch."""
    fake_kube.add_user(ALICE, "alice", ["support"])
    fake_kube.allow("support", ["create", "get"], namespace="shop")
    for namespace in ("shop", "payments"):
        fake_kube.add_pod(namespace, "web-1", node="node-1", ips=["10.1.0.5"])
    db = f"sqlite:///{tmp_path / 'podcap.db'}"
    kubeconfig = fake_kube.write_kubeconfig(tmp_path / "kubeconfig")
    args = [
        "--db",
        db,
        "--store",
        f"file://{tmp_path / 'store'}",
        "--kubeconfig",
        str(kubeconfig),
        "--auth-kubernetes",
    ]
    with controller(args, tmp_path) as address, grpc.insecure_channel(address) as channel:
        yield capture_pb2_grpc.CaptureServiceStub(channel), db


def test_kubernetes_rbac_decides_who_may_capture_where(
    fake_kube: FakeKube, kube_controller: tuple[capture_pb2_grpc.CaptureServiceStub, str]
) -> None:
    api, db = kube_controller
    # Allowed in shop: the request gets past access control and fails later, at the missing agent.
    code, details = _refused(lambda: api.CreateCapture(_create("shop"), metadata=_as(ALICE), timeout=30))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "node-1" in details
    # Not in payments, and not with an unknown token.
    code, details = _refused(lambda: api.CreateCapture(_create("payments"), metadata=_as(ALICE), timeout=30))
    assert (code, details) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "alice may not capture captures in namespace 'payments'",
    )
    code, details = _refused(lambda: api.CreateCapture(_create("shop"), metadata=_as(MALLORY), timeout=30))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "invalid bearer token" in details
    # alice may get captures in shop only, so she lists one namespace at a time.
    listing = capture_pb2.ListCapturesRequest(namespace="shop")
    assert api.ListCaptures(listing, metadata=_as(ALICE), timeout=30).captures == []  # allowed, and empty
    code, _ = _refused(
        lambda: api.ListCaptures(capture_pb2.ListCapturesRequest(), metadata=_as(ALICE), timeout=30)
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED

    reviews = [
        r["spec"].get("resourceAttributes") for r in fake_kube.reviews if r["kind"] == "SubjectAccessReview"
    ]
    assert {
        "namespace": "payments",
        "verb": "create",
        "resource": "pods",
        "subresource": "capture",
    } in reviews
    sar = next(r["spec"] for r in fake_kube.reviews if r["kind"] == "SubjectAccessReview")
    assert (sar["user"], sar["groups"]) == ("alice", ["support"])
    # The token itself is reviewed once, then remembered for a few seconds.
    assert sum(r["kind"] == "TokenReview" and r["spec"]["token"] == ALICE for r in fake_kube.reviews) == 1

    engine = create_engine_for(db)
    try:
        with make_sessionmaker(engine).begin() as session:
            decisions = [(e.actor, e.namespace, e.result) for e in AuditLog(session).entries()]
    finally:
        engine.dispose()
    # The allowed request never got as far as acting (no agent), so only the refusals are on record.
    assert decisions == [("alice", "payments", "denied"), ("-", "", "unauthenticated")]


def test_the_cli_talks_tls_to_the_controller_and_checks_its_certificate(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "ca")
    server = ca.issue("localhost", server=True)
    foreign = CertificateAuthority(tmp_path / "foreign")
    token = "ops-token-" + "x" * 30
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(
        yaml.safe_dump(
            {
                "roles": {"admin": ["*"]},
                "users": [
                    {
                        "name": "ops",
                        "token_sha256": hashlib.sha256(token.encode()).hexdigest(),
                        "grants": [{"role": "admin", "namespaces": ["*"]}],
                    }
                ],
            }
        )
    )
    port = free_port()
    argv = _controller_argv(
        tmp_path,
        f"127.0.0.1:{port}",
        *("--auth-tokens", str(tokens), "--tls-cert", str(server.cert), "--tls-key", str(server.key)),
    )
    with (tmp_path / "controller.log").open("wb") as log:
        process = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=ca.cert.read_bytes())
        wait_healthy(f"127.0.0.1:{port}", process, credentials=credentials, server_name="localhost")

        def podcap_list(*flags: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [PODCAP, "list", "--server", f"localhost:{port}", *flags],
                env={**os.environ, "PODCAP_TOKEN": token},
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )

        trusted = podcap_list("--ca", str(ca.cert))
        assert trusted.returncode == 0, trusted.stderr
        for flags in ((), ("--ca", str(foreign.cert))):  # plaintext; TLS with a CA that did not sign it
            refused = podcap_list(*flags)
            assert refused.returncode == 1
            assert refused.stderr.startswith("podcap: UNAVAILABLE"), refused.stderr  # and no gRPC log noise
    finally:
        stop(process)


def _controller_argv(tmp_path: Path, listen: str, *flags: str) -> list[str]:
    """`podcap controller` on SQLite, a local directory and an empty static inventory, with `flags`."""
    (tmp_path / "inventory.yaml").write_text(yaml.safe_dump({"pods": [], "agents": {}}))
    return [
        PODCAP,
        "controller",
        "--listen",
        listen,
        "--db",
        f"sqlite:///{tmp_path / 'db'}",
        "--store",
        f"file://{tmp_path / 'store'}",
        "--inventory",
        str(tmp_path / "inventory.yaml"),
        *flags,
    ]


def _refused_at_start(argv: list[str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    return result


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--no-auth"], "without authentication: --no-auth is for loopback addresses only"),
        (["--auth-tokens", "TOKENS"], "refusing to accept bearer tokens in plaintext on 0.0.0.0:"),
    ],
)
def test_a_controller_beyond_loopback_needs_authentication_and_tls(
    tmp_path: Path, flags: list[str], message: str
) -> None:
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(yaml.safe_dump({"users": []}))
    flags = [str(tokens) if flag == "TOKENS" else flag for flag in flags]
    result = _refused_at_start(_controller_argv(tmp_path, f"0.0.0.0:{free_port()}", *flags))
    assert message in result.stderr


def test_a_broken_token_file_is_refused_at_start_saying_where(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(yaml.safe_dump({"roles": {"support": ["capture", "sniff"]}, "users": []}))
    listen = f"127.0.0.1:{free_port()}"
    result = _refused_at_start(_controller_argv(tmp_path, listen, "--auth-tokens", str(tokens)))
    assert f"{tokens}: role 'support'" in result.stderr and "'sniff' is not a valid Action" in result.stderr
