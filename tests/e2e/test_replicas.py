"""Several controller replicas on one PostgreSQL: any replica serves any request, one replica follows each
capture (its lease), and when that replica dies another takes the capture over and finishes it."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from tests.support.agents import NodeAgent
from tests.support.lab import Lab
from tests.support.processes import PODCAP, ControllerProcess, spool_root

pytestmark = pytest.mark.netns

PORT = 8080


def _cli(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PODCAP, *args],
        env={**os.environ, "PODCAP_SERVER": address},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def replicas(
    lab: Lab, postgres_url: str, tmp_path: Path
) -> Iterator[tuple[ControllerProcess, ControllerProcess]]:
    node = lab.nodes["node-2"]
    server = lab.pods["server"]
    store = f"file://{tmp_path / 'store'}"
    with spool_root() as spool:
        agent = NodeAgent(lab, node, store, spool, tmp_path)
        inventory = tmp_path / "inventory.yaml"
        inventory.write_text(
            yaml.safe_dump(
                {
                    "pods": [{"namespace": "shop", "name": "server", "node": node.name, "ips": [server.ip]}],
                    "agents": {node.name: agent.address},
                }
            )
        )
        common = ["--db", postgres_url, "--store", store, "--inventory", str(inventory), "--lease-ttl", "2s"]
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        a = ControllerProcess([*common, "--replica-id", "replica-a"], tmp_path / "a")
        b = ControllerProcess([*common, "--replica-id", "replica-b"], tmp_path / "b")
        try:
            agent.start()
            a.start()
            b.start()
            lab.http_server(server.netns, PORT)
            yield a, b
        finally:
            a.stop()
            b.stop()
            agent.close()


def _lease_owner(postgres_url: str, capture_id: str) -> str:
    engine = sa.create_engine(postgres_url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.connect() as conn:
            return str(
                conn.execute(
                    sa.text("SELECT lease_owner FROM capture_targets WHERE capture_id = :id"),
                    {"id": capture_id},
                ).scalar_one()
            )
    finally:
        engine.dispose()


def test_a_dead_replicas_capture_is_finished_by_another(
    replicas: tuple[ControllerProcess, ControllerProcess], lab: Lab, postgres_url: str
) -> None:
    a, b = replicas
    created = _cli(
        a.address, "capture", "shop/server", "--filter", f"tcp port {PORT}", "--duration", "6s", "-o", "json"
    )
    assert created.returncode == 0, created.stderr
    capture_id = json.loads(created.stdout)["id"]

    # Any replica serves any request, and only the creating replica follows the capture while it lives.
    seen_by_b = json.loads(_cli(b.address, "get", capture_id, "-o", "json").stdout)
    assert seen_by_b["state"] == "RUNNING"
    time.sleep(2.5)  # longer than the lease: b's reconciler ran and must have left a's lease alone
    assert _lease_owner(postgres_url, capture_id) == "replica-a"

    a.kill()
    server = lab.pods["server"]
    assert lab.http_get(lab.pods["client"].netns, f"http://{server.ip}:{PORT}/after-a-died", timeout=5) == 404
    deadline = time.monotonic() + 30
    shown = seen_by_b
    while shown["state"] not in ("COMPLETED", "FAILED"):
        assert time.monotonic() < deadline, f"nobody finished the capture:\n{b.log()[-3000:]}"
        time.sleep(0.3)
        shown = json.loads(_cli(b.address, "get", capture_id, "-o", "json").stdout)
    assert shown["state"] == "COMPLETED", shown["error"]
    assert _lease_owner(postgres_url, capture_id) == "replica-b"
    assert [h["state"] for h in shown["history"] if not h["pod"]] == [
        "PENDING",
        "RUNNING",
        "UPLOADING",
        "COMPLETED",
    ]
    assert shown["packets"] > 0 and shown["sha256"]
