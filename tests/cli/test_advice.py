"""Errors read like advice, against a real controller: what was wrong, then what to do next.

The controller runs on the embedded defaults (SQLite, a local directory store, a static inventory); the pod
`shop/lonely` is on node-9, where the inventory has no agent.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.cli._run import run
from tests.support.processes import controller, free_port

TOKEN = "t0ken-" + "z" * 40  # a test token


def _inventory(tmp_path: Path) -> Path:
    path = tmp_path / "inventory.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "pods": [{"namespace": "shop", "name": "lonely", "node": "node-9", "ips": ["10.244.9.9"]}],
                "agents": {"node-1": "127.0.0.1:1"},
            }
        )
    )
    return path


def _store_flags(tmp_path: Path) -> list[str]:
    return ["--db", f"sqlite:///{tmp_path / 'podcap.db'}", "--store", f"file://{tmp_path / 'store'}"]


@pytest.fixture
def open_controller(tmp_path: Path) -> Iterator[str]:
    with controller([*_store_flags(tmp_path), "--inventory", str(_inventory(tmp_path))], tmp_path) as address:
        yield address


def test_a_pod_on_a_node_without_an_agent_names_the_node_and_the_daemonset(
    open_controller: str, tmp_path: Path
) -> None:
    # The pod is given without NS/: the namespace comes from the config file.
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"server": open_controller, "namespace": "shop"}))
    done = run(["capture", "lonely", "--duration", "5s"], tmp_path, {"PODCAP_CONFIG": str(config)})
    assert done.returncode == 1
    assert "no podcap agent on node node-9" in done.stderr
    assert "hint: is the podcap agent DaemonSet running on node node-9?" in done.stderr
    assert "--field-selector spec.nodeName=node-9" in done.stderr


def test_a_pod_without_a_namespace_asks_for_one(open_controller: str, tmp_path: Path) -> None:
    done = run(["capture", "lonely"], tmp_path, {"PODCAP_SERVER": open_controller})
    assert done.returncode == 1
    assert "which namespace is pod lonely in? Give NAMESPACE/lonely, -n NAMESPACE" in done.stderr


def test_a_misspelt_pod_says_how_to_look_it_up(open_controller: str, tmp_path: Path) -> None:
    done = run(["capture", "shop/lonley"], tmp_path, {"PODCAP_SERVER": open_controller})
    assert done.returncode == 1 and "NOT_FOUND" in done.stderr
    assert "hint: check the pod's namespace and name (kubectl get pods -n NAMESPACE)" in done.stderr


def test_a_missing_capture_points_at_list(open_controller: str, tmp_path: Path) -> None:
    done = run(["get", "0123456789abcdef"], tmp_path, {"PODCAP_SERVER": open_controller})
    assert done.returncode == 1 and "NOT_FOUND" in done.stderr
    assert "`podcap list` shows the captures you can see" in done.stderr


def test_no_controller_at_the_address_says_which_and_how_to_set_it(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"server": address}))
    done = run(["list"], tmp_path, {"PODCAP_CONFIG": str(config)})
    assert done.returncode == 1 and "UNAVAILABLE" in done.stderr
    assert f"no podcap controller answered at {address} (server from file {config})" in done.stderr
    assert "--server HOST:PORT, $PODCAP_SERVER or 'server:' in" in done.stderr


def test_unauthenticated_says_how_to_set_the_token(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(
        yaml.safe_dump(
            {
                "roles": {"admin": ["*"]},
                "users": [
                    {
                        "name": "alice",
                        "token_sha256": hashlib.sha256(TOKEN.encode()).hexdigest(),
                        "grants": [{"role": "admin", "namespaces": ["*"]}],
                    }
                ],
            }
        )
    )
    flags = [*_store_flags(tmp_path), "--inventory", str(_inventory(tmp_path)), "--auth-tokens", str(tokens)]
    with controller(flags, tmp_path) as address:
        done = run(["list"], tmp_path, {"PODCAP_SERVER": address})
        assert done.returncode == 1 and "UNAUTHENTICATED" in done.stderr
        assert "hint: no token was given: set a valid one with $PODCAP_TOKEN, 'token_file:' in" in done.stderr
        done = run(["list"], tmp_path, {"PODCAP_SERVER": address, "PODCAP_TOKEN": "wrong-" + "w" * 40})
        assert "hint: the token from env $PODCAP_TOKEN: set a valid one" in done.stderr
        # the token from a token_file named in the config file is the one sent
        (tmp_path / "token").write_text(TOKEN + "\n")
        config = tmp_path / "config.yaml"
        config.write_text(yaml.safe_dump({"server": address, "token_file": "token"}))
        done = run(["list", "-o", "yaml"], tmp_path, {"PODCAP_CONFIG": str(config)})
        assert done.returncode == 0, done.stderr
        assert yaml.safe_load(done.stdout) == []
