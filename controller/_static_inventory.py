"""An inventory read from a YAML file, for local runs and the simulated lab where there is no Kubernetes API.

It gives the controller the same answers and the same errors as `KubernetesInventory`, so the lab exercises
the controller's real paths. The file is read and checked once, at start: a typo in it fails the start with the
file and the entry named, rather than a capture failing later with a confusing error.

    pods:
      - namespace: shop
        name: checkout-7d9f
        node: node-1
        ips: [10.244.1.10]        # or  ip: 10.244.1.10
        phase: Running            # default Running
        hostNetwork: false        # default false
        labels: {app: checkout}   # default {}
        uid: 6f1c...              # default "static-<namespace>-<name>"
    agents:                       # node -> address of its capture agent
      node-1: 127.0.0.2:7443
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from podcap.controller import _selectors
from podcap.controller._errors import InvalidRequest, NoAgentOnNode, PodNotFound
from podcap.controller._inventory import Pod

_POD_KEYS = frozenset({"namespace", "name", "node", "ips", "ip", "phase", "hostNetwork", "labels", "uid"})
_PHASES = frozenset({"Pending", "Running", "Succeeded", "Failed", "Unknown"})


class StaticInventory:
    """Pods and agents from a file; lookups never block and never change."""

    def __init__(
        self, pods: list[Pod], agents: Mapping[str, str], source: str = "the static inventory"
    ) -> None:
        self._pods = {(pod.namespace, pod.name): pod for pod in pods}
        self._agents = dict(agents)
        self._source = source

    @classmethod
    def from_file(cls, path: str | Path) -> StaticInventory:
        """Load and check the file; ValueError naming the file and the entry on any problem."""
        path = Path(path)
        try:
            document = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"static inventory {path}: cannot read it: {error}") from error
        except yaml.YAMLError as error:
            raise ValueError(f"static inventory {path}: not valid YAML: {error}") from error
        try:
            pods, agents = _parse(document)
        except ValueError as error:
            raise ValueError(f"static inventory {path}: {error}") from None
        return cls(pods, agents, source=f"the static inventory {path}")

    def get_pod(self, namespace: str, name: str) -> Pod:
        pod = self._pods.get((namespace, name))
        if pod is None:
            raise PodNotFound(f"pod {namespace}/{name} not found (looked in {self._source})")
        return _copy(pod)

    def list_pods(self, namespace: str, label_selector: str) -> list[Pod]:
        try:
            selector = _selectors.parse(label_selector)
        except ValueError as error:
            raise InvalidRequest(str(error)) from error
        return [
            _copy(pod)
            for (pod_namespace, _), pod in sorted(self._pods.items())
            if pod_namespace == namespace and selector.matches(pod.labels)
        ]

    def running_pods(self, namespace: str) -> list[Pod]:
        return [
            _copy(pod)
            for (pod_namespace, _), pod in sorted(self._pods.items())
            if namespace in ("", pod_namespace) and pod.phase == "Running"
        ]

    def agent_address(self, node: str) -> str:
        address = self._agents.get(node)
        if address is None:
            known = ", ".join(sorted(self._agents)) or "none"
            raise NoAgentOnNode(
                f"no podcap agent on node {node} ({self._source} lists agents for nodes: {known})"
            )
        return address


def _copy(pod: Pod) -> Pod:
    # Pod is frozen but its labels are a dict: hand out a copy so no caller can change the inventory.
    return dataclasses.replace(pod, labels=dict(pod.labels))


def _parse(document: Any) -> tuple[list[Pod], dict[str, str]]:
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise ValueError(f"expected a mapping with 'pods' and 'agents', found {type(document).__name__}")
    unknown = set(document) - {"pods", "agents"}
    if unknown:
        raise ValueError(f"unknown top-level keys {sorted(map(str, unknown))}; expected 'pods' and 'agents'")
    raw_pods = document.get("pods") or []
    if not isinstance(raw_pods, list):
        raise ValueError("'pods' must be a list of pods")
    pods: list[Pod] = []
    seen: set[tuple[str, str]] = set()
    for index, raw in enumerate(raw_pods):
        try:
            pod = _pod(raw)
        except ValueError as error:
            raise ValueError(f"pods[{index}]: {error}") from None
        if (pod.namespace, pod.name) in seen:
            raise ValueError(f"pods[{index}]: pod {pod.namespace}/{pod.name} is listed twice")
        seen.add((pod.namespace, pod.name))
        pods.append(pod)
    return pods, _agents(document.get("agents") or {})


def _pod(raw: Any) -> Pod:
    if not isinstance(raw, dict):
        raise ValueError(f"expected a mapping, found {raw!r}")
    unknown = set(raw) - _POD_KEYS
    if unknown:
        raise ValueError(f"unknown keys {sorted(map(str, unknown))}; allowed: {sorted(_POD_KEYS)}")
    namespace, name, node = (_string(raw, key) for key in ("namespace", "name", "node"))
    if "ips" in raw and "ip" in raw:
        raise ValueError("give either 'ips' or 'ip', not both")
    raw_ips = raw.get("ips", [raw["ip"]] if "ip" in raw else [])
    if not isinstance(raw_ips, list):
        raise ValueError(f"'ips' must be a list of IP addresses, found {raw_ips!r}")
    ips = tuple(_ip(ip) for ip in raw_ips)
    phase = raw.get("phase", "Running")
    if phase not in _PHASES:
        raise ValueError(f"'phase' must be one of {sorted(_PHASES)}, found {phase!r}")
    host_network = raw.get("hostNetwork", False)
    if not isinstance(host_network, bool):
        raise ValueError(f"'hostNetwork' must be true or false, found {host_network!r}")
    labels = raw.get("labels") or {}
    if not isinstance(labels, dict) or not all(
        isinstance(key, str) and isinstance(value, str) for key, value in labels.items()
    ):
        raise ValueError(
            f"'labels' must map strings to strings (quote numbers and booleans), found {labels!r}"
        )
    uid = raw.get("uid", f"static-{namespace}-{name}")
    return Pod(
        namespace=namespace,
        name=name,
        node=node,
        ips=ips,
        phase=phase,
        host_network=host_network,
        uid=str(uid),
        labels=labels,
    )


def _agents(raw: Any) -> dict[str, str]:
    if not isinstance(raw, dict):
        raise ValueError("'agents' must map node names to agent addresses (host:port)")
    agents: dict[str, str] = {}
    for node, address in raw.items():
        if not isinstance(node, str) or not isinstance(address, str):
            raise ValueError(f"agents: {node!r}: expected 'node: host:port', found {address!r}")
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"agents: {node}: {address!r} is not host:port (bracket IPv6: [fd00::1]:7443)")
        if ":" in host and not (host.startswith("[") and host.endswith("]")):
            raise ValueError(f"agents: {node}: IPv6 address in {address!r} must be bracketed, [addr]:port")
        agents[node] = address
    return agents


def _string(raw: dict[str, Any], key: str) -> str:
    value = raw.get(key)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{key!r} is required and must be a non-empty string, found {value!r}")
    return value


def _ip(value: Any) -> str:
    try:
        return str(ipaddress.ip_address(str(value)))
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address") from None
