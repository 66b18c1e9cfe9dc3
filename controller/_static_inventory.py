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
    services:                     # default none
      - namespace: shop
        name: checkout
        clusterIP: 10.96.0.10     # default "" (headless)
        ports:                    # default []
          - {name: http, port: 80, targetPort: 8080, protocol: TCP}   # targetPort default port, protocol TCP
        selector: {app: checkout} # its endpoints: the Running pods above in its namespace with these labels,
        # endpoints: [checkout-7d9f]   or: pods of its namespace named explicitly (then no selector)

A Service's endpoints are resolved against the pods when the file is read: a named endpoint pod must be listed
under `pods`, and only a Running pod with an IP counts as a ready endpoint, one per IP.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from podcap.controller import _selectors
from podcap.controller._errors import InvalidRequest, NoAgentOnNode, NotFound, PodNotFound
from podcap.controller._inventory import Pod, Service, ServiceEndpoint, ServicePort

_POD_KEYS = frozenset({"namespace", "name", "node", "ips", "ip", "phase", "hostNetwork", "labels", "uid"})
_PHASES = frozenset({"Pending", "Running", "Succeeded", "Failed", "Unknown"})
_SERVICE_KEYS = frozenset({"namespace", "name", "clusterIP", "ports", "selector", "endpoints"})
_PORT_KEYS = frozenset({"name", "port", "targetPort", "protocol"})
_PROTOCOLS = frozenset({"TCP", "UDP", "SCTP"})


class StaticInventory:
    """Pods, agents and Services from a file; lookups never block and never change."""

    def __init__(
        self,
        pods: list[Pod],
        agents: Mapping[str, str],
        source: str = "the static inventory",
        services: list[Service] | None = None,
    ) -> None:
        self._pods = {(pod.namespace, pod.name): pod for pod in pods}
        self._agents = dict(agents)
        self._source = source
        self._services = {(service.namespace, service.name): service for service in services or ()}

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
            pods, agents, services = _parse(document)
        except ValueError as error:
            raise ValueError(f"static inventory {path}: {error}") from None
        return cls(pods, agents, source=f"the static inventory {path}", services=services)

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

    def get_service(self, namespace: str, name: str) -> Service:
        service = self._services.get((namespace, name))
        if service is None:
            raise NotFound(f"service {namespace}/{name} not found (looked in {self._source})")
        return service


def _copy(pod: Pod) -> Pod:
    # Pod is frozen but its labels are a dict: hand out a copy so no caller can change the inventory.
    return dataclasses.replace(pod, labels=dict(pod.labels))


def _parse(document: Any) -> tuple[list[Pod], dict[str, str], list[Service]]:
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise ValueError(f"expected a mapping with 'pods' and 'agents', found {type(document).__name__}")
    unknown = set(document) - {"pods", "agents", "services"}
    if unknown:
        raise ValueError(
            f"unknown top-level keys {sorted(map(str, unknown))}; expected 'pods', 'agents' and 'services'"
        )
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
    raw_services = document.get("services") or []
    if not isinstance(raw_services, list):
        raise ValueError("'services' must be a list of services")
    services: list[Service] = []
    names: set[tuple[str, str]] = set()
    for index, raw in enumerate(raw_services):
        try:
            service = _service(raw, pods)
        except ValueError as error:
            raise ValueError(f"services[{index}]: {error}") from None
        if (service.namespace, service.name) in names:
            raise ValueError(f"services[{index}]: service {service.namespace}/{service.name} is listed twice")
        names.add((service.namespace, service.name))
        services.append(service)
    return pods, _agents(document.get("agents") or {}), services


def _service(raw: Any, pods: list[Pod]) -> Service:
    if not isinstance(raw, dict):
        raise ValueError(f"expected a mapping, found {raw!r}")
    unknown = set(raw) - _SERVICE_KEYS
    if unknown:
        raise ValueError(f"unknown keys {sorted(map(str, unknown))}; allowed: {sorted(_SERVICE_KEYS)}")
    namespace, name = _string(raw, "namespace"), _string(raw, "name")
    cluster_ip = raw.get("clusterIP", "")
    if cluster_ip not in ("", "None"):
        cluster_ip = _ip(cluster_ip)
    raw_ports = raw.get("ports") or []
    if not isinstance(raw_ports, list):
        raise ValueError(f"'ports' must be a list of ports, found {raw_ports!r}")
    ports = tuple(_port(port) for port in raw_ports)
    if "selector" in raw and "endpoints" in raw:
        raise ValueError("give either 'selector' or 'endpoints', not both")
    in_namespace = [pod for pod in pods if pod.namespace == namespace]
    if "endpoints" in raw:
        wanted = raw["endpoints"] or []
        if not isinstance(wanted, list) or not all(isinstance(pod, str) for pod in wanted):
            raise ValueError(f"'endpoints' must be a list of pod names, found {wanted!r}")
        by_name = {pod.name: pod for pod in in_namespace}
        missing = [pod for pod in wanted if pod not in by_name]
        if missing:
            raise ValueError(f"endpoints {missing} are not pods of namespace {namespace} listed under 'pods'")
        members = [by_name[pod] for pod in wanted]
    else:
        selector = raw.get("selector") or {}
        if not isinstance(selector, dict) or not all(
            isinstance(key, str) and isinstance(value, str) for key, value in selector.items()
        ):
            raise ValueError(f"'selector' must map strings to strings, found {selector!r}")
        # As Kubernetes does: a Service without a selector gets no endpoints from pods.
        members = [
            pod
            for pod in in_namespace
            if selector and all(pod.labels.get(key) == value for key, value in selector.items())
        ]
    endpoints = tuple(
        ServiceEndpoint(ip=ip, pod=pod.name, node=pod.node)
        for pod in sorted(members, key=lambda pod: pod.name)
        if pod.phase == "Running"
        for ip in pod.ips
    )
    return Service(namespace, name, str(cluster_ip), ports, endpoints)


def _port(raw: Any) -> ServicePort:
    if not isinstance(raw, dict):
        raise ValueError(f"ports: expected a mapping, found {raw!r}")
    unknown = set(raw) - _PORT_KEYS
    if unknown:
        raise ValueError(f"ports: unknown keys {sorted(map(str, unknown))}; allowed: {sorted(_PORT_KEYS)}")
    port = _port_number("port", raw.get("port"))
    target = _port_number("targetPort", raw.get("targetPort", port))
    protocol = raw.get("protocol", "TCP")
    if protocol not in _PROTOCOLS:
        raise ValueError(f"ports: 'protocol' must be one of {sorted(_PROTOCOLS)}, found {protocol!r}")
    return ServicePort(name=str(raw.get("name", "")), port=port, target_port=target, protocol=protocol)


def _port_number(key: str, value: Any) -> int:
    # A named targetPort has no pod spec here to be resolved against: the file gives numbers.
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 65536:
        raise ValueError(f"ports: {key!r} must be a port number (1-65535), found {value!r}")
    return value


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
