"""`podcap diagnose`: the ladder an engineer climbs by hand when a pod "can't talk" to HOST:PORT, run from inside
the pod's network namespace by its node's agent while a short capture of the pod records it.

The agent climbs the pod's rungs (its resolver, DNS with it, a TCP connect). When HOST names a Service (NAME in
the pod's namespace, NAME.NS, NAME.NS.svc, NAME.NS.svc.cluster.local), the controller, which knows the Service,
adds two more: its ClusterIP and one ready endpoint, connected to directly. Together they tell where it breaks:
a name that does not resolve is DNS; a ClusterIP that does not answer while the endpoint does is the Service's
plumbing (kube-proxy, its NAT rules); neither answering is the server or the network to it. What the controller
can tell without a packet (the Service has no ready endpoint, no such port) is a step too.

A diagnosis is authorised as a capture in the pod's namespace and audited as `diagnose` before anything is done
(the connections are made from inside someone's pod). The capture it starts is an ordinary one, through the
same use case (audited, listed, downloadable), filtered to what the ladder talks to, and the ladder is given the
capture's length to finish in, so that every packet it sends is in the pcap.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from dataclasses import dataclass, replace
from datetime import timedelta

from podcap.api.v1 import agent_pb2

from ._access import AccessControl, Action, Audited, Caller
from ._agents import AgentClients
from ._captures import Captures
from ._errors import InvalidRequest, NotFound
from ._inventory import Inventory, Service
from ._validation import CaptureLimitsCaps, CaptureRequest, check_label, check_subdomain, validate

__all__ = ["DEFAULT_DURATION", "DiagnoseRequest", "Diagnoses", "Diagnosis", "Step"]

DEFAULT_DURATION = timedelta(seconds=5)
# The capture runs on this long after the ladder's time is up, for the last answers to arrive.
_TAIL = timedelta(milliseconds=500)
_MIN_LADDER_S = 1.0
_MAX_NAME = 253
_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_KUBE_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_CLUSTER_DOMAIN = "cluster.local"


@dataclass(frozen=True)
class DiagnoseRequest:
    namespace: str
    pod: str
    host: str
    port: int
    duration: timedelta = timedelta(0)  # of the capture; 0 for DEFAULT_DURATION
    reason: str = ""


@dataclass(frozen=True)
class Step:
    """One rung; mirrors ``podcap.api.v1.DiagnoseStep``."""

    name: str
    ok: bool
    detail: str
    milliseconds: int = 0


@dataclass(frozen=True)
class Diagnosis:
    steps: tuple[Step, ...]
    capture_id: str


class Diagnoses:
    def __init__(
        self,
        captures: Captures,
        inventory: Inventory,
        agents: AgentClients,
        access: AccessControl,
        caps: CaptureLimitsCaps,
    ) -> None:
        self._captures = captures
        self._inventory = inventory
        self._agents = agents
        self._access = access
        self._caps = caps

    async def run(self, request: DiagnoseRequest, caller: Caller) -> Diagnosis:
        """Validates, authorises and audits; then starts the capture and climbs the ladder while it runs."""
        _check(request)
        duration = request.duration or DEFAULT_DURATION
        to = f"{request.host}:{request.port}"
        words = f"podcap diagnose {request.namespace}/{request.pod} --to {to}"
        capture = CaptureRequest(
            namespace=request.namespace,
            pod=request.pod,
            filter="",  # set once the Service is known; validated now for everything else
            duration=duration,
            reason=f"{words}: {request.reason}" if request.reason else words,
        )
        # Everything the capture would refuse is refused now, before an audit entry says it was allowed.
        await asyncio.to_thread(validate, capture, self._caps)
        await self._access.check(
            caller,
            Action.CAPTURE,
            request.namespace,
            Audited.DIAGNOSE,
            detail=f"pod {request.pod}, to {to}, {duration.total_seconds():g}s"
            + (f", reason {request.reason!r}" if request.reason else ""),
        )
        service = await self._service(request, caller)
        also, notes = _service_steps(service, request.port) if service is not None else ([], {})
        row = await self._captures.create(replace(capture, filter=_filter(request, also)), caller)
        target = row.targets[0]
        agent_steps = await self._agents.probe(
            target.agent_address,
            agent_pb2.PodRef(namespace=target.namespace, name=target.pod, ips=target.pod_ip.split(",")),
            request.host,
            request.port,
            also,
            deadline=max(_MIN_LADDER_S, (duration - _TAIL).total_seconds()),
        )
        steps = [Step(s.name, s.ok, s.detail, s.milliseconds) for s in agent_steps]
        probed = {step.name for step in steps}
        steps += [note for name, note in notes.items() if name not in probed]
        return Diagnosis(tuple(steps), row.id)

    async def _service(self, request: DiagnoseRequest, caller: Caller) -> Service | None:
        """The Service HOST names, if it names one that exists. One in another namespace is looked up only for a
        caller who may read there: its endpoints are not for everyone who may capture here."""
        ref = service_ref(request.host, request.namespace)
        if ref is None:
            return None
        namespace, name = ref
        if namespace != request.namespace and not await self._access.allows(caller, Action.READ, namespace):
            return None
        try:
            return await asyncio.to_thread(self._inventory.get_service, namespace, name)
        except NotFound:
            return None  # any other name: the agent's DNS step says what it is


def service_ref(host: str, namespace: str) -> tuple[str, str] | None:
    """(namespace, name) of the Service that HOST would name from a pod in `namespace`, by the cluster's DNS
    scheme; None when it cannot name one (an IP address, a name of another shape)."""
    if _is_ip(host):
        return None
    absolute = host.endswith(".")
    parts = host.rstrip(".").lower().split(".")
    if absolute and parts[2:] != ["svc", *_CLUSTER_DOMAIN.split(".")]:
        return None
    if len(parts) == 1:
        ref = (namespace, parts[0])
    elif len(parts) == 2 or parts[2:] in (["svc"], ["svc", *_CLUSTER_DOMAIN.split(".")]):
        ref = (parts[1], parts[0])
    else:
        return None
    return ref if all(_KUBE_LABEL.fullmatch(part) for part in ref) else None


def _service_steps(service: Service, port: int) -> tuple[list[agent_pb2.ProbeAddress], dict[str, Step]]:
    """The Service's addresses for the agent to connect to, and the steps that need no packet (no ClusterIP, no
    such port, no ready endpoint), by step name."""
    which = f"{service.namespace}/{service.name}"
    also: list[agent_pb2.ProbeAddress] = []
    notes: dict[str, Step] = {}
    served = next((p for p in service.ports if p.port == port and p.protocol == "TCP"), None)
    if served is None:
        has = ", ".join(f"{p.port}/{p.protocol}" for p in service.ports) or "none"
        notes["service"] = Step("service", False, f"Service {which} has no TCP port {port} (it has {has})")
        return also, notes
    if service.cluster_ip in ("", "None"):
        notes["service"] = Step(
            "service", True, f"Service {which} is headless (no ClusterIP): its name resolves to its endpoints"
        )
    else:
        also.append(
            agent_pb2.ProbeAddress(
                step="service", label=f"ClusterIP of {which}", address=service.cluster_ip, port=port
            )
        )
    endpoint = service.endpoints[0] if service.endpoints else None
    if endpoint is None:
        notes["endpoint"] = Step("endpoint", False, f"Service {which} has no ready endpoint")
    else:
        label = f"endpoint {endpoint.pod or endpoint.ip} of {which}" + (
            f" on {endpoint.node}" if endpoint.node else ""
        )
        also.append(
            agent_pb2.ProbeAddress(step="endpoint", label=label, address=endpoint.ip, port=served.target_port)
        )
    return also, notes


def _filter(request: DiagnoseRequest, also: list[agent_pb2.ProbeAddress]) -> str:
    """What the ladder talks to: the address (or, for a name, DNS and the port, wherever the name leads) and the
    Service's addresses."""
    terms = [f"host {request.host}"] if _is_ip(request.host) else ["port 53", f"tcp port {request.port}"]
    terms += [f"host {a.address}" for a in also]
    return " or ".join(dict.fromkeys(terms))


def _check(request: DiagnoseRequest) -> None:
    check_label("namespace", request.namespace)
    check_subdomain("pod", request.pod)
    host = request.host
    if not host:
        raise InvalidRequest("host is required: a DNS name or an IP address, as in --to checkout:80")
    bare = host[:-1] if host.endswith(".") else host
    if not _is_ip(host) and not (
        0 < len(bare) <= _MAX_NAME and all(_LABEL.fullmatch(label) for label in bare.split("."))
    ):
        raise InvalidRequest(f"host {host[:80]!r} is neither an IP address nor a DNS name")
    if not 1 <= request.port <= 65535:
        raise InvalidRequest(f"port must be a TCP port between 1 and 65535, not {request.port}")
    if request.duration < timedelta(0):
        raise InvalidRequest("capture_duration may not be negative")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return "%" not in text
