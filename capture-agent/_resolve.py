"""Pod IP -> the host-side device that carries the pod's traffic, without asking the CNI or the container runtime.

This is the step an engineer does by hand with ``nsenter -t PID -n ip addr`` and ``eth0@ifNN``. Doing it from
kernel state alone keeps the agent working the same under docker, containerd and cri-o and with Calico, flannel,
Cilium, the AWS VPC CNI or a bridge CNI: every pod has a network namespace, the pod's IP sits on one interface in
it, and that interface is one end of a pair whose other end lives in the node's netns. A route lookup would not
do: Cilium routes pod IPs via ``cilium_host`` and a bridge CNI via ``cni0``, neither of which is the pod's device.

A scan:

* lists the node's devices; a pod IP on one of them is a hostNetwork pod;
* gathers candidate namespaces from the netns dirs and ``/proc/*/ns/net``, each once (by nsfs inode), named
  ones first so an answer names ``/run/netns/...`` rather than a PID that may be reused;
* asks the kernel which nsid the node gave each candidate. Only namespaces some node device points into can hold
  a pod of this node; that also keeps a node from answering for another node's pod it can see (as in tests);
* reads those namespaces' devices over netlink from inside them (``_netlink.links_in``: no subprocess) and finds
  the interface holding the IP. The node device whose peer is that interface *in that nsid*, and which that
  interface names back as its peer, is the answer. Ifindexes repeat across namespaces (every pod's ``eth0`` is
  2), so the index alone could name another pod's device.

A full scan costs ~28 ms on a node with 200 pods (docs/bench.md), so it remembers the path of the namespace
that held each IP. A request for a remembered IP reads again only what its answer rests on: the node's addresses,
that namespace's devices, and the one node device they name as peer (~1.3 ms), and makes the same checks as a
scan, so a remembered answer is exactly as fresh as a scanned one (whatever namespace the path names by then).
Anything that does not check out (namespace gone, IP moved, device recreated) falls back to a full scan, which
replaces what was remembered. An IP not remembered always means a full scan, so a new pod is never reported
missing because of what was remembered.

The resolver is synchronous and thread-safe (the servicer calls it from worker threads): each call opens its own
netlink socket and the remembered map is replaced whole, never changed in place.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from podcap.agent._errors import (
    HostNetworkPod,
    InvalidCaptureRequest,
    MissingPrivilege,
    PodNotOnNode,
    ResolveError,
    UncapturablePod,
    UnknownPodInterface,
    UnpairedPodInterface,
)
from podcap.agent._netlink import IPAddress, Link, RouteSocket, links_in

__all__ = ["DEFAULT_NETNS_DIRS", "Interface", "Resolution", "Resolver", "list_interfaces"]

# Where runtimes bind-mount named namespaces: iproute2 and CNI plugins (/run/netns, /var/run/netns), dockerd.
DEFAULT_NETNS_DIRS = ("/run/netns", "/var/run/netns", "/var/run/docker/netns")
# The calling thread's netns: the agent's own, and the one our netlink sockets live in.
_OWN_NETNS = "/proc/thread-self/ns/net"
# Device kinds that come in pairs, where `link_index` is the other end rather than a parent device.
_PAIRED_KINDS = frozenset({"veth", "netkit"})
_SCANNED = "netns-scan"
_CACHED = "netns-scan (cached)"
# Namespaces held open at once while read; bounds the agent's fds on nodes with many pods.
_BATCH = 64
_IFNAMSIZ = 16
_CAP_SYS_PTRACE = 19  # linux/capability.h

_NetnsKey = tuple[int, int]
_NodeLink = Callable[[int], Link | None]


@dataclass(frozen=True, kw_only=True)
class Resolution:
    """How a pod was mapped to a device on this node; mirrors ``podcap.api.v1.Resolution``."""

    interface: str
    ifindex: int
    strategy: str = _SCANNED
    netns: str
    pod_interface: str
    pod_ifindex: int
    pod_mac: str
    pod_ip: str
    host_mac: str = ""  # absent from spool records written before it was recorded


@dataclass(frozen=True)
class Interface:
    """A device of the agent's netns; mirrors ``podcap.api.v1.Interface``.

    ``addresses`` are CIDR strings. ``peer_ifindex`` is the other end's index in its own netns for paired
    devices (veth, netkit), None otherwise.
    """

    name: str
    ifindex: int
    kind: str
    mac: str
    addresses: tuple[str, ...]
    peer_ifindex: int | None


@dataclass(frozen=True)
class _PodNetns:
    path: str  # where the namespace was found
    nsid: int  # the id the node gave this namespace, as its devices' link_netnsid says
    links: list[Link]


def list_interfaces() -> list[Interface]:
    """The devices of the calling thread's netns, with addresses and veth peer indexes."""
    try:
        with RouteSocket() as rtnl:
            links = rtnl.links()
    except OSError as exc:
        raise ResolveError(f"cannot list this node's interfaces: {exc}") from exc
    return [_public(link) for link in links]


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
        self._seen: dict[IPAddress, str] = {}  # pod IP -> path of its namespace at the last full scan

    def resolve(self, ips: Sequence[str], pod_interface: str = "") -> Resolution:
        """The device on this node carrying the pod that holds any of ``ips`` (v4 or v6).

        With ``pod_interface`` (Multus pods: ``net1``, ...), the pod is still found by its IPs but the answer is
        the node-side peer of that interface of the pod.

        Raises InvalidCaptureRequest for a malformed request, UnknownPodInterface when the pod has no
        ``pod_interface`` and UnpairedPodInterface when it has no peer on the node (``lo``), HostNetworkPod when
        an IP is the node's own, PodNotOnNode when no namespace linked to this node holds one, UncapturablePod
        when the pod IP's interface has no peer on the node (ipvlan/macvlan pods), ResolveError when reading
        kernel state fails. MissingPrivilege when the agent may not enter namespaces
        (setns without CAP_SYS_ADMIN), or when it lacks CAP_SYS_PTRACE and no namespace it could open holds the
        IPs while some could not be opened (``/proc/<pid>/ns/net`` of other containers' processes): the pod may
        well be in one of those. (With CAP_SYS_PTRACE a refusal comes from elsewhere, an LSM say, and is skipped
        as before.)
        """
        wanted = _parse_ips(ips)
        _check_interface_name(pod_interface)
        try:
            with RouteSocket() as rtnl:
                self._refuse_host_network(rtnl, wanted)
                remembered = self._seen
                hinted = list(dict.fromkeys(remembered[ip] for ip in wanted if ip in remembered))
                if hinted:
                    # Read again exactly what the answer rests on: that namespace, and the node device its
                    # interface names as peer (asked by ifindex: a node has hundreds of devices to list).
                    found = _first_match(self._read(rtnl, hinted, None), wanted, rtnl.link, pod_interface)
                    if found is not None:
                        return replace(found, strategy=_CACHED)
                own = {link.ifindex: link for link in rtnl.links()}
                peer_nsids = {link.link_netnsid for link in own.values() if link.link_netnsid is not None}
                denied: list[str] = []
                scanned = self._read(rtnl, self._candidates(denied), peer_nsids, denied)
        except PermissionError as exc:  # setns(2), in links_in: an open() refused is skipped and counted
            raise MissingPrivilege(
                f"cannot read network namespaces on node {self._node}: {exc.strerror}; "
                "the agent needs CAP_SYS_ADMIN"
            ) from exc
        except OSError as exc:
            raise ResolveError(f"cannot read network namespaces on node {self._node}: {exc}") from exc
        self._seen = _remember(scanned)
        found = _first_match(scanned, wanted, own.get, pod_interface)
        if found is None:
            not_here = PodNotOnNode(self._node, list(wanted.values()))
            if not denied or _has_capability(_CAP_SYS_PTRACE):
                raise not_here
            raise MissingPrivilege(
                f"{not_here} ({len(denied)} network namespace paths could not be opened: permission denied; "
                "the agent needs CAP_SYS_PTRACE to open /proc/<pid>/ns/net of other containers' processes)"
            )
        return found

    def netns_alive(self, resolution: Resolution) -> bool:
        """Whether the pod behind ``resolution`` still exists: its namespace is at ``resolution.netns`` and the
        node device is still paired with the same interface in it. Cheap (two netlink requests, no scan), for
        polling during a capture: a deleted pod's namespace disappears and takes its veth pair with it.
        """
        try:
            fd = os.open(resolution.netns, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False  # the name was removed or the process holding it exited
        try:
            with RouteSocket() as rtnl:
                try:
                    nsid = rtnl.nsid_of_fd(fd)
                except OSError:
                    return False  # the path names something that is no network namespace any more
                host = rtnl.link(resolution.ifindex)
        except OSError as exc:
            raise ResolveError(f"cannot check the network namespace {resolution.netns}: {exc}") from exc
        finally:
            os.close(fd)
        return (
            nsid is not None
            and host is not None
            and host.link_netnsid == nsid
            and host.link_index == resolution.pod_ifindex
        )

    def list_interfaces(self) -> list[Interface]:
        """The devices of this node's netns (the calling thread's), as ``list_interfaces()``."""
        return list_interfaces()

    def _refuse_host_network(self, rtnl: RouteSocket, wanted: dict[IPAddress, str]) -> None:
        for ifindex, addresses in rtnl.addresses().items():
            for addr, _ in addresses:
                if addr in wanted:
                    link = rtnl.link(ifindex)
                    raise HostNetworkPod(
                        self._node, wanted[addr], link.name if link else f"ifindex {ifindex}"
                    )

    def _read(
        self,
        rtnl: RouteSocket,
        paths: Iterable[str],
        peer_nsids: set[int] | None,
        denied: list[str] | None = None,
    ) -> list[_PodNetns]:
        """The devices of the namespaces at ``paths`` (with ``peer_nsids``: only those some node device points
        into), each read while its file is held open (an open namespace stays alive, so its nsid cannot be
        handed to another namespace meanwhile). Paths the agent may not open are added to ``denied``."""
        out: list[_PodNetns] = []
        batch: list[tuple[str, int, int]] = []  # path, open fd, nsid
        try:
            for path in paths:
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except PermissionError:
                    if denied is not None:
                        denied.append(path)
                    continue
                except OSError:
                    continue  # the pod was deleted, or its process exited, since it was listed
                keep = False
                try:
                    nsid = _nsid(rtnl, fd)
                    if nsid is not None and (peer_nsids is None or nsid in peer_nsids):
                        batch.append((path, fd, nsid))
                        keep = True
                finally:
                    if not keep:
                        os.close(fd)
                if len(batch) == _BATCH:
                    out += _read_batch(batch)
            out += _read_batch(batch)
        finally:
            for _, fd, _ in batch:
                os.close(fd)
        return out

    def _candidates(self, denied: list[str]) -> Iterator[str]:
        """Every network namespace visible here, each once, our own skipped; paths the agent may not look at
        (another user's process, without CAP_SYS_PTRACE) are added to ``denied``."""
        seen = {_netns_key(_OWN_NETNS)}
        for path in self._paths():
            try:
                key = _netns_key(path)
            except PermissionError:
                denied.append(path)
                continue
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


def _read_batch(batch: list[tuple[str, int, int]]) -> list[_PodNetns]:
    """Read the batch's namespaces, close their files and empty the batch."""
    try:
        contents = links_in([fd for _, fd, _ in batch])
        return [_PodNetns(path, nsid, links) for (path, _, nsid), links in zip(batch, contents, strict=True)]
    finally:
        for _, fd, _ in batch:
            os.close(fd)
        batch.clear()


def _first_match(
    pods: list[_PodNetns], wanted: dict[IPAddress, str], node_link: _NodeLink, pod_interface: str
) -> Resolution | None:
    for pod in pods:
        found = _match(pod, wanted, node_link, pod_interface)
        if found is not None:
            return found
    return None


def _match(
    pod: _PodNetns, wanted: dict[IPAddress, str], node_link: _NodeLink, pod_interface: str
) -> Resolution | None:
    """The resolution if ``pod`` holds a wanted IP; ``node_link`` gives the node's device by ifindex."""
    holder, hit = next(
        ((link, wanted[addr]) for link in pod.links for addr, _ in link.addresses if addr in wanted),
        (None, ""),
    )
    if holder is None:
        return None
    target = holder
    if pod_interface:
        named = next((link for link in pod.links if link.name == pod_interface), None)
        if named is None:
            raise UnknownPodInterface(pod_interface, hit, [link.name for link in pod.links])
        target = named
    host = _peer(pod, target, node_link)
    if host is None:
        capturable = [link.name for link in pod.links if _peer(pod, link, node_link) is not None]
        if target is holder:
            raise UncapturablePod(target.name, target.kind, hit, capturable)
        raise UnpairedPodInterface(target.name, target.kind, hit, capturable)
    return Resolution(
        interface=host.name,
        ifindex=host.ifindex,
        netns=pod.path,
        pod_interface=target.name,
        pod_ifindex=target.ifindex,
        pod_mac=target.mac,
        pod_ip=hit,
        host_mac=host.mac,
    )


def _peer(pod: _PodNetns, link: Link, node_link: _NodeLink) -> Link | None:
    """The node's device paired with the pod's `link` (a veth's other end), or None."""
    host = node_link(link.link_index) if link.link_index is not None else None
    if host is None or host.link_netnsid != pod.nsid or host.link_index != link.ifindex:
        return None
    return host


def _remember(pods: list[_PodNetns]) -> dict[IPAddress, str]:
    """Pod IP -> namespace, the first holder winning as in a scan; loopback and link-local are in every pod."""
    seen: dict[IPAddress, str] = {}
    for pod in pods:
        for link in pod.links:
            for addr, _ in link.addresses:
                if not (addr.is_loopback or addr.is_link_local):
                    seen.setdefault(addr, pod.path)
    return seen


def _nsid(rtnl: RouteSocket, fd: int) -> int | None:
    try:
        return rtnl.nsid_of_fd(fd)
    except OSError:
        return None  # not a network namespace: a stray file in a netns dir


def _parse_ips(ips: Sequence[str]) -> dict[IPAddress, str]:
    """Parsed IP -> the caller's spelling, so v6 compares by value and messages quote what was asked."""
    if isinstance(ips, str):
        raise InvalidCaptureRequest("pod IPs must be a list of addresses, not one string")
    if not ips:
        raise InvalidCaptureRequest("no pod IP given")
    parsed: dict[IPAddress, str] = {}
    for ip in ips:
        try:
            parsed[ipaddress.ip_address(ip)] = ip
        except ValueError as exc:
            raise InvalidCaptureRequest(f"not an IP address: {ip!r}") from exc
    return parsed


def _check_interface_name(name: str) -> None:
    """The kernel's rules for a device name (dev_valid_name), so a typo is refused before any scan."""
    if name and (
        len(name) >= _IFNAMSIZ or name in {".", ".."} or any(c in "/:" or c.isspace() for c in name)
    ):
        raise InvalidCaptureRequest(f"not a network interface name: {name!r}")


def _has_capability(bit: int) -> bool:
    """Whether this process holds capability ``bit`` (linux/capability.h) in its effective set; True when procfs
    cannot say, so that nothing is blamed on a capability without knowing."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return True
    effective = next(
        (int(line.split()[1], 16) for line in status.splitlines() if line.startswith("CapEff:")), -1
    )
    return effective < 0 or bool(effective >> bit & 1)


def _netns_key(path: str) -> _NetnsKey:
    """Identity of a namespace: the nsfs inode behind a path (``stat`` follows /proc's magic links)."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _public(link: Link) -> Interface:
    return Interface(
        name=link.name,
        ifindex=link.ifindex,
        kind=link.kind,
        mac=link.mac,
        addresses=tuple(f"{ip}/{plen}" for ip, plen in link.addresses),
        peer_ifindex=link.link_index if link.kind in _PAIRED_KINDS else None,
    )
