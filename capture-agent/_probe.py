"""`podcap diagnose`'s ladder, climbed from inside a pod's network namespace: the pod's resolver, DNS with it, a
TCP connect, and the further addresses the controller names (a Service's ClusterIP, one of its endpoints).

By hand this is ``kubectl exec POD -- nslookup NAME`` and ``nc -vz HOST PORT``, which needs those tools in the
pod's image (distroless images have none) or a debug container. The agent needs nothing in the pod: its sockets
are made inside the pod's netns (`_netlink.socket_in`), so the packets leave from the pod's address through the
pod's routes, as the application's do, and a capture of the pod sees them. The resolver configuration is the
one the pod's container sees: /etc/resolv.conf under ``/proc/PID/root`` of a process in that netns (the pause
container has none, its application containers do).

DNS is spoken here directly, a query and its answer being a few struct formats, the way a C library's stub
resolver does it: resolv.conf's search list and ``ndots`` decide which names are tried in what order, an
NXDOMAIN moves on to the next name, a nameserver that does not answer (or refuses) hands over to the next one.
Only A records are asked for, and AAAA when a name has none.

Each step ends at its timeout, and the whole ladder by the caller's deadline (the controller makes it the length
of the capture running meanwhile, so every packet of the ladder is in the capture); a step that could not start
in time says so. Nothing here fails the call for what the network does: a silent nameserver or a refused
connection is a step that is not ok, with the reason for a person.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import secrets
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass

from ._errors import InvalidCaptureRequest, MissingPrivilege, ResolveError
from ._netlink import socket_in
from ._validation import shown

__all__ = ["ProbeSpec", "ResolvConf", "Step", "Target", "check_probe", "parse_resolv_conf", "probe"]

DEFAULT_TIMEOUT_S = 2.0
_MAX_TIMEOUT_S = 10.0
_MAX_ALSO = 4
_MAX_LABEL = 1024  # "endpoint POD of NS/NAME on NODE": a pod name alone may have 253 characters
_MAX_NAME = 253
_MAXNS = 3  # the C libraries use the first three nameservers of resolv.conf
_MAX_NDOTS = 15  # glibc's cap
_MAX_SEARCH = 32
_DNS_PORT = 53
# Processes in the pod's netns whose resolv.conf is tried; a pod has a handful.
_MAX_READS = 16
_STEP = re.compile(r"[a-z][a-z0-9-]{0,31}")
_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_TYPE_A, _TYPE_AAAA, _CLASS_IN = 1, 28, 1
_FLAG_RESPONSE, _FLAG_RECURSION_DESIRED, _FLAG_TRUNCATED = 0x8000, 0x0100, 0x0200
_RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}
_HEADER = struct.Struct("!HHHHHH")  # id, flags, questions, answers, authority, additional
_QUESTION = struct.Struct("!HH")  # type, class
_RECORD = struct.Struct("!HHIH")  # type, class, ttl, rdata length


@dataclass(frozen=True)
class Target:
    """A further address to connect to: the step's name ("service") and what to call it ("ClusterIP of ...")."""

    step: str
    label: str
    address: str
    port: int


@dataclass(frozen=True)
class ProbeSpec:
    """A checked ProbeRequest: `host` is a DNS name or an IP address."""

    host: str
    port: int
    also: tuple[Target, ...] = ()
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def longest_s(self) -> float:
        """The most the ladder can take: a timeout per nameserver, then one per connect."""
        return self.timeout_s * (_MAXNS + 1 + len(self.also))


@dataclass(frozen=True)
class Step:
    """One rung; mirrors ``podcap.api.v1.DiagnoseStep``."""

    name: str
    ok: bool
    detail: str
    milliseconds: int


@dataclass(frozen=True)
class ResolvConf:
    """What a stub resolver takes from resolv.conf."""

    nameservers: tuple[str, ...]
    search: tuple[str, ...] = ()
    ndots: int = 1


def check_probe(
    host: str, port: int, also: Sequence[Target], timeout_seconds: int, timeout_nanos: int
) -> ProbeSpec:
    """The request's fields, or InvalidCaptureRequest naming the one that is wrong."""
    if not host:
        raise InvalidCaptureRequest("host is required: a DNS name or an IP address")
    if not _is_ip(host) and not is_dns_name(host):
        raise InvalidCaptureRequest(f"host {shown(host)} is neither an IP address nor a DNS name")
    _check_port("port", port)
    if len(also) > _MAX_ALSO:
        raise InvalidCaptureRequest(f"also holds {len(also)} addresses; at most {_MAX_ALSO}")
    for i, target in enumerate(also):
        if not _STEP.fullmatch(target.step):
            raise InvalidCaptureRequest(
                f"also[{i}].step {shown(target.step)} is not a step name like 'service'"
            )
        if len(target.label) > _MAX_LABEL or not target.label.isprintable():
            raise InvalidCaptureRequest(f"also[{i}].label must be printable, at most {_MAX_LABEL} characters")
        if not _is_ip(target.address):
            raise InvalidCaptureRequest(f"also[{i}].address {shown(target.address)} is not an IP address")
        _check_port(f"also[{i}].port", target.port)
    if not 0 <= timeout_seconds <= _MAX_TIMEOUT_S or not 0 <= timeout_nanos < 10**9:
        raise InvalidCaptureRequest(
            f"timeout must be between 0 (for {DEFAULT_TIMEOUT_S:g} s) and {_MAX_TIMEOUT_S:g} s"
        )
    timeout = timeout_seconds + timeout_nanos / 1e9
    if timeout > _MAX_TIMEOUT_S:
        raise InvalidCaptureRequest(f"timeout must be at most {_MAX_TIMEOUT_S:g} s")
    return ProbeSpec(host, port, tuple(also), timeout or DEFAULT_TIMEOUT_S)


def is_dns_name(name: str) -> bool:
    """A name a resolver can be asked for: dot-separated labels of letters, digits, '-' and '_', optionally
    ending with a dot (fully qualified); at most 253 characters."""
    bare = name[:-1] if name.endswith(".") else name
    return 0 < len(bare) <= _MAX_NAME and all(_LABEL.fullmatch(label) for label in bare.split("."))


def parse_resolv_conf(text: str) -> ResolvConf:
    """The nameservers (the first three, as the C libraries take them), search list and ndots of a resolv.conf;
    the last ``search`` or ``domain`` line wins. Scoped IPv6 nameservers (fe80::1%eth0) are left out: the scope
    names an interface of the pod that this process cannot look up."""
    nameservers: list[str] = []
    search: list[str] = []
    ndots = 1
    for line in text.splitlines():
        words = line.split()
        if not words or words[0][0] in "#;":
            continue
        if words[0] == "nameserver" and len(words) > 1 and len(nameservers) < _MAXNS:
            if "%" not in words[1] and _is_ip(words[1]):
                nameservers.append(words[1])
        elif words[0] == "search":
            search = words[1 : _MAX_SEARCH + 1]
        elif words[0] == "domain":
            search = words[1:2]
        elif words[0] == "options":
            for option in words[1:]:
                name, _, value = option.partition(":")
                if name == "ndots" and value.isdigit():
                    ndots = min(int(value), _MAX_NDOTS)
    return ResolvConf(tuple(nameservers), tuple(d.rstrip(".") for d in search if d != "."), ndots)


def probe(netns: str, spec: ProbeSpec, budget_s: float | None = None, proc_root: str = "/proc") -> list[Step]:
    """The ladder from inside the network namespace at `netns` (a pod's, as resolution found it), within
    `budget_s` seconds (None: only the steps' own timeouts bound it).

    Raises MissingPrivilege when the agent may not enter the namespace, ResolveError when it is gone.
    """
    budget = spec.longest_s if budget_s is None else min(budget_s, spec.longest_s)
    try:
        fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ResolveError(f"the pod's network namespace {netns} went away: {exc.strerror}") from exc
    try:
        return _Ladder(fd, spec, time.monotonic() + budget, proc_root).climb()
    except PermissionError as exc:
        raise MissingPrivilege(
            f"cannot enter the pod's network namespace: {exc.strerror}; the agent needs CAP_SYS_ADMIN"
        ) from exc
    finally:
        os.close(fd)


@dataclass(frozen=True)
class _Answer:
    """What one nameserver said about one name: an rcode and addresses, or why nothing usable came back."""

    rcode: str = ""
    addresses: tuple[str, ...] = ()
    failure: str = ""  # no answer, refused, unreachable: this nameserver is of no use


class _Ladder:
    def __init__(self, netns_fd: int, spec: ProbeSpec, deadline: float, proc_root: str) -> None:
        self._fd = netns_fd
        self._spec = spec
        self._deadline = deadline
        self._proc = proc_root

    def climb(self) -> list[Step]:
        spec = self._spec
        started = time.monotonic()
        conf, ok, detail = self._resolver()
        steps = [Step("resolver", ok, detail, _ms_since(started))]
        if _is_ip(spec.host):
            addresses: tuple[str, ...] = (spec.host,)
        else:
            started = time.monotonic()
            addresses, ok, detail = self._dns(conf)
            steps.append(Step("dns", ok, detail, _ms_since(started)))
        if addresses:
            steps.append(self._connect("connect", "", addresses[0], spec.port))
        else:
            steps.append(Step("connect", False, f"not tried: {spec.host} did not resolve", 0))
        steps += [self._connect(t.step, t.label, t.address, t.port) for t in spec.also]
        return steps

    def _timeout(self) -> float:
        """The next wait: the step's timeout, or what is left of the ladder's time if that is less."""
        return max(0.0, min(self._spec.timeout_s, self._deadline - time.monotonic()))

    # --- resolver ---------------------------------------------------------------------------------------------
    def _resolver(self) -> tuple[ResolvConf | None, bool, str]:
        """resolv.conf as a process in the pod's netns sees it (its container's root), and what to say of it."""
        wanted = os.fstat(self._fd)
        unread: list[str] = []
        for pid in self._pids():
            try:
                st = os.stat(f"{self._proc}/{pid}/ns/net")
            except OSError:
                continue  # exited meanwhile, or not ours to look at
            if (st.st_dev, st.st_ino) != (wanted.st_dev, wanted.st_ino):
                continue
            path = f"{self._proc}/{pid}/root/etc/resolv.conf"
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    text = f.read(65536)
            except OSError as exc:
                unread.append(f"pid {pid}: {exc.strerror}")
                if len(unread) == _MAX_READS:
                    break
                continue
            conf = parse_resolv_conf(text)
            where = f"{path}, pid {pid} {_comm(self._proc, pid)}".rstrip()
            if not conf.nameservers:
                # What glibc and musl do without one.
                conf = ResolvConf(("127.0.0.1",), conf.search, conf.ndots)
                return conf, False, f"no nameserver in {where}: lookups go to 127.0.0.1"
            return conf, True, f"{_describe(conf)} ({where})"
        if not unread:
            return (
                None,
                False,
                "no process runs in the pod's network namespace, so its resolv.conf is unknown",
            )
        return (
            None,
            False,
            f"no process in the pod's network namespace has a readable /etc/resolv.conf ({'; '.join(unread)})",
        )

    def _pids(self) -> list[int]:
        try:
            return sorted(int(name) for name in os.listdir(self._proc) if name.isdigit())
        except OSError:
            return []

    # --- dns --------------------------------------------------------------------------------------------------
    def _dns(self, conf: ResolvConf | None) -> tuple[tuple[str, ...], bool, str]:
        host = self._spec.host
        if conf is None:
            return (), False, "not tried: the pod's resolver is unknown (see the resolver step)"
        servers = list(conf.nameservers)
        useless: list[str] = []  # why each nameserver given up on was
        missing: list[str] = []  # names that do not exist (NXDOMAIN) or have no address
        for name in _candidates(host, conf):
            while servers:
                timeout = self._timeout()
                if timeout <= 0:
                    return (), False, _out_of_time([*useless, *missing])
                answer = self._lookup(servers[0], name, timeout)
                if answer.addresses:
                    return (
                        answer.addresses,
                        True,
                        f"{name} -> {', '.join(answer.addresses)} via {servers[0]}:53",
                    )
                if answer.rcode in ("NXDOMAIN", "NOERROR"):
                    missing.append(f"{name}: {'no address' if answer.rcode == 'NOERROR' else 'NXDOMAIN'}")
                    break  # this nameserver answered: the next name, from it
                useless.append(answer.failure or f"{answer.rcode} from {servers[0]}:53 for {name}")
                servers.pop(0)
            if not servers:
                break
        if not servers:
            return (), False, "; ".join(useless + ([f"before that {', '.join(missing)}"] if missing else []))
        also = "".join(f"; {why}" for why in useless)  # nameservers given up on before this one answered
        if all(m.endswith("NXDOMAIN") for m in missing):
            tried = ", ".join(m.split(":")[0] for m in missing)
            return (), False, f"NXDOMAIN: {host} (tried {tried}) via {servers[0]}:53{also}"
        return (), False, f"{host} has no address ({', '.join(missing)}) via {servers[0]}:53{also}"

    def _lookup(self, server: str, name: str, timeout: float) -> _Answer:
        """A, then AAAA when the name exists without A records."""
        answer = self._ask(server, name, _TYPE_A, timeout)
        if answer.rcode == "NOERROR" and not answer.addresses:
            aaaa = self._ask(server, name, _TYPE_AAAA, self._timeout())
            if aaaa.rcode:
                return aaaa
        return answer

    def _ask(self, server: str, name: str, qtype: int, timeout: float) -> _Answer:
        family = socket.AF_INET6 if ":" in server else socket.AF_INET
        qid = secrets.randbits(16)
        end = time.monotonic() + timeout
        with socket_in(self._fd, family, socket.SOCK_DGRAM) as sock:
            try:
                sock.connect((server, _DNS_PORT))  # only answers from the nameserver reach this socket
                sock.send(_query(qid, name, qtype))
                while (left := end - time.monotonic()) > 0:
                    sock.settimeout(left)
                    answer = _parse_answer(sock.recv(4096), qid)
                    if answer is not None:
                        return answer
            except TimeoutError:
                pass
            except ConnectionRefusedError:
                return _Answer(failure=f"refused (ICMP port unreachable) by {server}:53")
            except OSError as exc:
                return _Answer(failure=f"cannot reach {server}:53: {exc.strerror}")
        return _Answer(failure=f"no answer from {server}:53 in {_ms(timeout)} ms")

    # --- connect ----------------------------------------------------------------------------------------------
    def _connect(self, step: str, label: str, address: str, port: int) -> Step:
        where = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
        prefix = f"{label}: " if label else ""
        timeout = self._timeout()
        if timeout <= 0:
            return Step(step, False, f"{prefix}{_out_of_time([])}", 0)
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        started = time.monotonic()
        ok, detail = False, ""
        with socket_in(self._fd, family, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            try:
                sock.connect((address, port))
                ok, detail = True, f"connected to {where}"
            except TimeoutError:
                detail = f"no answer from {where} in {_ms(timeout)} ms"
            except ConnectionRefusedError:
                detail = f"refused (RST) by {where}"
            except OSError as exc:
                detail = f"cannot reach {where}: {exc.strerror}"
        return Step(step, ok, prefix + detail, _ms_since(started))


def _candidates(host: str, conf: ResolvConf) -> list[str]:
    """The names a stub resolver tries, in order: with fewer than `ndots` dots, each search domain first."""
    if host.endswith("."):
        return [host[:-1]]
    qualified = [f"{host}.{domain}" for domain in conf.search]
    ordered = [host, *qualified] if host.count(".") >= conf.ndots else [*qualified, host]
    return [name for name in ordered if is_dns_name(name)]


def _query(qid: int, name: str, qtype: int) -> bytes:
    qname = b"".join(bytes([len(label)]) + label.encode("ascii") for label in name.split(".")) + b"\0"
    return _HEADER.pack(qid, _FLAG_RECURSION_DESIRED, 1, 0, 0, 0) + qname + _QUESTION.pack(qtype, _CLASS_IN)


def _parse_answer(data: bytes, qid: int) -> _Answer | None:
    """The rcode and A/AAAA addresses of an answer to query `qid` (CNAMEs followed by the server are in the
    same answer); None for a datagram that is not that answer."""
    if len(data) < _HEADER.size:
        return None
    rid, flags, questions, answers, _, _ = _HEADER.unpack_from(data)
    if rid != qid or not flags & _FLAG_RESPONSE:
        return None
    rcode = _RCODES.get(flags & 0xF, f"RCODE{flags & 0xF}")
    addresses: list[str] = []
    try:
        offset = _HEADER.size
        for _ in range(questions):
            offset = _skip_name(data, offset) + _QUESTION.size
        for _ in range(answers):
            offset = _skip_name(data, offset)
            rtype, rclass, _ttl, length = _RECORD.unpack_from(data, offset)
            offset += _RECORD.size
            rdata = data[offset : offset + length]
            offset += length
            if rclass == _CLASS_IN and (rtype, len(rdata)) in ((_TYPE_A, 4), (_TYPE_AAAA, 16)):
                addresses.append(str(ipaddress.ip_address(rdata)))
    except (struct.error, IndexError):
        return _Answer(failure=f"a malformed answer ({rcode}, {len(data)} bytes)")
    if not addresses and flags & _FLAG_TRUNCATED:
        return _Answer(failure="the answer was truncated (TC) and podcap does not retry over TCP")
    return _Answer(rcode=rcode, addresses=tuple(addresses))


def _skip_name(data: bytes, offset: int) -> int:
    """The offset after a (possibly compressed) name."""
    while True:
        length = data[offset]
        if length & 0xC0 == 0xC0:
            return offset + 2
        if length == 0:
            return offset + 1
        offset += 1 + length


def _describe(conf: ResolvConf) -> str:
    parts = [f"nameserver {', '.join(conf.nameservers)}"]
    if conf.search:
        parts.append(f"search {' '.join(conf.search)}")
    parts.append(f"ndots {conf.ndots}")
    return "; ".join(parts)


def _comm(proc: str, pid: int) -> str:
    try:
        with open(f"{proc}/{pid}/comm", encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return ""


def _out_of_time(so_far: list[str]) -> str:
    done = f" ({'; '.join(so_far)})" if so_far else ""
    return f"not tried: the ladder's time ran out (it ends with the capture; give a longer duration){done}"


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return "%" not in text


def _check_port(field: str, port: int) -> None:
    if not 1 <= port <= 65535:
        raise InvalidCaptureRequest(f"{field} must be a TCP port between 1 and 65535, not {port}")


def _ms(seconds: float) -> int:
    return math.ceil(seconds * 1000)


def _ms_since(started: float) -> int:
    return round((time.monotonic() - started) * 1000)
