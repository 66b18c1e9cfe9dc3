"""The stack the end-to-end tests share: a lab, an agent in each node's netns, one controller, in two flavours.

"s3-postgresql-kubernetes": S3 on moto's server, PostgreSQL, the real `kubernetes` client against the fake API
server. "localdir-sqlite-static": a local directory, SQLite, the static YAML inventory. Both pods carry the
label tier=web, so selector captures match both.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml

from tests.support.fakekube import FakeKube
from tests.support.lab import Lab
from tests.support.processes import PODCAP, controller, free_port, spool_root, stop, wait_healthy

LABELS = {"tier": "web"}


@pytest.fixture
def spool() -> Iterator[Path]:
    with spool_root() as path:
        yield path


@pytest.fixture
def controller_flags() -> list[str]:
    """Extra flags for the stack's controller; a test module overrides this fixture to add its own."""
    return []


@pytest.fixture
def services() -> list[dict[str, Any]]:
    """Services for the stack's inventory, as the static inventory file writes them (`endpoints`: lab pod names);
    a test module overrides this fixture to add its own. The fake API server gets them as Services with
    EndpointSlices."""
    return []


@dataclass
class Stack:
    lab: Lab
    server: str
    db_url: str
    store_url: str
    s3_bucket: str | None
    s3_env: dict[str, str]
    agents: dict[str, str]  # node name -> agent address as the controller reaches it


@pytest.fixture(params=["s3-postgresql-kubernetes", "localdir-sqlite-static"])
def stack(request: pytest.FixtureRequest, lab: Lab, fake_kube: FakeKube, tmp_path: Path) -> Iterator[Stack]:
    agent_port = free_port()
    env: dict[str, str] = {}
    bucket = None
    if request.param.startswith("s3"):
        s3 = request.getfixturevalue("s3_server")
        bucket = f"pcaps-{os.getpid()}-{agent_port}"
        boto3.client("s3", endpoint_url=s3.endpoint, **aws_credentials(s3.env)).create_bucket(Bucket=bucket)
        store_url = f"s3://{bucket}/captures"
        env = dict(s3.env)
        s3_port = int(s3.endpoint.rsplit(":", 1)[1])
        for node in lab.nodes.values():
            # The agents reach the S3 server on their own loopback, relayed to the root namespace's.
            lab.forward_into(node.netns, s3_port, "127.0.0.1", s3_port)
        db_url = request.getfixturevalue("postgres_url")
    else:
        store_url = f"file://{tmp_path / 'store'}"
        db_url = f"sqlite:///{tmp_path / 'podcap.db'}"

    agents = []
    agent_addresses: dict[str, str] = {}
    spool = request.getfixturevalue("spool")
    for i, node in enumerate(sorted(lab.nodes.values(), key=lambda n: n.name)):
        agent_address = f"127.0.0.{i + 2}"
        process = lab.popen(
            node.netns,
            [
                PODCAP,
                "agent",
                "--node-name",
                node.name,
                "--listen",
                f"127.0.0.1:{agent_port}",
                "--store",
                store_url,
                "--spool-dir",
                str(spool / node.name),
            ],
            env={**os.environ, **env},
            stdout=(tmp_path / f"agent-{node.name}.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        agents.append(process)
        lab.forward_out(agent_address, agent_port, node.netns, "127.0.0.1", agent_port)
        fake_kube.add_agent(node.name, agent_address)
        agent_addresses[node.name] = f"{agent_address}:{agent_port}"
    for process, address in zip(agents, agent_addresses.values(), strict=True):  # they start side by side
        wait_healthy(address, process)

    for pod in lab.pods.values():
        fake_kube.add_pod(pod.namespace, pod.name, node=pod.node, ips=[pod.ip], labels=LABELS)
    for service in request.getfixturevalue("services"):
        fake_kube.add_service(
            service["namespace"], service["name"], service.get("ports", []), service.get("clusterIP", "")
        )
        endpoints = [
            {"ip": lab.pods[name].ip, "pod": name, "node": lab.pods[name].node}
            for name in service["endpoints"]
        ]
        slice_ports = [
            {
                "name": p.get("name", ""),
                "port": p.get("targetPort", p["port"]),
                "protocol": p.get("protocol", "TCP"),
            }
            for p in service.get("ports", [])
        ]
        fake_kube.add_endpoint_slice(service["namespace"], service["name"], endpoints, slice_ports)
    if request.param.endswith("kubernetes"):
        source = ["--kubeconfig", str(fake_kube.write_kubeconfig(tmp_path / "kubeconfig"))]
    else:
        inventory = {
            "pods": [
                {"namespace": p.namespace, "name": p.name, "node": p.node, "ips": [p.ip], "labels": LABELS}
                for p in lab.pods.values()
            ],
            "agents": {
                n.name: f"127.0.0.{i + 2}:{agent_port}"
                for i, n in enumerate(sorted(lab.nodes.values(), key=lambda n: n.name))
            },
            "services": request.getfixturevalue("services"),
        }
        (tmp_path / "inventory.yaml").write_text(yaml.safe_dump(inventory))
        source = ["--inventory", str(tmp_path / "inventory.yaml")]

    try:
        with controller(
            [
                "--db",
                db_url,
                "--store",
                store_url,
                *source,
                "--agent-port",
                str(agent_port),
                *request.getfixturevalue("controller_flags"),
            ],
            tmp_path,
            env=env,
        ) as address:
            yield Stack(lab, address, db_url, store_url, bucket, env, agent_addresses)
    finally:
        for process in agents:
            stop(process)


def aws_credentials(env: dict[str, str]) -> dict[str, str]:
    return {
        "aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
        "region_name": env["AWS_DEFAULT_REGION"],
    }
