"""What the agent checks in a request before anything exists for it: no spool directory, no tcpdump, no upload.

The controller validates what a person asked for; the agent still refuses, on its own, what would hurt the node
if the controller had a bug or someone else reached the agent: a capture id that is not a plain directory name, an
object key that could leave the store, a packet count tcpdump cannot hold, a filter with a token
tcpdump could read as an option or that libpcap cannot compile (podcap.api.bpf, the controller's check: compiled
here, so no tcpdump is started only to refuse it, and every libpcap error is told apart from a tcpdump failure). Each refusal is InvalidCaptureRequest (INVALID_ARGUMENT) naming the field, and quotes at most the
start of what was sent, so a hostile value never becomes a huge or unreadable message.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence

from podcap.api import bpf

from ._errors import InvalidCaptureRequest

__all__ = ["check_capture_id", "check_filter", "check_pod", "check_start"]

# The controller sends "<32 hex>-<target index>"; the id names the capture's spool directory.
_CAPTURE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_MAX_KEY_BYTES = 1024  # S3's limit on a key
_MAX_IPS = 8  # Kubernetes gives a pod one IP per family
_MAX_IP = 64  # the longest IPv6 spelling with a zone id fits
_IFNAMSIZ = 16
_MAX_PACKETS = 2**31 - 1  # tcpdump's -c is a C int
_SHOWN = 40


def shown(value: str) -> str:
    """`value` quoted for a message: its start only, with Python's escapes for anything unprintable."""
    return repr(value[:_SHOWN]) + ("…" if len(value) > _SHOWN else "")


def check_capture_id(capture_id: str) -> None:
    if not _CAPTURE_ID.fullmatch(capture_id):
        raise InvalidCaptureRequest(
            f"capture_id {shown(capture_id)} is not a plain name (letters, digits, '.', '_' and '-', starting "
            "with a letter or digit, at most 128 characters)"
        )


def check_pod(ips: Sequence[str], pod_interface: str) -> None:
    """The pod's IPs and, if given, the name of its interface to capture."""
    if not ips:
        raise InvalidCaptureRequest("pod.ips is empty: the agent finds the pod by its IP")
    if len(ips) > _MAX_IPS:
        raise InvalidCaptureRequest(f"pod.ips holds {len(ips)} addresses; a pod has at most {_MAX_IPS}")
    for ip in ips:
        try:
            if len(ip) > _MAX_IP:
                raise ValueError(ip)
            ipaddress.ip_address(ip)
        except ValueError:
            raise InvalidCaptureRequest(f"pod.ips: {shown(ip)} is not an IP address") from None
    # The kernel's rules for a device name (dev_valid_name), and no NUL.
    if pod_interface and (
        len(pod_interface) >= _IFNAMSIZ
        or pod_interface in {".", ".."}
        or any(c in "/:\x00" or c.isspace() for c in pod_interface)
    ):
        raise InvalidCaptureRequest(f"pod_interface {shown(pod_interface)} is not a network interface name")


def check_filter(expression: str) -> None:
    """The whole filter check, libpcap compile included (podcap.api.bpf, the controller's own): it can block for
    seconds, so the servicer calls it from a worker thread, apart from `check_start`."""
    try:
        bpf.check_filter(expression)
    except bpf.FilterError as exc:
        raise InvalidCaptureRequest(str(exc)) from exc


def check_object_key(key: str) -> None:
    """A relative path inside the store, as the object store requires (podcap.storage's `check_key`), refused
    here before the capture rather than at its upload."""
    if not key:
        raise InvalidCaptureRequest("object_key is required")
    if len(key.encode()) > _MAX_KEY_BYTES:
        raise InvalidCaptureRequest(f"object_key is longer than {_MAX_KEY_BYTES} bytes")
    if (
        key.startswith("/")
        or "\\" in key
        or not key.isprintable()
        or any(segment in ("", ".", "..") for segment in key.split("/"))
    ):
        raise InvalidCaptureRequest(
            f"object_key {shown(key)} is not a relative path inside the store like 'a/b.pcap' (no leading "
            "'/', no '', '.' or '..' segments, no backslash or unprintable character)"
        )


def check_start(
    capture_id: str,
    ips: Sequence[str],
    pod_interface: str,
    object_key: str,
    max_packets: int,
) -> None:
    """Everything in a StartCapture that the agent checks before it touches the spool or runs anything (the
    duration and the other limits are checked against this node's bounds by the CaptureManager)."""
    check_capture_id(capture_id)
    check_pod(ips, pod_interface)
    check_object_key(object_key)
    if max_packets > _MAX_PACKETS:
        raise InvalidCaptureRequest(f"max_packets must be at most {_MAX_PACKETS} (tcpdump counts in a C int)")
