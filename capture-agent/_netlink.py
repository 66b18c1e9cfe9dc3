"""Ask the kernel which nsid this network namespace gave another one (RTM_GETNSID).

Interface indexes are only unique inside one netns: every pod's ``eth0`` is ifindex 2 and every node numbers its
own devices from 1, so "the device whose ifindex is the pod interface's peer index" is ambiguous on its own. The
kernel disambiguates veth peers with ``link_netnsid``: the id *this* netns assigned to the netns the peer lives in.
To compare that with a candidate pod netns we need the same id for the candidate, which only netlink gives
(``ip netns list-id`` has no way to name a ``/proc/PID/ns/net`` path). The request is ~40 lines of ``struct``, so
it is written here instead of pulling in pyroute2 (~200 ms to import).

RTM_GETNSID never allocates an id: a namespace that none of our links points into answers -1, reported as None.
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
from types import TracebackType

__all__ = ["NsidLookup"]

_NETLINK_ROUTE = 0
_NLMSG_ERROR = 2
_NLM_F_REQUEST = 0x1
_RTM_NEWNSID = 88
_RTM_GETNSID = 90
_NETNSA_NSID = 1
_NETNSA_FD = 3
_NSID_NOT_ASSIGNED = -1

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_RTGENMSG = struct.Struct("=B3x")  # struct rtgenmsg { u8 rtgen_family; } padded to 4 bytes (NLMSG_ALIGN)
_NLATTR = struct.Struct("=HH")  # len, type
_U32 = struct.Struct("=I")
_S32 = struct.Struct("=i")


def _align4(n: int) -> int:
    return (n + 3) & ~3


class NsidLookup:
    """A NETLINK_ROUTE socket in the calling thread's netns, answering "what nsid do you give that netns?".

    Keep one open for a whole scan: opening a socket costs more than the request itself. Not thread-safe; use one
    per thread. The socket lives in the netns of the thread that created the object, which is the netns asked.
    """

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, _NETLINK_ROUTE)
        self._sock.bind((0, 0))
        self._seq = itertools.count(1)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> NsidLookup:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def nsid_of(self, netns_path: str) -> int | None:
        """The nsid our netns assigned to the netns at ``netns_path``, or None when it assigned none.

        Raises OSError when the path cannot be opened or is not a network namespace.
        """
        fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return self._request(fd)
        finally:
            os.close(fd)

    def _request(self, netns_fd: int) -> int | None:
        seq = next(self._seq)
        attr = _NLATTR.pack(_NLATTR.size + _U32.size, _NETNSA_FD) + _U32.pack(netns_fd)
        body = _RTGENMSG.pack(socket.AF_UNSPEC) + attr
        header = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), _RTM_GETNSID, _NLM_F_REQUEST, seq, 0)
        self._sock.send(header + body)
        while True:
            data = self._sock.recv(65536)
            for msg_type, msg_seq, payload in _messages(data):
                if msg_seq != seq:
                    continue  # a late answer to an earlier request that raised; not ours
                if msg_type == _NLMSG_ERROR:
                    (err,) = _S32.unpack_from(payload)
                    raise OSError(-err, f"RTM_GETNSID: {os.strerror(-err)}")
                if msg_type == _RTM_NEWNSID:
                    return _nsid_from(payload)


def _messages(data: bytes) -> list[tuple[int, int, bytes]]:
    """Split one datagram into (type, seq, payload) netlink messages."""
    out = []
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, msg_type, _flags, seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size:
            break
        out.append((msg_type, seq, data[offset + _NLMSGHDR.size : offset + length]))
        offset += _align4(length)
    return out


def _nsid_from(payload: bytes) -> int | None:
    offset = _RTGENMSG.size
    while offset + _NLATTR.size <= len(payload):
        length, attr_type = _NLATTR.unpack_from(payload, offset)
        if length < _NLATTR.size:
            break
        if attr_type & 0x3FFF == _NETNSA_NSID:  # strip NLA_F_NESTED / NLA_F_NET_BYTEORDER
            (nsid,) = _S32.unpack_from(payload, offset + _NLATTR.size)
            return None if nsid == _NSID_NOT_ASSIGNED else int(nsid)
        offset += _align4(length)
    return None
