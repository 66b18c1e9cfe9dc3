"""The network context of a capture: what the pod's and the node's networking looked like around it.

A pcap shows the packets tcpdump saw; why others never arrived is often outside it: a full conntrack table
dropping new flows, a Service whose NAT rules point elsewhere, a device dropping before tcpdump's tap. So each
capture also records, once tcpdump listens and again right after it ends:

- in the pod's netns (entered from a short-lived thread, see _netlink.py): its addresses, routes, neighbours and
  its interface's counters;
- in the node's netns (the agent's): the counters of the device tcpdump listened on, the conntrack table's fill
  and the entries involving a pod IP, the NAT rules (iptables-save) and IPVS services that mention a pod IP.

The whole record is stored as JSON next to the pcap (`podcap.storage.context_key`); its digest (`NetworkContext`) travels in the
capture's snapshot. Context never costs the capture: each source that cannot be read (tool not installed, module
not loaded, no permission, too slow) is reported in ``sources`` with its reason, every tool runs under a timeout,
and the caller runs all of this off the event loop, at low priority, bounded by its own timeout.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import os
import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from podcap.storage import context_key

from ._netlink import Counters, Link, Neighbour, Route, RouteSocket, read_in
from ._resolve import Resolution

if TYPE_CHECKING:  # _model holds the digest in its snapshots
    from ._model import Programs

__all__ = [
    "Conntrack",
    "ContextSource",
    "DeviceCounters",
    "NetworkContext",
    "Reading",
    "Target",
    "digest",
    "read_context",
]

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# Each tool gets at most this long; a node whose conntrack table holds a million entries answers in ~2 s.
TOOL_TIMEOUT_S = 5.0
DIGEST_ENTRIES = 100  # conntrack entries kept in the digest; context.json has them all
NEARLY_FULL = 0.9
# /proc/thread-self, not /proc/self: /proc/self/net is the netns of the agent's main thread, and the agent's
# threads may live elsewhere (tests run the agent on a thread inside a node's netns).
_PROC_NET = Path("/proc/thread-self/net")
_NETFILTER_SYSCTL = Path("/proc/sys/net/netfilter")  # always the calling thread's netns
_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}  # tools are run by absolute path anyway
_RT_TABLE_MAIN = 254
_RTPROT = {2: "kernel", 3: "boot", 4: "static", 16: "dhcp", 18: "keepalived", 186: "bgp", 188: "ospf"}
_RT_SCOPES = {253: "link", 254: "host"}
_RTN_TYPES = {2: "local", 3: "broadcast", 5: "multicast", 6: "blackhole", 7: "unreachable", 8: "prohibit"}
_NUD_STATES = [
    (0x01, "INCOMPLETE"),
    (0x02, "REACHABLE"),
    (0x04, "STALE"),
    (0x08, "DELAY"),
    (0x10, "PROBE"),
    (0x20, "FAILED"),
    (0x40, "NOARP"),
    (0x80, "PERMANENT"),
]
_JUMP = re.compile(r"\s-[jg]\s+(\S+)")


@dataclass(frozen=True)
class Target:
    """Where to look: the pod's netns (a path; "" for a hostNetwork pod, which lives in the node's), its
    interface there, the node-side device tcpdump listens on, and the pod's IPs."""

    netns: str
    pod_ifindex: int
    pod_interface: str
    host_device: str
    host_ifindex: int
    pod_ips: tuple[str, ...]

    @classmethod
    def of(cls, resolution: Resolution, pod_ips: Sequence[str]) -> Target:
        return cls(
            netns=resolution.netns,
            pod_ifindex=resolution.pod_ifindex,
            pod_interface=resolution.pod_interface,
            host_device=resolution.interface,
            host_ifindex=resolution.ifindex,
            pod_ips=tuple(pod_ips),
        )


@dataclass(frozen=True)
class DeviceCounters:
    device: str
    rx_packets: int = 0
    tx_packets: int = 0
    rx_bytes: int = 0
    tx_bytes: int = 0
    rx_errors: int = 0
    tx_errors: int = 0
    rx_dropped: int = 0
    tx_dropped: int = 0


@dataclass(frozen=True)
class Conntrack:
    count: int
    max: int
    nearly_full: bool
    entries: tuple[str, ...] = ()
    pod_entries: int = 0


@dataclass(frozen=True)
class ContextSource:
    name: str
    ok: bool
    detail: str = ""


@dataclass
class Reading:
    """What one moment (the start or the end) showed; each field None/empty when its source failed."""

    time: datetime
    pod_addresses: list[str] = field(default_factory=list)
    pod_routes: list[str] = field(default_factory=list)
    pod_neighbours: list[str] = field(default_factory=list)
    pod_device: DeviceCounters | None = None
    host_device: DeviceCounters | None = None
    conntrack: Conntrack | None = None
    conntrack_entries: list[str] = field(default_factory=list)  # all of them (end only)
    nat_rules: list[str] = field(default_factory=list)  # (end only)
    ipvs: list[str] = field(default_factory=list)  # (end only)
    sources: list[ContextSource] = field(default_factory=list)


@dataclass(frozen=True)
class NetworkContext:
    """The digest of a capture's context; mirrors ``podcap.api.v1.NetworkContext``."""

    object_key: str
    start_time: datetime | None
    end_time: datetime | None
    pod_addresses: tuple[str, ...]
    pod_routes: tuple[str, ...]
    pod_neighbours: tuple[str, ...]
    pod_device_start: DeviceCounters | None
    pod_device_end: DeviceCounters | None
    host_device_start: DeviceCounters | None
    host_device_end: DeviceCounters | None
    conntrack: Conntrack | None
    nat_rules: tuple[str, ...]
    ipvs: tuple[str, ...]
    sources: tuple[ContextSource, ...]
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class Tools:
    """The node's tools a reading runs (absolute paths, "" when missing), each under ``launch``: the agent's
    setpriv line for them (_confine.py), the capture user with CAP_NET_ADMIN and CAP_NET_RAW and nothing else."""

    programs: Programs
    launch: tuple[str, ...] = ()

    def run(self, program: str, name: str, args: Sequence[str]) -> str:
        """``program args`` (an absolute path, no shell), its stdout; _Unavailable when it is missing or fails."""
        if not program:
            raise _Unavailable(f"{name}: tool not found (not on the agent's PATH at its start)")
        if not os.access(
            program, os.X_OK
        ):  # asked here: under setpriv a missing program is setpriv's failure
            raise _Unavailable(f"{name}: tool not found ({program})")
        started = time.monotonic()
        try:
            done = subprocess.run(
                [*self.launch, program, *args],
                capture_output=True,
                text=True,
                timeout=TOOL_TIMEOUT_S,
                env=_ENV,
                check=False,
            )
        except FileNotFoundError:
            raise _Unavailable(f"{name}: tool not found ({program})") from None
        if done.returncode != 0:
            why = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
            raise _Unavailable(f"{name}: {why}")
        log.debug("%s took %.3f s", name, time.monotonic() - started)
        return done.stdout


def read_context(target: Target, tools: Tools, *, full: bool) -> Reading:
    """One reading; ``full`` adds what is only worth reading once, at the end (conntrack entries, NAT rules,
    IPVS). Never raises for a source that cannot be read: its reason goes into ``sources``."""
    reading = Reading(time=datetime.now(UTC))
    sources = reading.sources
    pod = _attempt(sources, "pod", lambda: _read_pod(target))
    # One netlink visit reads the four; each is reported under its own name, as the API lists them.
    read = sources.pop()
    sources += [ContextSource(name, read.ok, read.detail) for name in ("addresses", "routes", "neighbours")]
    if pod is not None and pod[3] is None:
        sources.append(ContextSource("pod_device", False, f"{target.pod_interface} not found in the pod"))
    else:
        sources.append(ContextSource("pod_device", read.ok, read.detail))
    if pod is not None:
        links, routes, neighbours, counters = pod
        names = {link.ifindex: link.name for link in links}
        # Loopback is the same in every pod; leaving it out keeps the digest to what differs.
        reading.pod_addresses = [
            _address_line(link) for link in links if link.addresses and link.kind != "loopback"
        ]
        reading.pod_routes = [_route_line(r, names) for r in routes if _shown(r)]
        reading.pod_neighbours = [_neighbour_line(n, names) for n in neighbours]
        if counters is not None:
            reading.pod_device = _device(target.pod_interface, counters)
    host = _attempt(sources, "host_device", lambda: _host_counters(target))
    if host is not None:
        reading.host_device = _device(target.host_device, host)
    reading.conntrack = _attempt(sources, "conntrack", _conntrack_fill)
    if full:
        if reading.conntrack is not None:
            entries = _attempt(
                sources, "conntrack_entries", lambda: _conntrack_entries(tools, target.pod_ips)
            )
            if entries is not None:
                reading.conntrack_entries = entries
                conntrack = reading.conntrack
                reading.conntrack = Conntrack(
                    conntrack.count,
                    conntrack.max,
                    conntrack.nearly_full,
                    tuple(entries[:DIGEST_ENTRIES]),
                    len(entries),
                )
        reading.nat_rules = _nat_rules(sources, tools, target.pod_ips)
        reading.ipvs = _attempt(sources, "ipvs", lambda: _ipvs(tools, target.pod_ips)) or []
    return reading


def digest(object_key: str, start: Reading | None, end: Reading) -> tuple[NetworkContext, dict[str, Any]]:
    """The digest of a capture's two readings, and the whole record to store as JSON."""
    later = end if end.pod_addresses or start is None else start
    # A source counts as read when the end read it; the start's failures stay in the record.
    sources = tuple(end.sources)
    context = NetworkContext(
        object_key=context_key(object_key),
        start_time=start.time if start is not None else None,
        end_time=end.time,
        pod_addresses=tuple(later.pod_addresses),
        pod_routes=tuple(later.pod_routes),
        pod_neighbours=tuple(end.pod_neighbours or later.pod_neighbours),
        pod_device_start=start.pod_device if start is not None else None,
        pod_device_end=end.pod_device,
        host_device_start=start.host_device if start is not None else None,
        host_device_end=end.host_device,
        conntrack=end.conntrack,
        nat_rules=tuple(end.nat_rules),
        ipvs=tuple(end.ipvs),
        sources=sources,
        warnings=tuple(_warnings(start, end)),
    )
    record = {
        "object_key": object_key,
        "digest": _jsonable(asdict(context)),
        "start": _jsonable(asdict(start)) if start is not None else None,
        "end": _jsonable(asdict(end)),
    }
    return context, record


def _warnings(start: Reading | None, end: Reading) -> list[str]:
    out = []
    conntrack = end.conntrack
    if conntrack is not None and conntrack.nearly_full:
        percent = 100 * conntrack.count // max(conntrack.max, 1)
        out.append(
            f"conntrack table {percent}% full ({conntrack.count} of {conntrack.max}): new flows may be dropped"
        )
    if start is not None:
        for where, before, after in (
            ("host device", start.host_device, end.host_device),
            ("pod interface", start.pod_device, end.pod_device),
        ):
            if before is None or after is None:
                continue
            for what in ("rx_dropped", "tx_dropped", "rx_errors", "tx_errors"):
                grew = getattr(after, what) - getattr(before, what)
                if grew > 0:
                    direction, kind = what.split("_")
                    out.append(f"{where} {after.device} {direction} {kind} grew by {grew} during the capture")
    return out


def _attempt(sources: list[ContextSource], name: str, read: Callable[[], _T]) -> _T | None:
    """``read()``, its source reported ok, or None with the reason it failed."""
    try:
        value = read()
    except _Unavailable as exc:
        sources.append(ContextSource(name, False, str(exc)))
        return None
    except subprocess.TimeoutExpired as exc:
        sources.append(
            ContextSource(name, False, f"{Path(str(exc.cmd[0])).name}: timed out after {exc.timeout:g} s")
        )
        return None
    except PermissionError as exc:
        sources.append(ContextSource(name, False, f"permission denied ({exc.strerror or exc})"))
        return None
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        sources.append(ContextSource(name, False, f"{exc.strerror or exc}{where}"))
        return None
    except Exception as exc:  # a source is never worth a capture: say what happened and go on
        log.warning("network context: reading %s failed", name, exc_info=True)
        sources.append(ContextSource(name, False, f"{type(exc).__name__}: {exc}"))
        return None
    sources.append(ContextSource(name, True))
    return value


class _Unavailable(Exception):
    """A source that is not there (tool missing, module not loaded); the message says which."""


def _host_counters(target: Target) -> Counters:
    # A hostNetwork pod's resolution names its node device without an ifindex.
    ifindex = target.host_ifindex or socket.if_nametoindex(target.host_device)
    counters = read_in(None, lambda rtnl: rtnl.counters(ifindex))
    if counters is None:
        raise _Unavailable(f"{target.host_device} is gone (pod deleted?)")
    return counters


def _read_pod(target: Target) -> tuple[list[Link], list[Route], list[Neighbour], Counters | None]:
    def read(rtnl: RouteSocket) -> tuple[list[Link], list[Route], list[Neighbour], Counters | None]:
        links = rtnl.links()
        ifindex = target.pod_ifindex or next((x.ifindex for x in links if x.name == target.pod_interface), 0)
        counters = rtnl.counters(ifindex) if ifindex else None
        return links, rtnl.routes(), rtnl.neighbours(), counters

    if not target.netns:  # a hostNetwork pod: its netns is the node's, its interface the host device
        return read_in(None, read)
    fd = os.open(target.netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return read_in(fd, read)
    finally:
        os.close(fd)


def _device(name: str, counters: Counters) -> DeviceCounters:
    return DeviceCounters(device=name, **asdict(counters))


def _address_line(link: Link) -> str:
    return " ".join([link.name, *(f"{address}/{prefix}" for address, prefix in link.addresses)])


def _shown(route: Route) -> bool:
    """What ``ip route`` and ``ip -6 route`` show: the main table, without IPv6 multicast."""
    return route.table == _RT_TABLE_MAIN and route.type != 5


def _route_line(route: Route, names: dict[int, str]) -> str:
    words = ["default"] if route.destination is None else [f"{route.destination}/{route.prefix_length}"]
    if route.type in _RTN_TYPES:
        words.insert(0, _RTN_TYPES[route.type])
    if route.gateway is not None:
        words += ["via", str(route.gateway)]
    if route.ifindex is not None:
        words += ["dev", names.get(route.ifindex, f"if{route.ifindex}")]
    if route.protocol in _RTPROT and route.protocol != 3:
        words += ["proto", _RTPROT[route.protocol]]
    if route.scope in _RT_SCOPES:
        words += ["scope", _RT_SCOPES[route.scope]]
    if route.source is not None:
        words += ["src", str(route.source)]
    if route.metric:
        words += ["metric", str(route.metric)]
    return " ".join(words)


def _neighbour_line(neighbour: Neighbour, names: dict[int, str]) -> str:
    words = [str(neighbour.address), "dev", names.get(neighbour.ifindex, f"if{neighbour.ifindex}")]
    if neighbour.mac:
        words += ["lladdr", neighbour.mac]
    words += [name for bit, name in _NUD_STATES if neighbour.state & bit]
    return " ".join(words)


def _conntrack_fill() -> Conntrack:
    try:
        count = int((_NETFILTER_SYSCTL / "nf_conntrack_count").read_text())
        maximum = int((_NETFILTER_SYSCTL / "nf_conntrack_max").read_text())
    except FileNotFoundError:
        raise _Unavailable(
            "nf_conntrack not loaded (/proc/sys/net/netfilter/nf_conntrack_count missing)"
        ) from None
    return Conntrack(count=count, max=maximum, nearly_full=maximum > 0 and count > NEARLY_FULL * maximum)


def _conntrack_entries(tools: Tools, pod_ips: Sequence[str]) -> list[str]:
    """The entries involving a pod IP: sent by it (original source), or reaching it, directly or DNATed to it
    as a Service's flows are (reply source), filtered by the kernel (conntrack >= 1.4.6). Printing a full table
    (250k entries, ~50 MB) to filter it here took longer than these two walks of it (~0.7 s each)."""
    seen: dict[str, None] = {}
    for ip in pod_ips:
        family = "ipv6" if ":" in ip else "ipv4"
        for option in ("--orig-src", "--reply-src"):
            output = tools.run(tools.programs.conntrack, "conntrack", ["-L", "-f", family, option, ip])
            seen.update((line, None) for line in output.splitlines() if line.strip())
    return list(seen)


def _nat_rules(sources: list[ContextSource], tools: Tools, pod_ips: Sequence[str]) -> list[str]:
    rules: list[str] = []
    families = [("iptables", tools.programs.iptables_save, [ip for ip in pod_ips if ":" not in ip])]
    families.append(("ip6tables", tools.programs.ip6tables_save, [ip for ip in pod_ips if ":" in ip]))
    for name, program, ips in families:
        if not ips:
            continue
        text = _attempt(sources, name, functools.partial(tools.run, program, f"{name}-save", ["-t", "nat"]))
        if text is not None:
            rules += _rules_to(text, ips)
    return rules


def _rules_to(save: str, ips: Sequence[str]) -> list[str]:
    """The ``-A`` rules of an iptables-save that mention one of ``ips``, and the rules that lead to them:
    kube-proxy's KUBE-SEP DNAT to the pod, the KUBE-SVC jump to that, the KUBE-SERVICES match of the Service."""
    rules = [line for line in save.splitlines() if line.startswith("-A ")]
    wanted = {i for i, rule in enumerate(rules) if _mentions(rule, ips)}
    chains = {rules[i].split()[1] for i in wanted}
    while True:  # chains that jump to a chain already kept, until nothing new comes
        more = {i for i, rule in enumerate(rules) if i not in wanted and _jumps_to(rule) in chains}
        if not more:
            break
        wanted |= more
        chains |= {rules[i].split()[1] for i in more}
    return [rules[i] for i in sorted(wanted)]


def _jumps_to(rule: str) -> str:
    match = _JUMP.search(rule)
    return match.group(1) if match else ""


def _mentions(text: str, ips: Iterable[str]) -> bool:
    """Whether ``text`` names one of ``ips`` as a whole address, however it is written (10.0.1.5, 10.0.1.5/32,
    10.0.1.5:80, src=fd00::5, [fd00::5]:80), never as a prefix of another (10.0.1.50)."""
    wanted = {ipaddress.ip_address(ip) for ip in ips}
    for word in re.split(r"[\s=,]+", text):
        token = word[1:].partition("]")[0] if word.startswith("[") else word
        token = token.partition("/")[0]
        if token.count(":") == 1:  # an IPv4 address and its port
            token = token.partition(":")[0]
        try:
            if ipaddress.ip_address(token) in wanted:
                return True
        except ValueError:
            continue
    return False


def _ipvs(tools: Tools, pod_ips: Sequence[str]) -> list[str]:
    """IPVS virtual services that mention a pod IP, each with its destinations (those of the pod marked)."""
    if not (_PROC_NET / "ip_vs").exists():
        raise _Unavailable("IPVS not loaded (/proc/net/ip_vs missing)")
    out: list[str] = []
    service: str | None = None
    destinations: list[str] = []

    def flush() -> None:
        if service is not None and (
            _mentions(service, pod_ips) or any(_mentions(d, pod_ips) for d in destinations)
        ):
            out.append(service)
            out.extend(destinations)

    for line in tools.run(tools.programs.ipvsadm, "ipvsadm", ["-Ln"]).splitlines():
        if line.startswith(("TCP", "UDP", "SCTP", "FWM")):
            flush()
            service, destinations = line.strip(), []
        elif line.lstrip().startswith("->") and service is not None:
            destinations.append(line.rstrip())
    flush()
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
