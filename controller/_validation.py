"""Validation of a capture request, before any state exists: a refused request stores nothing and starts nothing.

Names must be what Kubernetes accepts (DNS-1123), the filter must compile with libpcap and may not carry a token
that tcpdump could read as an option, and the duration and limits must be within this controller's caps. A
`between` capture's ends are checked one by one and deduplicated; whether a Service end has pods is known only
once it is looked up, in `_captures.py`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from datetime import timedelta

from podcap.api.bpf import FilterError, check_filter

from . import _selectors
from ._errors import InvalidRequest

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_INTERFACE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,14}$")
_MAX_PACKETS = 2**31 - 1
_MAX_REASON = 1024
_MAX_REQUEST_ID = 128
_MAX_SELECTOR = 1024


@dataclass(frozen=True)
class CaptureLimitsCaps:
    """What this controller allows a capture to ask for."""

    max_duration: timedelta = timedelta(hours=1)
    max_snaplen: int = 262144
    # A label selector may match many pods; each is a tcpdump on some node.
    max_targets: int = 50


@dataclass(frozen=True)
class CaptureEnd:
    """One end of a `between` capture: a pod, or every ready endpoint pod of a Service."""

    namespace: str
    pod: str = ""
    service: str = ""

    def __str__(self) -> str:
        return f"{self.namespace}/{self.pod}" if self.pod else f"{self.namespace}/svc/{self.service}"


@dataclass(frozen=True)
class CaptureRequest:
    """A validated CreateCapture."""

    namespace: str
    pod: str
    filter: str
    duration: timedelta
    max_packets: int = 0
    max_bytes: int = 0
    snaplen: int = 0
    buffer_size: int = 0
    request_id: str = ""
    reason: str = ""
    label_selector: str = ""
    pod_interface: str = ""
    host_network: bool = False
    between: tuple[CaptureEnd, ...] = ()


def check_label(kind: str, value: str) -> None:
    """A DNS-1123 label (namespaces), e.g. `shop`."""
    if not value:
        raise InvalidRequest(f"{kind} is required")
    if len(value) > 63 or not _DNS1123_LABEL.match(value):
        raise InvalidRequest(
            f"{kind} {value[:80]!r} is not a valid DNS-1123 label (lower-case letters, digits and '-', "
            "at most 63 characters, starting and ending with a letter or digit)"
        )


def check_subdomain(kind: str, value: str) -> None:
    """A DNS-1123 subdomain (pod names), e.g. `checkout-7d9f.v2`."""
    if not value:
        raise InvalidRequest(f"{kind} is required")
    if len(value) > 253 or not all(_DNS1123_LABEL.match(part) for part in value.split(".")):
        raise InvalidRequest(
            f"{kind} {value[:80]!r} is not a valid DNS-1123 subdomain (lower-case letters, digits, '-' and '.', "
            "at most 253 characters)"
        )


def check_filter_expression(expression: str) -> None:
    try:
        check_filter(expression)
    except FilterError as exc:
        raise InvalidRequest(str(exc)) from exc


def validate(request: CaptureRequest, caps: CaptureLimitsCaps) -> CaptureRequest:
    """Returns the request if every field is acceptable, else raises InvalidRequest saying which and why."""
    if request.between:
        request = _validate_between(request)
        if len(request.between) > caps.max_targets:
            raise InvalidRequest(
                f"{len(request.between)} between ends; at most {caps.max_targets} per capture"
            )
    else:
        check_label("namespace", request.namespace)
        if request.pod and request.label_selector:
            raise InvalidRequest("give either a pod or a label_selector, not both")
        if request.label_selector:
            if len(request.label_selector) > _MAX_SELECTOR:
                raise InvalidRequest(f"label_selector is longer than {_MAX_SELECTOR} characters")
            try:
                _selectors.parse(request.label_selector)
            except ValueError as exc:
                raise InvalidRequest(str(exc)) from exc
        else:
            check_subdomain("pod", request.pod)
    if request.duration <= timedelta(0):
        raise InvalidRequest("duration must be above zero")
    if request.duration > caps.max_duration:
        raise InvalidRequest(
            f"duration {request.duration.total_seconds():g}s is above this controller's cap of "
            f"{caps.max_duration.total_seconds():g}s"
        )
    if request.max_packets < 0 or request.max_bytes < 0:
        raise InvalidRequest("max_packets and max_bytes may not be negative")
    if request.max_packets > _MAX_PACKETS:
        raise InvalidRequest(f"max_packets must be at most {_MAX_PACKETS} (tcpdump counts in a C int)")
    if not 0 <= request.snaplen <= caps.max_snaplen:
        raise InvalidRequest(f"snaplen must be between 0 (full packets) and {caps.max_snaplen}")
    if request.buffer_size < 0 or request.buffer_size % 1024:
        # tcpdump -B counts KiB; the node's agent enforces its own cap on the size.
        raise InvalidRequest("buffer_size must be a whole number of KiB (0 for the node's default)")
    if len(request.request_id) > _MAX_REQUEST_ID:
        raise InvalidRequest(f"request_id is longer than {_MAX_REQUEST_ID} characters")
    if len(request.reason) > _MAX_REASON:
        raise InvalidRequest(f"reason is longer than {_MAX_REASON} characters")
    if request.pod_interface and not _INTERFACE.match(request.pod_interface):
        raise InvalidRequest(f"pod_interface {request.pod_interface[:40]!r} is not a network interface name")
    check_filter_expression(request.filter)
    return request


def _validate_between(request: CaptureRequest) -> CaptureRequest:
    """The ends checked and without repeats, and `namespace` set to the first end's.

    Two ends at least, as it takes two to converse; one Service end alone is allowed, as its endpoints are ends
    of their own: whether it has two is known only once they are looked up (`_captures.py` refuses one)."""
    if request.pod or request.label_selector:
        raise InvalidRequest("give a pod, a label_selector or between ends, only one of them")
    ends: list[CaptureEnd] = []
    for index, end in enumerate(request.between):
        check_label(f"between[{index}] namespace", end.namespace)
        if bool(end.pod) == bool(end.service):
            raise InvalidRequest(f"between[{index}] ({end.namespace}) needs exactly one of pod and service")
        if end.pod:
            check_subdomain(f"between[{index}] pod", end.pod)
        else:
            check_label(f"between[{index}] service", end.service)
        if end not in ends:
            ends.append(end)
    if len(ends) < 2 and not ends[0].service:
        raise InvalidRequest(
            f"a between capture needs at least two ends (or a Service); got only {ends[0]}"
            + (" (the same end given twice)" if len(request.between) > 1 else "")
        )
    if request.namespace and request.namespace != ends[0].namespace:
        raise InvalidRequest(
            f"namespace {request.namespace!r} is not the first end's ({ends[0]}): leave it empty with between"
        )
    return replace(request, namespace=ends[0].namespace, between=tuple(ends))
