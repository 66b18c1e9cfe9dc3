"""Pod IP -> the host-side device that carries the pod's traffic, without asking the CNI or the container runtime.

This is the step an engineer does by hand with ``nsenter -t PID -n ip addr`` and ``eth0@ifNN``. Doing it from
kernel state alone keeps the agent working the same under docker, containerd and cri-o and with Calico, flannel,
Cilium or a bridge CNI: every pod has a network namespace, the pod's IP sits on one interface in it, and that
interface is one end of a pair whose other end lives in the node's netns.

Two facts shape the scan:

* ifindexes repeat across namespaces (every pod's ``eth0`` is 2), so the peer index alone can name the wrong
  device; the host-side device must also say its peer lives in *that* netns (``link_netnsid`` equal to the nsid
  our netns gave the candidate, see ``_netlink``), and its own peer index must point back at the pod interface.
* looking inside a namespace costs a subprocess (~3 ms), asking its nsid costs microseconds. Our own links name
  every netns they point into, so only candidates whose nsid is one of those are opened. That also keeps a node
  from ever answering for a pod of another node, even when (as in tests) it can see that pod's namespace.

The scan is a plain synchronous class: the servicer runs it in a worker thread. Candidate discovery, nsid lookup
and interface listing are separate steps so a later cache (by nsfs inode) can slot in between them.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from podcap.agent._errors import HostNetworkPod, InvalidCaptureRequest, PodNotOnNode, ResolveError
from podcap.agent._netlink import NsidLookup

__all__ = ["DEFAULT_NETNS_DIRS", "Interface", "Resolution", "Resolver", "list_interfaces"]

# Where runtimes bind-mount named namespaces: iproute2 and CNI plugins (/run/netns, /var/run/netns), dockerd.
DEFAULT_NETNS_DIRS = ("/run/netns", "/var/run/netns", "/var/run/docker/netns")
# The calling thread's netns: the agent's own, and the one our netlink socket and `ip` children live in.
_OWN_NETNS = "/proc/thread-self/ns/net"
# Device kinds that come in pairs, where `link_index` is the other end rather than a parent device.
_PAIRED_KINDS = frozenset({"veth", "netkit"})
_IP_TIMEOUT_S = 5.0

_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, kw_only=True)
class Resolution:
    """How a pod was mapped to a device on this node; mirrors ``podcap.api.v1.Resolution``."""

    interface: str
    ifindex: int
    strategy: str = "netns-scan"
    netns: str
    pod_interface: str
    pod_ifindex: int
    pod_mac: str
    pod_ip: str


@dataclass(frozen=True)
class Interface:
    """A device of the agent's netns; mirrors ``podcap.api.v1.Interface``.

    ``kind`` is the rtnetlink kind (veth, bridge, ...) or, for devices without one, the link type (loopback,
    ether). ``addresses`` are CIDR strings. ``peer_ifindex`` is the other end's index in its own netns for paired
    devices (veth, netkit), None otherwise.
    """

    name: str
    ifindex: int
    kind: str
    mac: str
    addresses: tuple[str, ...]
    peer_ifindex: int | None


@dataclass(frozen=True)
class _Link:
    """One row of ``ip -j -d addr show``, reduced to what resolution needs."""

    name: str
    ifindex: int
    kind: str
    mac: str
    addresses: tuple[tuple[_IPAddress, int], ...]
    link_index: int | None
    link_netnsid: int | None

    def public(self) -> Interface:
        return Interface(
            name=self.name,
            ifindex=self.ifindex,
            kind=self.kind,
            mac=self.mac,
            addresses=tuple(f"{ip}/{plen}" for ip, plen in self.addresses),
            peer_ifindex=self.link_index if self.kind in _PAIRED_KINDS else None,
        )


class _NetnsGone(Exception):
    """The candidate namespace disappeared between discovery and inspection (its pod was deleted)."""


def list_interfaces() -> list[Interface]:
    """The devices of the calling thread's netns, with addresses and veth peer indexes."""
    return [link.public() for link in _ip_links(None)]


class Resolver:
    """Finds the host-side device of a pod by scanning the network namespaces visible on this node.

    ``proc_root`` and ``netns_dirs`` say where to look for namespaces (a containerised agent may see the host's
    /proc elsewhere); ``node_name`` only goes into error messages.
    """

    def __init__(
        self,
        *,
        node_name: str | None = None,
        proc_root: str = "/proc",
        netns_dirs: Sequence[str] = DEFAULT_NETNS_DIRS,
    ) -> None:
        self._node = node_name or socket.gethostname()
        self._proc_root = proc_root
        self._netns_dirs = tuple(netns_dirs)

    def resolve(self, ips: Sequence[str]) -> Resolution:
        """The device on this node carrying the pod that holds any of ``ips`` (v4 or v6).

        Raises InvalidCaptureRequest for a malformed list, HostNetworkPod when an IP is the node's own,
        PodNotOnNode when no namespace linked to this node holds one, ResolveError when it is held but not
        behind a device pair with this node (ipvlan/macvlan pods) or when the scan itself fails.
        """
        wanted = _parse_ips(ips)
        own = _ip_links(None)
        for link in own:
            for addr, _ in link.addresses:
                if addr in wanted:
                    raise HostNetworkPod(self._node, wanted[addr], link.name)
        # (nsid of the peer's netns, our ifindex) -> our link, for every device whose other end is elsewhere.
        peers = {
            (link.link_netnsid, link.ifindex): link
            for link in own
            if link.link_netnsid is not None and link.link_index is not None
        }
        peer_nsids = {nsid for nsid, _ in peers}
        with NsidLookup() as lookup:
            for path in self._candidates():
                try:
                    nsid = lookup.nsid_of(path)
                except OSError:
                    continue  # gone, or a stale file in a netns dir that is not a namespace
                if nsid is None or nsid not in peer_nsids:
                    continue
                try:
                    pod_links = _ip_links(path)
                except _NetnsGone:
                    continue
                found = _match(pod_links, wanted, nsid, peers, path)
                if found is not None:
                    return found
        raise PodNotOnNode(self._node, list(wanted.values()))

    def list_interfaces(self) -> list[Interface]:
        """The devices of this node's netns (the calling thread's), as ``list_interfaces()``."""
        return list_interfaces()

    def _candidates(self) -> Iterator[str]:
        """Paths of every network namespace visible here, each namespace once, our own skipped.

        Named namespaces come first so a result names ``/run/netns/...`` rather than a PID that may be reused.
        """
        seen = {_netns_key(_OWN_NETNS)}
        for path in self._paths():
            try:
                key = _netns_key(path)
            except OSError:
                continue  # the process exited or the mount went away mid-scan
            if key not in seen:
                seen.add(key)
                yield path

    def _paths(self) -> Iterator[str]:
        for directory in self._netns_dirs:
            try:
                names = sorted(os.listdir(directory))
            except OSError:
                continue
            yield from (os.path.join(directory, name) for name in names)
        try:
            pids = sorted(int(name) for name in os.listdir(self._proc_root) if name.isdigit())
        except OSError:
            return
        yield from (os.path.join(self._proc_root, str(pid), "ns", "net") for pid in pids)


def _match(
    pod_links: list[_Link],
    wanted: dict[_IPAddress, str],
    nsid: int,
    peers: dict[tuple[int, int], _Link],
    path: str,
) -> Resolution | None:
    for pod_link in pod_links:
        hit = next((wanted[addr] for addr, _ in pod_link.addresses if addr in wanted), None)
        if hit is None:
            continue
        host = peers.get((nsid, pod_link.link_index)) if pod_link.link_index is not None else None
        if host is None or host.link_index != pod_link.ifindex:
            raise ResolveError(
                f"pod IP {hit} is on {pod_link.name} ({pod_link.kind}) in {path}, which is not paired with a "
                "device of this node's netns: no host-side device carries only this pod's traffic"
            )
        return Resolution(
            interface=host.name,
            ifindex=host.ifindex,
            netns=path,
            pod_interface=pod_link.name,
            pod_ifindex=pod_link.ifindex,
            pod_mac=pod_link.mac,
            pod_ip=hit,
        )
    return None


def _parse_ips(ips: Sequence[str]) -> dict[_IPAddress, str]:
    """Parsed IP -> the caller's spelling, so v6 compares by value and messages quote what was asked."""
    if isinstance(ips, str):
        raise InvalidCaptureRequest("pod IPs must be a list of addresses, not one string")
    if not ips:
        raise InvalidCaptureRequest("no pod IP given")
    parsed: dict[_IPAddress, str] = {}
    for ip in ips:
        try:
            parsed[ipaddress.ip_address(ip)] = ip
        except ValueError as exc:
            raise InvalidCaptureRequest(f"not an IP address: {ip!r}") from exc
    return parsed


def _netns_key(path: str) -> tuple[int, int]:
    """Identity of a namespace: the nsfs inode behind a path (``stat`` follows /proc's magic links)."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _ip_links(netns_path: str | None) -> list[_Link]:
    """``ip -j -d addr show`` in our netns (None) or, through nsenter, in the namespace at ``netns_path``."""
    argv = ["ip", "-j", "-d", "addr", "show"]
    if netns_path is not None:
        argv = ["nsenter", f"--net={netns_path}", *argv]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=_IP_TIMEOUT_S, check=False)
    except FileNotFoundError as exc:
        raise ResolveError(f"cannot list interfaces: {argv[0]} is not installed") from exc
    except subprocess.TimeoutExpired as exc:
        raise ResolveError(f"listing interfaces timed out after {_IP_TIMEOUT_S}s: {' '.join(argv)}") from exc
    if done.returncode != 0:
        if netns_path is not None:
            raise _NetnsGone(netns_path)
        raise ResolveError(f"listing interfaces failed: {done.stderr.strip()}")
    try:
        return [_parse_link(row) for row in json.loads(done.stdout or "[]")]
    except (ValueError, KeyError, TypeError) as exc:
        raise ResolveError(f"unexpected output from {' '.join(argv)}") from exc


def _parse_link(row: dict[str, Any]) -> _Link:
    linkinfo = row.get("linkinfo") or {}
    addresses = tuple(
        (ipaddress.ip_address(info["local"]), int(info.get("prefixlen", 0)))
        for info in row.get("addr_info", [])
        if "local" in info
    )
    link_index = row.get("link_index")
    link_netnsid = row.get("link_netnsid")
    return _Link(
        name=str(row["ifname"]),
        ifindex=int(row["ifindex"]),
        kind=str(linkinfo.get("info_kind") or row.get("link_type", "")),
        mac=str(row.get("address", "")),
        addresses=addresses,
        link_index=int(link_index) if link_index is not None else None,
        link_netnsid=int(link_netnsid) if link_netnsid is not None else None,
    )
