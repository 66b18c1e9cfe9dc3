"""Where the client's settings come from: flags over environment over the config file over defaults, each
value's source shown by `podcap config`, the token never; a bad config file is exit 2 naming the file and key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.cli._run import KUBECTL_PODCAP, run


def _config(home: Path, *args: str, env: dict[str, str] | None = None, program: str = "") -> dict:  # type: ignore[type-arg]
    done = run(["config", "-o", "json", *args], home, env, **({"program": program} if program else {}))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def _write(home: Path, content: dict) -> Path:  # type: ignore[type-arg]
    path = home / ".config" / "podcap" / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(content))
    return path


def test_flags_over_environment_over_file_over_defaults(tmp_path: Path) -> None:
    shown = _config(tmp_path)
    assert shown["server"] == {"value": "127.0.0.1:7070", "source": "default"}
    assert shown["config_file"].endswith("(not found)")

    path = _write(tmp_path, {"server": "file.example:7070", "namespace": "shop", "tls": True})
    shown = _config(tmp_path)
    assert shown["server"] == {"value": "file.example:7070", "source": f"file {path}"}
    assert shown["namespace"] == {"value": "shop", "source": f"file {path}"}
    assert shown["tls"] == {"value": True, "source": f"file {path}"}

    env = {"PODCAP_SERVER": "env.example:7070", "PODCAP_NAMESPACE": "payments"}
    shown = _config(tmp_path, env=env)
    assert shown["server"] == {"value": "env.example:7070", "source": "env $PODCAP_SERVER"}
    assert shown["namespace"] == {"value": "payments", "source": "env $PODCAP_NAMESPACE"}

    shown = _config(tmp_path, "--server", "flag.example:7070", env=env)
    assert shown["server"] == {"value": "flag.example:7070", "source": "flag --server"}


def test_the_token_is_never_shown_only_where_it_came_from(tmp_path: Path) -> None:
    secret = "s3cr3t-" + "x" * 30
    path = _write(tmp_path, {"token": secret})
    for output in ("text", "json", "yaml"):
        done = run(["config", "-o", output], tmp_path)
        assert done.returncode == 0, done.stderr
        assert secret not in done.stdout + done.stderr
        assert f"set (from file {path})" in done.stdout
    done = run(["config"], tmp_path, {"PODCAP_TOKEN": secret})
    assert secret not in done.stdout and "set (from env $PODCAP_TOKEN)" in done.stdout
    assert "token: not set" in run(["config"], tmp_path / "elsewhere").stdout


def test_token_file_is_read_relative_to_the_config_file(tmp_path: Path) -> None:
    path = _write(tmp_path, {"token_file": "token.txt"})
    (path.parent / "token.txt").write_text("tok-" + "y" * 30 + "\n")
    shown = _config(tmp_path)
    assert shown["token"]["value"].startswith("set (from token_file ")
    assert str(path.parent / "token.txt") in shown["token"]["value"]


def test_xdg_config_home_and_podcap_config_name_the_file(tmp_path: Path) -> None:
    xdg = tmp_path / "xdg"
    (xdg / "podcap").mkdir(parents=True)
    (xdg / "podcap" / "config.yaml").write_text("server: xdg.example:1\n")
    assert _config(tmp_path, env={"XDG_CONFIG_HOME": str(xdg)})["server"]["value"] == "xdg.example:1"
    explicit = tmp_path / "explicit.yaml"
    explicit.write_text("server: explicit.example:2\n")
    env = {"XDG_CONFIG_HOME": str(xdg), "PODCAP_CONFIG": str(explicit)}
    assert _config(tmp_path, env=env)["server"]["value"] == "explicit.example:2"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("server: [unclosed\n", "is not valid YAML"),
        ("servr: x:1\n", "unknown key 'servr'; the keys are server, token, token_file, ca, tls, namespace"),
        ("tls: 'yes please'\n", "tls must be true or false"),
        ("server: 7070\n", "server must be a string, not int 7070"),
        ("- server\n", "expected a mapping of keys"),
        ("token: a\ntoken_file: b\n", "give token or token_file, not both"),
    ],
)
def test_a_bad_config_file_is_exit_2_naming_the_file_and_key(
    tmp_path: Path, content: str, expected: str
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(content)
    for command in (["config"], ["list"], ["get", "3f2a"]):
        done = run(command, tmp_path, {"PODCAP_CONFIG": str(path)})
        assert done.returncode == 2, (command, done.stdout, done.stderr)
        assert str(path) in done.stderr and expected in done.stderr
        assert "Traceback" not in done.stderr


def test_a_named_config_file_that_is_missing_or_unreadable_is_exit_2(tmp_path: Path) -> None:
    done = run(["config"], tmp_path, {"PODCAP_CONFIG": str(tmp_path / "nope.yaml")})
    assert done.returncode == 2 and "nope.yaml (from $PODCAP_CONFIG) does not exist" in done.stderr
    done = run(["config"], tmp_path, {"PODCAP_CONFIG": str(tmp_path)})  # a directory
    assert done.returncode == 2 and f"config file {tmp_path} cannot be read" in done.stderr
    path = _write(tmp_path, {"token_file": "missing-token"})
    done = run(["config"], tmp_path)
    assert done.returncode == 2 and f"config file {path}: token_file" in done.stderr


def _kubeconfig(path: Path, current: str, contexts: dict[str, str | None]) -> Path:
    document = {
        "apiVersion": "v1",
        "kind": "Config",
        "contexts": [
            {"name": name, "context": {"cluster": "c", **({"namespace": ns} if ns else {})}}
            for name, ns in contexts.items()
        ],
    }
    if current:
        document["current-context"] = current
    path.write_text(yaml.safe_dump(document))
    return path


def test_kubectl_plugin_takes_the_namespace_from_the_current_context(tmp_path: Path) -> None:
    # As kubectl merges $KUBECONFIG: the first file that sets current-context wins, and so does the first
    # definition of each context.
    first = _kubeconfig(tmp_path / "a", "", {"team": "team-a"})
    second = _kubeconfig(tmp_path / "b", "team", {"team": "not-this-one", "other": "other"})
    env = {"KUBECONFIG": f"{first}:{tmp_path / 'missing'}:{second}"}
    shown = _config(tmp_path, env=env, program=KUBECTL_PODCAP)
    assert shown["namespace"] == {"value": "team-a", "source": "kubeconfig context team"}
    # podcap itself does not look at kubeconfig
    assert _config(tmp_path, env=env)["namespace"]["value"] == ""
    # flag and config file win over the context
    _write(tmp_path, {"namespace": "from-file"})
    assert _config(tmp_path, env=env, program=KUBECTL_PODCAP)["namespace"]["value"] == "from-file"


def test_kubectl_plugin_defaults_like_kubectl(tmp_path: Path) -> None:
    # ~/.kube/config without a namespace in the context: "default", as kubectl says
    (tmp_path / ".kube").mkdir()
    _kubeconfig(tmp_path / ".kube" / "config", "dev", {"dev": None})
    assert _config(tmp_path, program=KUBECTL_PODCAP)["namespace"]["value"] == "default"
    _kubeconfig(tmp_path / ".kube" / "config", "dev", {"dev": "dev-ns"})
    assert _config(tmp_path, program=KUBECTL_PODCAP)["namespace"]["value"] == "dev-ns"
    done = run(["--help"], tmp_path, program=KUBECTL_PODCAP)
    assert done.stdout.startswith("usage: kubectl podcap")
