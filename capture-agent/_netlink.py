"""rtnetlink spoken directly: what nsid this netns gave another one; the links, addresses, routes, neighbours and
device counters of a netns.

Resolution reads the devices of the node and of every pod namespace that a node device points into. Doing that
with ``ip -j`` costs a subprocess per namespace (~3.4 ms, so ~0.7 s on a node with 200 pods) and pyroute2 costs
~200 ms to import; the three requests needed here (RTM_GETNSID, RTM_GETLINK, RTM_GETADDR) are a few ``struct``
formats, so they are written out. A capture's network context (_context.py) asks the same way for a pod's routes
(RTM_GETROUTE), neighbours (RTM_GETNEIGH) and one device's counters (IFLA_STATS64), twice per capture.

Interface indexes are only unique inside one netns (every pod's ``eth0`` is ifindex 2), so a veth names its peer
by ifindex *and* ``link_netnsid``: the id the veth's own netns gave the netns the peer lives in. RTM_GETNSID asks
for that id by namespace file descriptor and never allocates one: a namespace none of our links points into
answers -1, reported as None.

A netlink socket lists the namespace it was created in, and setns(2) moves only the calling thread. So
``links_in`` reads pod namespaces from one short-lived thread that enters them in turn (~12 µs each), makes a
socket in each and ends: no thread of the agent is ever left inside a pod. The kernel's other way,
IFLA_TARGET_NETNSID, needs no thread but makes the kernel allocate the node an nsid for itself as soon as it
describes a pod's veth (whose peer is the node), and needs Linux 4.20; entering the namespace changes nothing in
it.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import itertools
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TypeVar

__all__ = [
    "Counters",
    "IPAddress",
    "Link",
    "Neighbour",
    "Route",
    "RouteSocket",
    "links_in",
    "read_in",
    "socket_in",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
T = TypeVar("T")

_NETLINK_ROUTE = 0
_CLONE_NEWNET = 0x40000000
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_NLM_F_DUMP_INTR = 0x10  # the dump raced with a change: its content may be inconsistent, ask again
_RTM_NEWLINK, _RTM_GETLINK = 16, 18
_RTM_NEWADDR, _RTM_GETADDR = 20, 22
_RTM_NEWROUTE, _RTM_GETROUTE = 24, 26
_RTM_NEWNEIGH, _RTM_GETNEIGH = 28, 30
_RTM_NEWNSID, _RTM_GETNSID = 88, 90
_IFLA_ADDRESS, _IFLA_IFNAME, _IFLA_LINK, _IFLA_LINKINFO = 1, 3, 5, 18
_IFLA_STATS64, _IFLA_EXT_MASK, _IFLA_LINK_NETNSID = 23, 29, 37
_IFLA_INFO_KIND = 1
_RTEXT_FILTER_SKIP_STATS = 1 << 3  # statistics are most of a link message and of its parsing time
_IFA_ADDRESS, _IFA_LOCAL = 1, 2
_NETNSA_NSID, _NETNSA_FD = 1, 3
_RTA_DST, _RTA_OIF, _RTA_GATEWAY, _RTA_PRIORITY, _RTA_PREFSRC, _RTA_TABLE = 1, 4, 5, 6, 7, 15
_NDA_DST, _NDA_LLADDR = 1, 2
_NSID_NOT_ASSIGNED = -1
_DUMP_TRIES = 5
_TIMEOUT_S = 5.0
_LINK_ATTRS = frozenset({_IFLA_ADDRESS, _IFLA_IFNAME, _IFLA_LINK, _IFLA_LINKINFO, _IFLA_LINK_NETNSID})
_KIND_ATTRS = frozenset({_IFLA_INFO_KIND})
_ADDRESS_ATTRS = frozenset({_IFA_ADDRESS, _IFA_LOCAL})
_NSID_ATTRS = frozenset({_NETNSA_NSID})
_ROUTE_ATTRS = frozenset({_RTA_DST, _RTA_OIF, _RTA_GATEWAY, _RTA_PRIORITY, _RTA_PREFSRC, _RTA_TABLE})
_NEIGH_ATTRS = frozenset({_NDA_DST, _NDA_LLADDR})
_STATS_ATTRS = frozenset({_IFLA_STATS64})
# Link types `ip` names when a device has no rtnetlink kind (if_arp.h); anything else shows its number.
_LINK_TYPES = {1: "ether", 772: "loopback", 768: "ipip", 776: "sit", 778: "gre", 65534: "none"}

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_RTGENMSG = struct.Struct("=B3x")  # struct rtgenmsg padded to 4 bytes (NLMSG_ALIGN)
_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope, type, flags
_NDMSG = struct.Struct("=BxxxiHBB")  # family, ifindex, state, flags, type
_STATS64 = struct.Struct("=8Q")  # the first eight fields of struct rtnl_link_stats64, in its order
_NLATTR = struct.Struct("=HH")  # len, type
_U32 = struct.Struct("=I")
_S32 = struct.Struct("=i")
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class Link:
    """One device of a netns, reduced to what resolution needs.

    ``kind`` is the rtnetlink kind (veth, bridge, ...) or, without one, the link type (loopback, ether).
    ``link_index`` is IFLA_LINK: the peer's ifindex for veth/netkit, the parent's for vlan/macvlan/ipvlan.
    ``link_netnsid`` is set when that device lives in another netns: the id this netns gave that one.
    """

    name: str
    ifindex: int
    kind: str
    mac: str
    addresses: tuple[tuple[IPAddress, int], ...]
    link_index: int | None
    link_netnsid: int | None


@dataclass(frozen=True)
class Route:
    """One route as the kernel keeps it; ``table`` 254 is main (what ``ip route`` shows), 255 local."""

    family: int
    destination: IPAddress | None  # None for a default route
    prefix_length: int
    gateway: IPAddress | None
    ifindex: int | None
    source: IPAddress | None  # the preferred source address (RTA_PREFSRC)
    metric: int | None
    table: int
    protocol: int  # RTPROT_*: 2 kernel, 3 boot, 4 static, ...
    scope: int  # RT_SCOPE_*: 0 universe, 253 link, 254 host
    type: int  # RTN_*: 1 unicast, 2 local, 5 multicast, 6 blackhole, ...


@dataclass(frozen=True)
class Neighbour:
    """One neighbour (ARP / NDP) entry; ``state`` is the NUD_* bit set."""

    address: IPAddress
    ifindex: int
    mac: str  # "" while unresolved
    state: int


@dataclass(frozen=True)
class Counters:
    """A device's packet counters since it was created (rtnl_link_stats64)."""

    rx_packets: int
    tx_packets: int
    rx_bytes: int
    tx_bytes: int
    rx_errors: int
    tx_errors: int
    rx_dropped: int
    tx_dropped: int


class RouteSocket:
    """A NETLINK_ROUTE socket in the creating thread's netns; every answer describes that netns.

    Cheap to open (~10 µs); not thread-safe, so each call that needs one opens its own.
    """

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, _NETLINK_ROUTE)
        try:
            self._sock.settimeout(_TIMEOUT_S)  # the kernel answers at once; never hang a resolution on it
            self._sock.bind((0, 0))
        except OSError:
            self._sock.close()
            raise
        self._seq = itertools.count(1)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> RouteSocket:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def nsid_of(self, netns_path: str) -> int | None:
        """The nsid our netns gave the netns at ``netns_path``, or None when it gave none.

        Raises OSError when the path cannot be opened or is not a network namespace.
        """
        fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return self.nsid_of_fd(fd)
        finally:
            os.close(fd)

    def nsid_of_fd(self, netns_fd: int) -> int | None:
        """As ``nsid_of``, for an open namespace file (which keeps the namespace, and so its nsid, alive)."""
        attr = _attr(_NETNSA_FD, _U32.pack(netns_fd))
        for msg_type, payload in self._ask(_RTM_GETNSID, _RTGENMSG.pack(socket.AF_UNSPEC) + attr):
            if msg_type == _RTM_NEWNSID:
                attrs = _attrs(payload, _RTGENMSG.size, _NSID_ATTRS)
                nsid = _S32.unpack(attrs.get(_NETNSA_NSID, _S32.pack(_NSID_NOT_ASSIGNED)))[0]
                return None if nsid == _NSID_NOT_ASSIGNED else int(nsid)
        return None

    def links(self) -> list[Link]:
        """Every device of this netns with its addresses, by ifindex."""
        rows = self._dump(
            _RTM_GETLINK, _ifinfomsg(0) + _attr(_IFLA_EXT_MASK, _U32.pack(_RTEXT_FILTER_SKIP_STATS))
        )
        addresses = self.addresses()
        return sorted((_parse_link(payload, addresses) for payload in rows), key=lambda link: link.ifindex)

    def addresses(self) -> dict[int, list[tuple[IPAddress, int]]]:
        """ifindex -> (address, prefix length) of every address in this netns (a dump much smaller than links)."""
        out: dict[int, list[tuple[IPAddress, int]]] = {}
        for payload in self._dump(_RTM_GETADDR, _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)):
            address = _parse_address(payload)
            if address is not None:
                out.setdefault(address[0], []).append(address[1:])
        return out

    def routes(self) -> list[Route]:
        """Every IPv4 and IPv6 route of this netns, of every table."""
        body = _RTMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0, 0, 0, 0, 0)
        routes = (_parse_route(payload) for payload in self._dump(_RTM_GETROUTE, body))
        return [route for route in routes if route is not None]

    def neighbours(self) -> list[Neighbour]:
        """Every IPv4 and IPv6 neighbour entry of this netns."""
        body = _NDMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        neighbours = (_parse_neighbour(payload) for payload in self._dump(_RTM_GETNEIGH, body))
        return [neighbour for neighbour in neighbours if neighbour is not None]

    def counters(self, ifindex: int) -> Counters | None:
        """The counters of the device with ``ifindex``, or None when there is none."""
        try:
            for msg_type, payload in self._ask(_RTM_GETLINK, _ifinfomsg(ifindex)):
                if msg_type == _RTM_NEWLINK:
                    stats = _attrs(payload, _IFINFOMSG.size, _STATS_ATTRS).get(_IFLA_STATS64)
                    if stats is None or len(stats) < _STATS64.size:
                        return None
                    return Counters(*_STATS64.unpack_from(stats))
        except OSError as exc:
            if exc.errno == errno.ENODEV:
                return None
            raise
        return None

    def link(self, ifindex: int) -> Link | None:
        """The device with ``ifindex`` (without addresses), or None when there is none."""
        try:
            for msg_type, payload in self._ask(_RTM_GETLINK, _ifinfomsg(ifindex)):
                if msg_type == _RTM_NEWLINK:
                    return _parse_link(payload, {})
        except OSError as exc:
            if exc.errno == errno.ENODEV:
                return None
            raise
        return None

    def _ask(self, msg_type: int, body: bytes) -> Iterator[tuple[int, bytes]]:
        """Send one request; yield (type, payload) of its answers until an error or the end of the datagram."""
        seq = next(self._seq)
        self._sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), msg_type, _NLM_F_REQUEST, seq, 0) + body)
        while True:
            answered = False
            for reply_type, _flags, reply_seq, payload in _messages(self._sock.recv(65536)):
                if reply_seq != seq:
                    continue  # a late answer to an earlier request that raised; not ours
                answered = True
                _raise_error(reply_type, payload)
                yield reply_type, payload
            if answered:
                return

    def _dump(self, msg_type: int, body: bytes) -> list[bytes]:
        """The payloads of a whole dump, asked again when the kernel says a change interrupted it."""
        for _ in range(_DUMP_TRIES):
            seq = next(self._seq)
            header = _NLMSGHDR.pack(
                _NLMSGHDR.size + len(body), msg_type, _NLM_F_REQUEST | _NLM_F_DUMP, seq, 0
            )
            self._sock.send(header + body)
            payloads: list[bytes] = []
            interrupted = done = False
            while not done:
                for reply_type, flags, reply_seq, payload in _messages(self._sock.recv(65536)):
                    if reply_seq != seq:
                        continue
                    interrupted |= bool(flags & _NLM_F_DUMP_INTR)
                    _raise_error(reply_type, payload)
                    if reply_type == _NLMSG_DONE:
                        done = True
                        break
                    payloads.append(payload)
            if not interrupted:
                return payloads
        raise OSError(errno.EINTR, f"netlink dump interrupted by changes {_DUMP_TRIES} times in a row")


def links_in(netns_fds: Sequence[int]) -> list[list[Link]]:
    """The links of each namespace in ``netns_fds`` (open nsfs files), read from inside it.

    One thread enters the namespaces in turn and ends after the last, whatever happens; the first error
    (EPERM without CAP_SYS_ADMIN, EINVAL for a file that is not a network namespace) is raised here.
    """
    if not netns_fds:
        return []
    results: list[list[Link]] = []
    errors: list[BaseException] = []

    def visit() -> None:
        try:
            for fd in netns_fds:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into a pod network namespace: {os.strerror(err)}")
                with RouteSocket() as rtnl:
                    results.append(rtnl.links())
        except BaseException as exc:  # handed to the calling thread
            errors.append(exc)

    thread = threading.Thread(target=visit, name="podcap-netns-visit", daemon=True)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return results


def read_in(netns_fd: int | None, read: Callable[[RouteSocket], T]) -> T:
    """``read`` with a RouteSocket of the namespace ``netns_fd`` (an open nsfs file; None: our own netns).

    As in ``links_in``, a short-lived thread enters the namespace, makes the socket, reads and ends.
    """
    if netns_fd is None:
        with RouteSocket() as rtnl:
            return read(rtnl)
    results: list[T] = []
    errors: list[BaseException] = []

    def visit() -> None:
        try:
            if _libc.setns(netns_fd, _CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns into a pod network namespace: {os.strerror(err)}")
            with RouteSocket() as rtnl:
                results.append(read(rtnl))
        except BaseException as exc:  # handed to the calling thread
            errors.append(exc)

    thread = threading.Thread(target=visit, name="podcap-netns-read", daemon=True)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return results[0]


def socket_in(netns_fd: int, family: int, kind: int) -> socket.socket:
    """A new socket in the namespace ``netns_fd`` (an open nsfs file), for the caller to use from any thread.

    A socket stays in the namespace it was created in, so a short-lived thread enters the namespace, makes the
    socket and ends, as in ``links_in``: the agent talks from inside a pod without leaving a thread there.
    """
    made: list[socket.socket] = []
    errors: list[BaseException] = []

    def make() -> None:
        try:
            if _libc.setns(netns_fd, _CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns into a pod network namespace: {os.strerror(err)}")
            made.append(socket.socket(family, kind | socket.SOCK_CLOEXEC))
        except BaseException as exc:  # handed to the calling thread
            errors.append(exc)

    thread = threading.Thread(target=make, name="podcap-netns-socket", daemon=True)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return made[0]


def _ifinfomsg(ifindex: int) -> bytes:
    return _IFINFOMSG.pack(socket.AF_UNSPEC, 0, ifindex, 0, 0)


def _attr(attr_type: int, value: bytes) -> bytes:
    return _NLATTR.pack(_NLATTR.size + len(value), attr_type) + value + b"\0" * (-len(value) % 4)


def _messages(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """Split one datagram into (type, flags, seq, payload) netlink messages."""
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, msg_type, flags, seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size:
            return
        yield msg_type, flags, seq, data[offset + _NLMSGHDR.size : offset + length]
        offset += (length + 3) & ~3


def _raise_error(msg_type: int, payload: bytes) -> None:
    """NLMSG_ERROR with an errno, or a dump whose NLMSG_DONE carries one, becomes OSError."""
    if msg_type in (_NLMSG_ERROR, _NLMSG_DONE) and len(payload) >= _S32.size:
        (err,) = _S32.unpack_from(payload)
        if err < 0:
            raise OSError(-err, f"rtnetlink: {os.strerror(-err)}")


def _attrs(payload: bytes, offset: int, wanted: frozenset[int]) -> dict[int, bytes]:
    """The ``wanted`` attributes after a fixed header, by type (NLA_F_NESTED / NLA_F_NET_BYTEORDER stripped).

    A link message has ~35 attributes and a node hundreds of links: copying only the few used matters.
    """
    out = {}
    end = len(payload)
    unpack = _NLATTR.unpack_from
    while offset + 4 <= end:
        length, attr_type = unpack(payload, offset)
        if length < 4:
            break
        if attr_type & 0x3FFF in wanted:
            out[attr_type & 0x3FFF] = payload[offset + 4 : offset + length]
        offset += (length + 3) & ~3
    return out


def _parse_link(payload: bytes, addresses: dict[int, list[tuple[IPAddress, int]]]) -> Link:
    _family, link_type, ifindex, _flags, _change = _IFINFOMSG.unpack_from(payload)
    attrs = _attrs(payload, _IFINFOMSG.size, _LINK_ATTRS)
    kind = _attrs(attrs.get(_IFLA_LINKINFO, b""), 0, _KIND_ATTRS).get(_IFLA_INFO_KIND, b"").rstrip(b"\0")
    link = attrs.get(_IFLA_LINK)
    netnsid = attrs.get(_IFLA_LINK_NETNSID)
    return Link(
        name=attrs.get(_IFLA_IFNAME, b"").rstrip(b"\0").decode(errors="replace"),
        ifindex=ifindex,
        kind=kind.decode() or _LINK_TYPES.get(link_type, str(link_type)),
        mac=attrs.get(_IFLA_ADDRESS, b"").hex(":"),
        addresses=tuple(addresses.get(ifindex, ())),
        link_index=_U32.unpack(link)[0] if link is not None else None,
        link_netnsid=_S32.unpack(netnsid)[0] if netnsid is not None else None,
    )


def _parse_address(payload: bytes) -> tuple[int, IPAddress, int] | None:
    """(ifindex, address, prefix length) of one RTM_NEWADDR; IFA_LOCAL is the own address on p2p links."""
    family, prefixlen, _flags, _scope, ifindex = _IFADDRMSG.unpack_from(payload)
    attrs = _attrs(payload, _IFADDRMSG.size, _ADDRESS_ATTRS)
    raw = attrs.get(_IFA_LOCAL) or attrs.get(_IFA_ADDRESS)
    if raw is None or family not in (socket.AF_INET, socket.AF_INET6):
        return None
    return ifindex, ipaddress.ip_address(raw), prefixlen


def _parse_route(payload: bytes) -> Route | None:
    family, dst_len, _src_len, _tos, table, protocol, scope, route_type, _flags = _RTMSG.unpack_from(payload)
    if family not in (socket.AF_INET, socket.AF_INET6):
        return None  # multicast routing (RTNL_FAMILY_IPMR) and the like
    attrs = _attrs(payload, _RTMSG.size, _ROUTE_ATTRS)
    if _RTA_TABLE in attrs:  # the header's table is 8 bits; the attribute holds the whole id
        (table,) = _U32.unpack(attrs[_RTA_TABLE])
    oif, metric = attrs.get(_RTA_OIF), attrs.get(_RTA_PRIORITY)
    return Route(
        family=family,
        destination=_ip(attrs.get(_RTA_DST)),
        prefix_length=dst_len,
        gateway=_ip(attrs.get(_RTA_GATEWAY)),
        ifindex=_U32.unpack(oif)[0] if oif is not None else None,
        source=_ip(attrs.get(_RTA_PREFSRC)),
        metric=_U32.unpack(metric)[0] if metric is not None else None,
        table=table,
        protocol=protocol,
        scope=scope,
        type=route_type,
    )


def _parse_neighbour(payload: bytes) -> Neighbour | None:
    family, ifindex, state, _flags, _type = _NDMSG.unpack_from(payload)
    attrs = _attrs(payload, _NDMSG.size, _NEIGH_ATTRS)
    address = _ip(attrs.get(_NDA_DST))
    if address is None or family not in (socket.AF_INET, socket.AF_INET6):
        return None
    return Neighbour(address=address, ifindex=ifindex, mac=attrs.get(_NDA_LLADDR, b"").hex(":"), state=state)


def _ip(raw: bytes | None) -> IPAddress | None:
    return ipaddress.ip_address(raw) if raw is not None and len(raw) in (4, 16) else None
