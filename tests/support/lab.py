"""A simulated two-node Calico-style cluster built from network namespaces, for tests that need real veths.

Each node and each pod is its own netns; nodes meet on a bridge in a separate "fabric" netns; pods hang off their
node by a veth whose node side is named like Calico's (``cali`` + 11 hex chars of sha1("ns.pod")), with a /32
route and proxy ARP instead of a bridge. A ``sleep infinity`` "container" runs in every pod netns so that
``/proc/PID/ns/net`` points at it, as on a real node. The root namespace gets no address, route or interface:
tests reach in and out only through ``forward_into``/``forward_out`` relays (like ``kubectl port-forward``).

Names are ``pc<creator pid hex>x<3 hex>`` + a role (``f`` fabric, ``nN`` node, ``pN`` pod), at most 15 chars,
so parallel runs never collide and a session can sweep namespaces of runs whose creator died.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import pytest

from tests.support.netns import Relay, in_netns, netns_path, netns_socket

__all__ = ["Lab", "LabPod", "Node", "build_lab", "calico_if_name", "require_netns", "sweep_stale_namespaces"]

_NAME_RE = re.compile(r"pc(?P<pid>[0-9a-f]{1,6})x[0-9a-f]{3}(?:f|t|n\d+|p\d+)")
_NETNS_DIR = "/run/netns"
_PROXY_VARS = {"http_proxy", "https_proxy", "all_proxy", "no_proxy", "ftp_proxy"}
# Calico gives every host-side veth this MAC and points pods at 169.254.1.1 / its v6 link-local address.
_CALI_MAC = "ee:ee:ee:ee:ee:ee"
_CALI_GW4 = "169.254.1.1"
_CALI_GW6 = "fe80::ecee:eeff:feee:eeee"
_FABRIC_GW = "10.250.0.254"
_STD = (sys.stdin, sys.stdout, sys.stderr, sys.__stdin__, sys.__stdout__, sys.__stderr__)


@dataclass(frozen=True)
class Node:
    name: str
    netns: str
    ip: str
    ip6: str = ""


@dataclass(frozen=True, kw_only=True)
class LabPod:
    namespace: str
    name: str
    node: str
    netns: str
    ip: str
    host_if: str
    pod_if: str = "eth0"
    pod_mac: str
    container_pid: int
    ip6: str = ""


_Where = str | Node | LabPod


def calico_if_name(namespace: str, pod: str) -> str:
    """The host-side veth name Calico derives for a pod (libcalico-go ``VethNameForWorkload``)."""
    return "cali" + hashlib.sha1(f"{namespace}.{pod}".encode()).hexdigest()[:11]


def _pod_mac(namespace: str, pod: str) -> str:
    """Deterministic locally administered unicast MAC, so tests can compare against a known value."""
    digest = hashlib.sha256(f"{namespace}/{pod}".encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02, *digest[:5]))


def _ns(where: _Where) -> str:
    return where if isinstance(where, str) else where.netns


def _clean_env(env: dict[str, str] | None) -> dict[str, str]:
    """The lab namespaces have no route out, and nothing run in them may be steered to a proxy outside."""
    return {k: v for k, v in (env if env is not None else os.environ).items() if k.lower() not in _PROXY_VARS}


def _ip(args: Sequence[str], batch: Sequence[str] = ()) -> None:
    """One ``ip`` call; with ``batch`` lines, ``ip <args> -batch -`` runs them in one process."""
    argv = ["ip", *args] + (["-batch", "-"] if batch else [])
    done = subprocess.run(
        argv, input="\n".join(batch), capture_output=True, text=True, timeout=30, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()}\n" + "\n".join(batch))


def _sysctl(netns: str, values: dict[str, str]) -> None:
    """Write net.* sysctls of ``netns`` from a thread inside it (/proc/sys/net shows the caller's netns)."""

    def write() -> None:
        for key, value in values.items():
            with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
                f.write(value)

    in_netns(netns, write)


class Lab:
    """The built cluster plus helpers to run processes and traffic inside it. Build with ``build_lab``."""

    def __init__(self, lab_id: str) -> None:
        self.id = lab_id
        self.fabric_netns = f"{lab_id}f"
        self.nodes: dict[str, Node] = {}
        self.pods: dict[str, LabPod] = {}
        self._netns: list[str] = []
        self._pod_seq = 0
        self._procs: list[subprocess.Popen[Any]] = []
        self._relays: list[Relay] = []
        self._files: list[io.IOBase] = []
        self._www = tempfile.mkdtemp(prefix="podcap-lab-")
        with open(os.path.join(self._www, "hello.txt"), "w") as f:
            f.write("hello from the podcap lab\n")

    # --- building -------------------------------------------------------------------------------------------
    def _add_netns(self, name: str) -> None:
        self._netns.append(name)  # recorded first: a half-created namespace is still deleted at teardown
        _ip(["netns", "add", name])

    def _build(self, node_count: int) -> None:
        self._add_netns(self.fabric_netns)
        fabric = ["link add br0 type bridge", "link set br0 up", "link set lo up"]
        for i in range(1, node_count + 1):
            node = Node(f"node-{i}", f"{self.id}n{i}", f"10.250.0.{i}", f"fd00:250::{i}")
            self.nodes[node.name] = node
            self._add_netns(node.netns)
            _sysctl(node.netns, {"net.ipv6.conf.default.accept_dad": "0"})
            fabric += [
                f"link add vn{i} type veth peer name eth0 netns {node.netns}",
                f"link set vn{i} master br0",
                f"link set vn{i} up",
            ]
        _ip(["-n", self.fabric_netns], fabric)
        for i, node in enumerate(self.nodes.values(), start=1):
            _sysctl(
                node.netns,
                {
                    "net.ipv4.ip_forward": "1",
                    "net.ipv6.conf.all.forwarding": "1",
                    "net.ipv4.conf.all.rp_filter": "0",
                    "net.ipv4.conf.default.rp_filter": "0",
                },
            )
            # Like a real node's gateway; nobody holds .254, so unknown destinations die on the fabric bridge.
            # Needed for Calico's trick: proxy ARP answers for 169.254.1.1 only if it routes out of another device.
            routes = [f"route add default via {_FABRIC_GW}"]
            for j in range(1, node_count + 1):
                if j != i:
                    routes += [
                        f"route add 10.251.{j}.0/24 via 10.250.0.{j}",
                        f"route add fd00:251:{j}::/64 via fd00:250::{j}",
                    ]
            _ip(
                ["-n", node.netns],
                [
                    "link set lo up",
                    "link set eth0 up",
                    f"addr add {node.ip}/24 dev eth0",
                    f"addr add {node.ip6}/64 dev eth0 nodad",
                    *routes,
                ],
            )

    def add_pod(self, node: str, namespace: str, name: str, ip: str, *, ip6: str = "") -> LabPod:
        """Wire a pod into ``node`` the way Calico does and start its "container" process."""
        if name in self.pods:
            raise ValueError(f"pod {name} already exists in the lab")
        host = self.nodes[node]
        self._pod_seq += 1  # not len(pods): a failed add_pod must not hand its name to the next pod
        netns = f"{self.id}p{self._pod_seq}"
        host_if, mac = calico_if_name(namespace, name), _pod_mac(namespace, name)
        self._add_netns(netns)
        _sysctl(netns, {"net.ipv6.conf.default.accept_dad": "0"})
        node_cmds = [
            f"link add {host_if} address {_CALI_MAC} type veth peer name eth0 address {mac} netns {netns}",
            f"link set {host_if} up",
            f"route add {ip}/32 dev {host_if} scope link",
        ]
        pod_cmds = ["link set lo up", "link set eth0 up", f"addr add {ip}/32 dev eth0"]
        pod_cmds.append(f"route add default via {_CALI_GW4} dev eth0 onlink")
        if ip6:
            node_cmds.append(f"route add {ip6}/128 dev {host_if}")
            pod_cmds += [f"addr add {ip6}/128 dev eth0 nodad", f"route add default via {_CALI_GW6} dev eth0"]
        _ip(["-n", host.netns], node_cmds)
        _sysctl(
            host.netns,
            {
                f"net.ipv4.conf.{host_if}.proxy_arp": "1",
                f"net.ipv4.neigh.{host_if}.proxy_delay": "0",  # answer ARP at once, not after up to 0.8 s
                f"net.ipv4.conf.{host_if}.forwarding": "1",
                f"net.ipv6.conf.{host_if}.forwarding": "1",
            },
        )
        _ip(["-n", netns], pod_cmds)
        container = self.popen(netns, ["sleep", "infinity"], stdin=subprocess.DEVNULL)
        pod = LabPod(
            namespace=namespace,
            name=name,
            node=node,
            netns=netns,
            ip=ip,
            ip6=ip6,
            host_if=host_if,
            pod_mac=mac,
            container_pid=container.pid,
        )
        self.pods[name] = pod
        return pod

    # --- processes ------------------------------------------------------------------------------------------
    def popen(self, netns: _Where, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside ``netns`` (``ip netns exec`` execs it: the pid is the command's own).

        Killed at teardown; file objects given as stdin/stdout/stderr are closed with it (the lab owns them,
        like the process). Proxy variables are dropped from the environment.
        """
        kw["env"] = _clean_env(kw.get("env"))
        proc: subprocess.Popen[Any] = subprocess.Popen(["ip", "netns", "exec", _ns(netns), *argv], **kw)
        self._procs.append(proc)
        self._files += [
            kw[k]
            for k in ("stdin", "stdout", "stderr")
            if isinstance(kw.get(k), io.IOBase) and kw[k] not in _STD
        ]
        return proc

    def run(
        self,
        netns: _Where,
        argv: Sequence[str],
        *,
        timeout: float = 30,
        check: bool = True,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", _ns(netns), *argv],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
            env=_clean_env(None),
        )

    # --- traffic --------------------------------------------------------------------------------------------
    def http_server(self, netns: _Where, port: int, *, bind: str = "0.0.0.0") -> subprocess.Popen[Any]:
        """``python -m http.server`` in ``netns`` serving ``/hello.txt``; returns once it accepts connections."""
        proc = self.popen(
            netns,
            [sys.executable, "-m", "http.server", "--bind", bind, "--directory", self._www, str(port)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        probe = ("::1", socket.AF_INET6) if ":" in bind else ("127.0.0.1", socket.AF_INET)
        deadline = time.monotonic() + 15
        while True:
            with netns_socket(_ns(netns), probe[1]) as sock:
                if sock.connect_ex((probe[0], port)) == 0:
                    return proc
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"http.server on port {port} in {_ns(netns)} did not start (rc={proc.poll()})"
                )
            time.sleep(0.02)

    def http_get(self, from_netns: _Where, url: str, timeout: float = 5) -> int:
        """HTTP status of GET ``url`` from inside ``from_netns``; raises CalledProcessError if no response."""
        if _have_curl():
            argv = ["curl", "-sS", "--noproxy", "*", "-o", "/dev/null", "-w", "%{http_code}"]
            argv += ["--max-time", str(timeout), url]
        else:
            argv = [sys.executable, "-c", _URLLIB_GET, url, str(timeout)]
        return int(self.run(from_netns, argv, timeout=timeout + 10).stdout.strip())

    def udp_send(self, from_netns: _Where, ip: str, port: int, payload: bytes, count: int = 1) -> None:
        """Send ``count`` datagrams from a socket inside ``from_netns`` (no subprocess)."""
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        with netns_socket(_ns(from_netns), family, socket.SOCK_DGRAM) as sock:
            for _ in range(count):
                sock.sendto(payload, (ip, port))

    def ping(self, from_netns: _Where, ip: str, timeout: float = 2.0) -> bool:
        """One ICMP echo from inside ``from_netns`` over a raw socket (no ping binary needed); True on reply."""
        v6 = ":" in ip
        family, proto, request, reply = (
            (socket.AF_INET6, socket.IPPROTO_ICMPV6, 128, 129)
            if v6
            else (socket.AF_INET, socket.IPPROTO_ICMP, 8, 0)
        )
        ident = secrets.randbelow(0xFFFF)
        packet = struct.pack("!BBHHH", request, 0, 0, ident, 1) + b"podcap-lab"
        if not v6:  # the kernel fills in the ICMPv6 checksum, not the ICMPv4 one
            packet = packet[:2] + struct.pack("!H", _checksum(packet)) + packet[4:]
        deadline = time.monotonic() + timeout
        with netns_socket(_ns(from_netns), family, socket.SOCK_RAW, proto) as sock:
            sock.sendto(packet, (ip, 0))
            while (left := deadline - time.monotonic()) > 0:
                sock.settimeout(left)
                try:
                    data, _ = sock.recvfrom(2048)
                except TimeoutError:
                    break
                icmp = data if v6 else data[(data[0] & 0x0F) * 4 :]  # raw v4 sockets see the IP header
                if len(icmp) >= 8 and icmp[0] == reply and struct.unpack("!H", icmp[4:6])[0] == ident:
                    return True
        return False

    # --- crossing into the root namespace -------------------------------------------------------------------
    def forward_into(self, netns: _Where, listen_port: int, root_host: str, root_port: int) -> Relay:
        """Listen on 127.0.0.1:``listen_port`` inside ``netns`` (0 = any), relaying to root-ns host:port."""
        listener = netns_socket(_ns(netns))
        return self._relay(
            listener, ("127.0.0.1", listen_port), lambda: socket.create_connection((root_host, root_port), 5)
        )

    def forward_out(
        self, root_host: str, root_port: int, netns: _Where, target_host: str, target_port: int
    ) -> Relay:
        """Listen on ``root_host``:``root_port`` in the root ns (0 = any), relaying to host:port inside ``netns``."""
        listener = socket.socket(socket.AF_INET6 if ":" in root_host else socket.AF_INET)
        target = _ns(netns)

        def connect() -> socket.socket:
            family = socket.AF_INET6 if ":" in target_host else socket.AF_INET
            sock = netns_socket(target, family)
            try:
                sock.settimeout(5)
                sock.connect((target_host, target_port))
                sock.settimeout(None)
            except OSError:
                sock.close()
                raise
            return sock

        return self._relay(listener, (root_host, root_port), connect)

    def _relay(self, listener: socket.socket, address: tuple[str, int], connect: Any) -> Relay:
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(address)
            listener.listen(64)
        except OSError:
            listener.close()
            raise
        relay = Relay(listener, connect)
        self._relays.append(relay)
        return relay

    # --- teardown -------------------------------------------------------------------------------------------
    def netns_names(self) -> list[str]:
        return list(self._netns)

    def close(self) -> None:
        """Stop relays and processes, kill whatever else runs in the lab's namespaces, delete them."""
        errors: list[BaseException] = []
        for relay in self._relays:
            try:
                relay.close()
            except Exception as exc:
                errors.append(exc)
        for proc in reversed(self._procs):
            _stop(proc)
        for file in self._files:
            file.close()
        try:
            _kill_inside(self._netns)
        except Exception as exc:
            errors.append(exc)
        existing = [name for name in self._netns if os.path.exists(os.path.join(_NETNS_DIR, name))]
        if existing:
            try:
                _ip(["-force"], [f"netns del {name}" for name in existing])
            except Exception as exc:
                errors.append(exc)
        shutil.rmtree(self._www, ignore_errors=True)
        if errors:
            raise errors[0]


_URLLIB_GET = """
import sys, urllib.error, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    with opener.open(sys.argv[1], timeout=float(sys.argv[2])) as r:
        print(r.status)
except urllib.error.HTTPError as e:
    print(e.code)
"""


@cache
def _have_curl() -> bool:
    return shutil.which("curl") is not None


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = int(sum(struct.unpack(f"!{len(data) // 2}H", data)))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def _pids_in(names: Sequence[str]) -> list[int]:
    """Processes whose netns is one of ``names`` (what ``ip netns pids`` does, for all names in one pass)."""
    keys = set()
    for name in names:
        with contextlib.suppress(OSError):
            st = os.stat(netns_path(name))
            keys.add((st.st_dev, st.st_ino))
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and keys:
            with contextlib.suppress(OSError):
                st = os.stat(f"/proc/{entry}/ns/net")
                if (st.st_dev, st.st_ino) in keys:
                    pids.append(int(entry))
    return pids


def _kill_inside(names: Sequence[str]) -> None:
    """SIGKILL everything left in the namespaces and wait until none is left (a zombie has left its netns)."""
    deadline = time.monotonic() + 10
    while pids := _pids_in(names):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {pids} survived SIGKILL in lab namespaces {list(names)}")
        time.sleep(0.01)


def _free_lab_id() -> str:
    taken = set(os.listdir(_NETNS_DIR)) if os.path.isdir(_NETNS_DIR) else set()
    while True:
        lab_id = f"pc{os.getpid():x}x{secrets.token_hex(2)[:3]}"
        if not any(name.startswith(lab_id) for name in taken):
            return lab_id


@contextlib.contextmanager
def build_lab(*, nodes: int = 2, default_pods: bool = True) -> Iterator[Lab]:
    """Build the lab, yield it, and tear it all down afterwards even if building or the test fails.

    Default pods: ``client`` (namespace ``shop``) on node-1 at 10.251.1.10 / fd00:251:1::10 and ``server`` on
    node-2 at 10.251.2.10 / fd00:251:2::10. Node N is 10.250.0.N / fd00:250::N, its pods live in 10.251.N.0/24.
    """
    lab = Lab(_free_lab_id())
    try:
        lab._build(nodes)
        if default_pods:
            lab.add_pod("node-1", "shop", "client", "10.251.1.10", ip6="fd00:251:1::10")
            lab.add_pod("node-2", "shop", "server", "10.251.2.10", ip6="fd00:251:2::10")
        yield lab
    finally:
        lab.close()


# --- pytest integration ---------------------------------------------------------------------------------------
@cache
def netns_problem() -> str | None:
    """Why network-namespace tests cannot run here, or None when they can (probed once per process)."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None or shutil.which("nsenter") is None:
        return "needs iproute2 (ip) and util-linux (nsenter)"
    probe = f"pc{os.getpid():x}x{secrets.token_hex(2)[:3]}t"
    try:
        _ip(["netns", "add", probe])
    except RuntimeError as exc:
        return f"cannot create a network namespace: {exc}"
    _ip(["netns", "del", probe])
    return None


def require_netns(*, tcpdump: bool = False) -> None:
    """Skip when namespaces are unavailable, except under CI=true where that is a failure, never a skip."""
    problem = netns_problem()
    if problem is None and tcpdump and shutil.which("tcpdump") is None:
        problem = "needs tcpdump"
    if problem is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"netns tests cannot run under CI: {problem}", pytrace=False)
    pytest.skip(problem)


def sweep_stale_namespaces(*, own_pid_is_stale: bool = False) -> list[str]:
    """Delete lab namespaces left by dead runs and return their names.

    Only names in the lab's format whose creator pid no longer exists count. At session start, before this
    process built any lab, a name carrying our own pid is also stale (a dead run whose pid was reused).
    """
    if not os.path.isdir(_NETNS_DIR) or os.geteuid() != 0:
        return []
    stale = []
    for name in os.listdir(_NETNS_DIR):
        match = _NAME_RE.fullmatch(name)
        if match is None:
            continue
        pid = int(match["pid"], 16)
        if pid != os.getpid() or not own_pid_is_stale:
            try:
                os.kill(pid, 0)
                continue
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
        stale.append(name)
    if stale:
        with contextlib.suppress(Exception):  # a sweep is a courtesy: it must never fail a session
            _kill_inside(stale)
            _ip(["-force"], [f"netns del {name}" for name in stale])
    return stale


def pytest_sessionstart(session: pytest.Session) -> None:
    sweep_stale_namespaces(own_pid_is_stale=True)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("netns") is not None:
        require_netns(tcpdump=True)


@pytest.fixture
def lab() -> Iterator[Lab]:
    """A fresh two-node lab with the default ``client`` and ``server`` pods, torn down after the test."""
    require_netns()
    with build_lab() as built:
        yield built
