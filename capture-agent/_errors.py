"""The agent's exceptions, one tree for everything the agent can refuse or fail at.

    AgentError
    ├── ResolveError            the pod cannot be mapped to a host-side device on this node
    │   ├── PodNotOnNode        no network namespace on this node holds the pod's IPs
    │   └── HostNetworkPod      the pod IP belongs to the node itself (hostNetwork)
    ├── CaptureError            tcpdump could not be started or failed while running
    ├── MissingPrivilege        the agent lacks a capability it needs (its securityContext is wrong)
    ├── InvalidCaptureRequest   the request is malformed (bad IP, empty IP list, ...)
    │   └── UnknownPodInterface the pod has no interface of the requested name
    └── UnknownCapture          no capture with that id on this node

The servicer maps this tree to gRPC status codes in one place, so every class here must mean one thing to a
caller: ``PodNotOnNode`` is "ask another node / the pod moved", ``HostNetworkPod`` is "there is no pod veth, capture
on a node interface instead", ``InvalidCaptureRequest`` is "fix your input", ``MissingPrivilege`` is "fix the
agent's deployment" (the message names the capability). Causes from the OS (a failed ``ip`` call, an errno from
netlink) are chained as ``__cause__`` rather than flattened into the message.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "AgentError",
    "CaptureError",
    "HostNetworkPod",
    "InvalidCaptureRequest",
    "MissingPrivilege",
    "PodNotOnNode",
    "ResolveError",
    "UnknownCapture",
    "UnknownPodInterface",
]


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""


class ResolveError(AgentError):
    """The pod's traffic cannot be tied to one host-side device on this node."""


class PodNotOnNode(ResolveError):
    """No network namespace reachable from this node's netns holds any of the pod's IPs.

    Usually the pod runs on another node (stale placement) or was deleted; it is never a reason to guess a device.
    """

    def __init__(self, node: str, ips: Sequence[str]) -> None:
        self.node = node
        self.ips = tuple(ips)
        super().__init__(f"no network namespace on node {node} holds pod IP {', '.join(self.ips)}")


class HostNetworkPod(ResolveError):
    """The pod IP is an address of the node's own netns, so the pod shares the node's interfaces."""

    def __init__(self, node: str, ip: str, interface: str) -> None:
        self.node = node
        self.ip = ip
        self.interface = interface
        super().__init__(
            f"pod IP {ip} is an address of node {node} itself (on {interface}): "
            "pod uses hostNetwork; there is no pod veth to capture on"
        )


class CaptureError(AgentError):
    """tcpdump could not be started, or stopped in a way that makes the capture unusable."""


class MissingPrivilege(AgentError):
    """The agent lacks a capability it needs for this step; the message names it. Nothing is left started.

    A misconfigured deployment (a capability missing from deploy/base/agent/daemonset.yaml), never a bug of the
    agent nor a fault of the request: retrying fails the same way until the agent runs with the capability.
    """


class InvalidCaptureRequest(AgentError):
    """The request cannot be acted on as given; retrying it unchanged will fail the same way."""


class UnknownCapture(AgentError):
    """No capture with that id exists on this node (never started here, or forgotten after an agent restart)."""


class PcapGone(AgentError):
    """The capture's pcap has left this node (stored, summarised and removed from the spool): it can no longer
    be streamed live, only downloaded from the store."""


class NodeLimitReached(AgentError):
    """The node may not take this capture now (concurrent captures, spool size, free disk); the message has the
    numbers."""


class UnknownPodInterface(InvalidCaptureRequest):
    """The pod found by its IP has no interface of the requested name; the message lists the ones it has, so the
    caller can correct the name (Multus pods call theirs ``net1``, ``net2``, ...)."""

    def __init__(self, interface: str, ip: str, available: Sequence[str]) -> None:
        self.interface = interface
        self.ip = ip
        self.available = tuple(available)
        super().__init__(
            f"the pod holding {ip} has no interface {interface!r}; it has {', '.join(self.available)}"
        )


class UnpairedPodInterface(InvalidCaptureRequest):
    """The interface the request names exists in the pod but has no peer device on the node (loopback, a macvlan
    or ipvlan device), so nothing on the node carries its traffic alone; the message says which of the pod's
    interfaces can be captured instead."""

    def __init__(self, interface: str, kind: str, ip: str, capturable: Sequence[str]) -> None:
        self.interface = interface
        self.capturable = tuple(capturable)
        super().__init__(
            f"interface {interface!r} ({kind}) of the pod holding {ip} has no peer device on the node, so it cannot "
            f"be captured from there; {_capturable(self.capturable)}"
        )


class UncapturablePod(ResolveError):
    """The pod's IP is on an interface with no peer device on the node (macvlan, ipvlan, SR-IOV CNIs): there is no
    host-side device that carries only this pod's traffic. A fact of the pod's network, not of the request."""

    def __init__(self, interface: str, kind: str, ip: str, capturable: Sequence[str]) -> None:
        self.interface = interface
        self.capturable = tuple(capturable)
        super().__init__(
            f"pod IP {ip} is on {interface} ({kind}), which has no peer device on the node (as with macvlan or "
            f"ipvlan CNIs): no host-side device carries only this pod's traffic; {_capturable(self.capturable)}"
        )


def _capturable(names: Sequence[str]) -> str:
    if not names:
        return "none of the pod's interfaces has a peer on the node"
    return f"the pod's interfaces with a peer on the node: {', '.join(names)} (choose one with --interface)"
