"""The inventory seam: where pods and node agents are looked up.

Two implementations stand behind `Inventory`: `KubernetesInventory` (the Kubernetes API through the official
client) for clusters and `StaticInventory` (a YAML file) for local runs and the simulated lab. The controller
only sees this interface; both raise the errors of `_errors.py` (PodNotFound, NoAgentOnNode, Forbidden,
Unavailable) with the client's exception chained.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

AGENT_LABEL = "app.kubernetes.io/name=podcap-agent"


@dataclass(frozen=True)
class ContainerStatus:
    name: str
    ready: bool
    restart_count: int = 0
    state: str = ""


@dataclass(frozen=True)
class Pod:
    """What the controller needs to know of a pod to capture it, and keeps with the capture."""

    namespace: str
    name: str
    node: str
    ips: tuple[str, ...]
    phase: str
    host_network: bool = False
    uid: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    containers: tuple[ContainerStatus, ...] = ()


@dataclass(frozen=True)
class ServicePort:
    name: str
    port: int
    target_port: int  # the endpoints' port (numeric; a named targetPort resolved through the EndpointSlice)
    protocol: str  # "TCP", "UDP"


@dataclass(frozen=True)
class ServiceEndpoint:
    ip: str
    pod: str  # the pod's name when the endpoint is a pod (targetRef), else ""
    node: str


@dataclass(frozen=True)
class Service:
    namespace: str
    name: str
    cluster_ip: str  # "" or "None" for a headless Service
    ports: tuple[ServicePort, ...]
    endpoints: tuple[ServiceEndpoint, ...]  # ready endpoints only


class Inventory(Protocol):
    """Blocking lookups; the async controller calls them in a worker thread."""

    def get_pod(self, namespace: str, name: str) -> Pod:
        """The pod, or PodNotFound naming it."""
        ...

    def list_pods(self, namespace: str, label_selector: str) -> list[Pod]:
        """Pods in `namespace` matching a Kubernetes label selector."""
        ...

    def running_pods(self, namespace: str) -> list[Pod]:
        """The Running pods of `namespace`, or of every namespace when it is empty, by namespace and name."""
        ...

    def agent_address(self, node: str) -> str:
        """`host:port` of the ready capture agent on `node`, or NoAgentOnNode naming the node."""
        ...

    def get_service(self, namespace: str, name: str) -> Service:
        """The Service and its ready endpoints; NotFound when there is no such Service."""
        ...
