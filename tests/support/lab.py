"""A simulated cluster built from network namespaces, for tests that need real veths, wired like real CNIs.

Each node and each pod is its own netns; nodes meet on a bridge in a separate "fabric" netns. A pod hangs off its
node the way its ``cni`` would wire it (all four can share a node, each pod names its own):

* ``calico``: host veth ``cali`` + 11 hex of sha1("ns.pod"), MAC ee:ee:ee:ee:ee:ee, a /32 (/128) route to it and
  proxy ARP; the pod routes everything via 169.254.1.1 (v6: Calico's link-local).
* ``bridge`` (flannel, the CNI bridge plugin): host veth ``veth`` + 8 hex, a port of the node's ``cni0`` bridge,
  which holds the .1 gateway of the node's pod /24 (::1 of its /64); pods sit on that subnet and the bridge
  learns their MACs. A route lookup on the node names ``cni0``, not the pod's device.
* ``cilium``: host veth ``lxc`` + 12 hex; the node routes the pod IP via ``cilium_host`` (one end of the
  cilium_host/cilium_net pair, holding the router IP .254) with a permanent neighbour entry, and a tc u32 filter
  on cilium_host's egress redirects the pod's packets to its lxc device, standing in for Cilium's BPF. A route
  lookup names ``cilium_host``; only the namespace scan finds the lxc device.
* ``eni`` (AWS VPC CNI): host veth ``eni`` + 11 hex, a /32 (/128) route to it, no proxy ARP: the pod has a
  permanent neighbour entry for its 169.254.1.1 gateway instead; v6 goes via fe80::1 on the host veth.

``extra_interfaces`` adds Multus-style secondary interfaces (``net1``...): veths to a bridge of the node.

A ``sleep infinity`` "container" runs in every pod netns so that ``/proc/PID/ns/net`` points at it, as on a real
node. ``netns_dir`` says where the "runtime" leaves the namespace: named in /run/netns (CNI tooling), bind-mounted
in another directory (dockerd's /var/run/docker/netns), or nowhere, so that only the container's
/proc/PID/ns/net leads to it. ``LabPod.netns`` is then a path rather than a name; every helper takes either.

The root namespace gets no address, route or interface: tests reach in and out only through
``forward_into``/``forward_out`` relays (like ``kubectl port-forward``). The lab holds a file descriptor on each of
its namespaces until teardown, so it can always find and kill what runs in them, even unnamed ones, and their
identity (inode) is never reused while it does.

Names are ``pc<creator pid hex>x<3 hex>`` + a role (``f`` fabric, ``nN`` node, ``pN`` pod), at most 15 chars, and
every process the lab starts carries ``PODCAP_LAB=<that prefix>`` in its environment, so parallel runs never
collide and a session can sweep namespaces, mounts and processes of runs whose creator died.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import ipaddress
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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import pytest

from tests.support.netns import Relay, in_netns, netns_path, netns_socket

__all__ = [
    "CNI_LAB_PODS",
    "ExtraInterface",
    "Lab",
    "LabPod",
    "Node",
    "PodInterface",
    "build_cni_lab",
    "build_lab",
    "calico_if_name",
    "require_netns",
    "sweep_stale_namespaces",
]

_NAME_RE = re.compile(r"pc(?P<pid>[0-9a-f]{1,6})x[0-9a-f]{3}(?:f|t|n\d+|p\d+)")
_RUN_RE = re.compile(rb"pc(?P<pid>[0-9a-f]{1,6})x[0-9a-f]{3}")
_SCRATCH_RE = re.compile(r"/podcap-lab-pc(?P<pid>[0-9a-f]{1,6})x[0-9a-f]{3}-[^/]*/")
_NETNS_DIR = "/run/netns"
_TAG = "PODCAP_LAB"
_PROXY_VARS = {"http_proxy", "https_proxy", "all_proxy", "no_proxy", "ftp_proxy"}
_CNIS = ("calico", "bridge", "cilium", "eni")
# Calico gives every host-side veth this MAC and points pods at 169.254.1.1 / its v6 link-local address.
_CALI_MAC = "ee:ee:ee:ee:ee:ee"
_CALI_GW4 = "169.254.1.1"
_CALI_GW6 = "fe80::ecee:eeff:feee:eeee"
# The AWS VPC CNI's pod gateway; our eni and lxc devices also answer for fe80::1 as the pods' v6 gateway.
_ENI_GW4 = "169.254.1.1"
_LINK_GW6 = "fe80::1"
_FABRIC_GW = "10.250.0.254"
_STD = (sys.stdin, sys.stdout, sys.stderr, sys.__stdin__, sys.__stdout__, sys.__stderr__)


@dataclass(frozen=True)
class Node:
    name: str
    netns: str
    ip: str
    ip6: str = ""


@dataclass(frozen=True)
class ExtraInterface:
    """A secondary pod interface the way Multus adds one: a veth from the pod to a port of bridge ``network`` on
    the node (created on first use, without an address: the pods on it talk to each other)."""

    name: str
    addresses: tuple[str, ...] = ()  # CIDRs in the pod, v4 and/or v6
    network: str = "mnet1"


@dataclass(frozen=True)
class PodInterface:
    """A pod interface besides eth0, and its peer on the node."""

    name: str
    host_if: str
    mac: str
    addresses: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class LabPod:
    namespace: str
    name: str
    node: str
    netns: str  # a name in /run/netns, or a path when the pod's namespace has none (see netns_dir)
    ip: str
    host_if: str  # the node-side device of eth0
    pod_if: str = "eth0"
    pod_mac: str
    container_pid: int
    ip6: str = ""
    cni: str = "calico"
    extra: tuple[PodInterface, ...] = ()


_Where = str | Node | LabPod


def calico_if_name(namespace: str, pod: str) -> str:
    """The host-side veth name Calico derives for a pod (libcalico-go ``VethNameForWorkload``)."""
    return "cali" + _hex(f"{namespace}.{pod}", 11)


def _hex(text: str, n: int) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:n]


def _pod_mac(namespace: str, pod: str) -> str:
    """Deterministic locally administered unicast MAC, so tests can compare against a known value."""
    digest = hashlib.sha256(f"{namespace}/{pod}".encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02, *digest[:5]))


def _ns(where: _Where) -> str:
    return where if isinstance(where, str) else where.netns


def _enter(netns: str) -> list[str]:
    """The command prefix that runs a program inside ``netns`` (a name or a namespace path) as its own pid."""
    if "/" in netns:
        return ["nsenter", f"--net={netns}", "--"]
    return ["ip", "netns", "exec", netns]


def _clean_env(env: dict[str, str] | None, tag: str) -> dict[str, str]:
    """The lab namespaces have no route out, and nothing run in them may be steered to a proxy outside.

    The tag lets a later session find processes of a run that died, even in namespaces without a name.
    """
    clean = {
        k: v for k, v in (env if env is not None else os.environ).items() if k.lower() not in _PROXY_VARS
    }
    clean[_TAG] = tag
    return clean


def _batch(argv: Sequence[str], batch: Sequence[str] = ()) -> None:
    """One ``ip``/``tc`` call; with ``batch`` lines, ``<argv> -batch -`` runs them in one process."""
    argv = [*argv] + (["-batch", "-"] if batch else [])
    done = subprocess.run(
        argv, input="\n".join(batch), capture_output=True, text=True, timeout=30, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()}\n" + "\n".join(batch))


def _ip(args: Sequence[str], batch: Sequence[str] = ()) -> None:
    _batch(["ip", *args], batch)


def _tc(netns: str, batch: Sequence[str]) -> None:
    _batch(["tc", "-n", netns], batch)


def _sysctl(netns: str, values: dict[str, str]) -> None:
    """Write net.* sysctls of ``netns`` from a thread inside it (/proc/sys/net shows the caller's netns)."""

    def write() -> None:
        for key, value in values.items():
            with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
                f.write(value)

    in_netns(netns, write)


def _forwarding(dev: str) -> dict[str, str]:
    return {f"net.ipv4.conf.{dev}.forwarding": "1", f"net.ipv6.conf.{dev}.forwarding": "1"}


def _hosts(ip: str, prefix: int) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(f"{ip}/{prefix}", strict=False)


@dataclass
class _Wiring:
    """What wiring one pod's eth0 takes: commands in the node and in the pod, and how to undo the node's part
    that does not vanish with the pod's veth (Cilium's routes, neighbours and tc filters)."""

    host_if: str
    node: list[str]
    pod: list[str]
    sysctls: dict[str, str]
    tc: list[str]
    undo_ip: list[str]
    undo_tc: list[str]


class Lab:
    """The built cluster plus helpers to run processes and traffic inside it. Build with ``build_lab``."""

    def __init__(self, lab_id: str) -> None:
        self.id = lab_id
        self.fabric_netns = f"{lab_id}f"
        self.nodes: dict[str, Node] = {}
        self.pods: dict[str, LabPod] = {}
        self._netns: list[str] = []
        self._pins: dict[str, int] = {}  # namespace name as created -> fd keeping it (and its inode) alive
        self._pod_netns: dict[str, str] = {}  # pod -> namespace name as created
        self._undo: dict[str, _Wiring] = {}
        self._infra: set[tuple[str, str]] = set()  # (node, thing) built once per node: cni0, cilium_host, ...
        self._mounts: list[str] = []
        self._pod_seq = 0
        self._procs: list[subprocess.Popen[Any]] = []
        self._relays: list[Relay] = []
        self._files: list[io.IOBase] = []
        self.scratch = tempfile.mkdtemp(prefix=f"podcap-lab-{lab_id}-")
        self._www = os.path.join(self.scratch, "www")
        os.mkdir(self._www)
        with open(os.path.join(self._www, "hello.txt"), "w") as f:
            f.write("hello from the podcap lab\n")

    # --- building -------------------------------------------------------------------------------------------
    def _add_netns(self, name: str) -> None:
        self._netns.append(name)  # recorded first: a half-created namespace is still deleted at teardown
        _ip(["netns", "add", name])
        self._pins[name] = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)

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

    def add_pod(
        self,
        node: str,
        namespace: str,
        name: str,
        ip: str,
        *,
        ip6: str = "",
        cni: str = "calico",
        extra_interfaces: Sequence[ExtraInterface] = (),
        netns_dir: str | None = _NETNS_DIR,
        resolv_conf: str | None = None,
    ) -> LabPod:
        """Wire a pod into ``node`` the way ``cni`` does and start its "container" process.

        ``netns_dir``: /run/netns leaves the namespace named (``LabPod.netns`` is the name); another directory
        bind-mounts it there under the generated name and removes the name; None removes the name, so only
        ``/proc/<container_pid>/ns/net`` leads to it. Either way the lab still tears it down.

        ``resolv_conf``: the text of the container's /etc/resolv.conf. The container then runs in a mount
        namespace of its own (``unshare --mount``) with that file bind-mounted over /etc/resolv.conf, as a runtime
        mounts the kubelet's file into each container; the mount dies with the container.
        """
        if name in self.pods:
            raise ValueError(f"pod {name} already exists in the lab")
        if cni not in _CNIS:
            raise ValueError(f"unknown cni {cni!r}; the lab wires {', '.join(_CNIS)}")
        host = self.nodes[node]
        self._pod_seq += 1  # not len(pods): a failed add_pod must not hand its name to the next pod
        label = f"{self.id}p{self._pod_seq}"
        mac = _pod_mac(namespace, name)
        self._add_netns(label)
        _sysctl(label, {"net.ipv6.conf.default.accept_dad": "0"})
        wiring = {
            "calico": self._calico,
            "bridge": self._bridge,
            "cilium": self._cilium,
            "eni": self._eni,
        }[cni](host, label, namespace, name, ip, ip6, mac)
        self._undo[name] = wiring
        _ip(["-n", host.netns], wiring.node)
        _sysctl(host.netns, wiring.sysctls)
        if wiring.tc:
            _tc(host.netns, wiring.tc)
        _ip(["-n", label], ["link set lo up", "link set eth0 up", *wiring.pod])
        extra = tuple(self._extra(host, label, namespace, name, iface) for iface in extra_interfaces)
        container = self.popen(label, self._container(label, resolv_conf), stdin=subprocess.DEVNULL)
        self._wait_inside(container.pid, label, "sleep")
        self._pod_netns[name] = label
        pod = LabPod(
            namespace=namespace,
            name=name,
            node=node,
            netns=self._expose(label, container.pid, netns_dir),
            ip=ip,
            ip6=ip6,
            host_if=wiring.host_if,
            pod_mac=mac,
            container_pid=container.pid,
            cni=cni,
            extra=extra,
        )
        self.pods[name] = pod
        return pod

    def _once(self, node: Node, thing: str) -> bool:
        """True the first time ``thing`` is asked for on ``node``: build it then."""
        if (node.name, thing) in self._infra:
            return False
        self._infra.add((node.name, thing))
        return True

    def _calico(
        self, node: Node, label: str, namespace: str, name: str, ip: str, ip6: str, mac: str
    ) -> _Wiring:
        host_if = calico_if_name(namespace, name)
        w = _Wiring(host_if, [], [], {}, [], [], [])
        w.node += [
            f"link add {host_if} address {_CALI_MAC} type veth peer name eth0 address {mac} netns {label}",
            f"link set {host_if} up",
            f"route add {ip}/32 dev {host_if} scope link",
        ]
        w.pod += [f"addr add {ip}/32 dev eth0", f"route add default via {_CALI_GW4} dev eth0 onlink"]
        if ip6:
            w.node.append(f"route add {ip6}/128 dev {host_if}")
            w.pod += [f"addr add {ip6}/128 dev eth0 nodad", f"route add default via {_CALI_GW6} dev eth0"]
        w.sysctls = {
            f"net.ipv4.conf.{host_if}.proxy_arp": "1",
            f"net.ipv4.neigh.{host_if}.proxy_delay": "0",  # answer ARP at once, not after up to 0.8 s
            **_forwarding(host_if),
        }
        return w

    def _bridge(
        self, node: Node, label: str, namespace: str, name: str, ip: str, ip6: str, mac: str
    ) -> _Wiring:
        host_if = "veth" + _hex(f"{namespace}.{name}", 8)
        gw4 = _hosts(ip, 24)[1]
        w = _Wiring(host_if, [], [], _forwarding("cni0"), [], [], [])
        if self._once(node, "cni0"):
            w.node += ["link add cni0 type bridge", "link set cni0 up"]
        w.node += [
            f"addr replace {gw4}/24 dev cni0",
            f"link add {host_if} type veth peer name eth0 address {mac} netns {label}",
            f"link set {host_if} master cni0",
            f"link set {host_if} up",
        ]
        w.pod += [f"addr add {ip}/24 dev eth0", f"route add default via {gw4} dev eth0"]
        if ip6:
            gw6 = _hosts(ip6, 64)[1]
            w.node.append(f"addr replace {gw6}/64 dev cni0 nodad")
            w.pod += [f"addr add {ip6}/64 dev eth0 nodad", f"route add default via {gw6} dev eth0"]
        return w

    def _cilium(
        self, node: Node, label: str, namespace: str, name: str, ip: str, ip6: str, mac: str
    ) -> _Wiring:
        lxc = "lxc" + _hex(f"{namespace}.{name}", 12)
        router4 = _hosts(ip, 24)[254]
        pref = 2 * self._pod_seq  # one tc filter per pod and family, deleted with the pod
        w = _Wiring(lxc, [], [], {**_forwarding(lxc), **_forwarding("cilium_host")}, [], [], [])
        if self._once(node, "cilium_host"):
            w.node += [
                "link add cilium_host type veth peer name cilium_net",
                "link set cilium_net up",
                "link set cilium_host up",
            ]
            w.tc.append("qdisc add dev cilium_host clsact")
        w.node += [
            f"addr replace {router4}/32 dev cilium_host",
            f"link add {lxc} type veth peer name eth0 address {mac} netns {label}",
            f"link set {lxc} up",
            f"route replace {ip}/32 dev cilium_host",
            f"neigh replace {ip} lladdr {mac} dev cilium_host nud permanent",
        ]
        w.tc.append(
            f"filter add dev cilium_host egress pref {pref} protocol ip "
            f"u32 match ip dst {ip}/32 action mirred egress redirect dev {lxc}"
        )
        w.undo_ip += [f"route del {ip}/32 dev cilium_host", f"neigh del {ip} dev cilium_host"]
        w.undo_tc.append(f"filter del dev cilium_host egress pref {pref}")
        # The pod's ARP for the router arrives on lxc; the node answers because the router IP is its own.
        w.pod += [
            f"addr add {ip}/32 dev eth0",
            f"route add {router4} dev eth0 scope link",
            f"route add default via {router4} dev eth0",
        ]
        if ip6:
            router6 = _hosts(ip6, 64)[254]
            w.node += [
                f"addr replace {router6}/128 dev cilium_host nodad",
                f"addr add {_LINK_GW6}/64 dev {lxc} nodad",
                f"route replace {ip6}/128 dev cilium_host",
                f"neigh replace {ip6} lladdr {mac} dev cilium_host nud permanent",
            ]
            w.tc.append(
                f"filter add dev cilium_host egress pref {pref + 1} protocol ipv6 "
                f"u32 match ip6 dst {ip6}/128 action mirred egress redirect dev {lxc}"
            )
            w.undo_ip += [f"route del {ip6}/128 dev cilium_host", f"neigh del {ip6} dev cilium_host"]
            w.undo_tc.append(f"filter del dev cilium_host egress pref {pref + 1}")
            w.pod += [f"addr add {ip6}/128 dev eth0 nodad", f"route add default via {_LINK_GW6} dev eth0"]
        return w

    def _eni(self, node: Node, label: str, namespace: str, name: str, ip: str, ip6: str, mac: str) -> _Wiring:
        eni, host_mac = "eni" + _hex(f"{namespace}.{name}", 11), _pod_mac(namespace, f"{name}/host")
        w = _Wiring(eni, [], [], _forwarding(eni), [], [], [])
        w.node += [
            f"link add {eni} address {host_mac} type veth peer name eth0 address {mac} netns {label}",
            f"link set {eni} up",
            f"route add {ip}/32 dev {eni} scope link",
        ]
        w.pod += [
            f"addr add {ip}/32 dev eth0",
            f"route add {_ENI_GW4} dev eth0 scope link",
            f"route add default via {_ENI_GW4} dev eth0",
            f"neigh add {_ENI_GW4} lladdr {host_mac} dev eth0 nud permanent",
        ]
        if ip6:
            w.node += [f"addr add {_LINK_GW6}/64 dev {eni} nodad", f"route add {ip6}/128 dev {eni}"]
            w.pod += [f"addr add {ip6}/128 dev eth0 nodad", f"route add default via {_LINK_GW6} dev eth0"]
        return w

    def _extra(self, node: Node, label: str, namespace: str, pod: str, iface: ExtraInterface) -> PodInterface:
        host_if = "veth" + _hex(f"{namespace}.{pod}/{iface.name}", 8)
        mac = _pod_mac(namespace, f"{pod}/{iface.name}")
        cmds = []
        if self._once(node, iface.network):
            cmds += [f"link add {iface.network} type bridge", f"link set {iface.network} up"]
        cmds += [
            f"link add {host_if} type veth peer name {iface.name} address {mac} netns {label}",
            f"link set {host_if} master {iface.network}",
            f"link set {host_if} up",
        ]
        _ip(["-n", node.netns], cmds)
        pod_cmds = [f"link set {iface.name} up"]
        pod_cmds += [
            f"addr add {a} dev {iface.name}" + (" nodad" if ":" in a else "") for a in iface.addresses
        ]
        _ip(["-n", label], pod_cmds)
        return PodInterface(iface.name, host_if, mac, tuple(iface.addresses))

    def _container(self, label: str, resolv_conf: str | None) -> list[str]:
        """The "container" command: ``sleep infinity``, under its own resolv.conf if one is given."""
        if resolv_conf is None:
            return ["sleep", "infinity"]
        path = os.path.join(self.scratch, f"{label}-resolv.conf")
        with open(path, "w") as f:
            f.write(resolv_conf)
        mount = 'mount --bind "$1" /etc/resolv.conf && exec sleep infinity'
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", mount, "sh", path]

    def _wait_inside(self, pid: int, label: str, comm: str) -> None:
        """Until ``pid`` (``ip netns exec`` at first) has entered the namespace and exec'd ``comm``."""
        want = _fd_key(self._pins[label])
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError):
                if _key(f"/proc/{pid}/ns/net") == want and _comm(pid) == comm:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"container process {pid} never entered {label}")
            time.sleep(0.001)

    def _expose(self, label: str, pid: int, netns_dir: str | None) -> str:
        """Leave the pod's namespace where ``netns_dir`` says; returns what ``LabPod.netns`` should be."""
        if netns_dir == _NETNS_DIR:
            return label
        if netns_dir is None:
            _ip(["netns", "delete", label])
            return f"/proc/{pid}/ns/net"
        os.makedirs(netns_dir, exist_ok=True)
        target = os.path.join(netns_dir, label)
        with open(target, "x"):
            pass  # the mount point
        self._mounts.append(target)
        subprocess.run(["mount", "--bind", netns_path(label), target], check=True, capture_output=True)
        _ip(["netns", "delete", label])
        return target

    def delete_pod(self, name: str) -> None:
        """Delete a pod the way the kubelet does: its processes die and its namespace, with its veth, goes away."""
        pod = self.pods.pop(name)
        label = self._pod_netns.pop(name)
        pin = self._pins.pop(label)
        try:
            _kill_inside([_fd_key(pin)])
            for proc in self._procs:
                if proc.pid == pod.container_pid:
                    _stop(proc)  # reaps it
            wiring = self._undo.pop(name)
            if wiring.undo_ip:
                _ip(["-n", self.nodes[pod.node].netns, "-force"], wiring.undo_ip)
            if wiring.undo_tc:
                _tc(self.nodes[pod.node].netns, wiring.undo_tc)
            if pod.netns in self._mounts:
                self._mounts.remove(pod.netns)
                _unmount(pod.netns)
            if os.path.exists(netns_path(label)):
                _ip(["netns", "delete", label])
        finally:
            os.close(pin)
        # Like CNI DEL, return once the node-side devices are gone (the kernel destroys a namespace, and the
        # veths in it, asynchronously after its last reference goes).
        gone = [pod.host_if, *(iface.host_if for iface in pod.extra)]
        in_netns(self.nodes[pod.node].netns, lambda: _wait_gone(gone))

    # --- processes ------------------------------------------------------------------------------------------
    def popen(self, netns: _Where, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside ``netns`` (``ip netns exec``/``nsenter`` exec it: the pid is the command's own).

        Killed at teardown; file objects given as stdin/stdout/stderr are closed with it (the lab owns them,
        like the process). Proxy variables are dropped from the environment.
        """
        kw["env"] = _clean_env(kw.get("env"), self.id)
        proc: subprocess.Popen[Any] = subprocess.Popen([*_enter(_ns(netns)), *argv], **kw)
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
            [*_enter(_ns(netns)), *argv],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
            env=_clean_env(None, self.id),
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

    @contextlib.contextmanager
    def tcpdumps(self, *ends: tuple[_Where, str, str]) -> Iterator[None]:
        """Real tcpdump on each (netns, device, pcap path) at once, listening before the body runs; stopped
        (SIGINT, so each writes out its buffer) and waited for when it ends."""
        procs: list[subprocess.Popen[Any]] = []
        try:
            for netns, device, path in ends:
                proc = self.popen(
                    netns,
                    ["tcpdump", "-Z", "root", "-i", device, "-w", path, "-U", "-n", "--immediate-mode"],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
                procs.append(proc)
                assert proc.stderr is not None
                line = proc.stderr.readline()
                if b"listening on" not in line:
                    raise RuntimeError(f"tcpdump on {device} did not start: {line!r}")
            yield
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGINT)
            for proc in procs:
                proc.wait(10)
                assert proc.stderr is not None
                proc.stderr.close()

    def dns_server(
        self, netns: _Where, records: dict[str, str], log: str | None = None, *, answer: bool = True
    ) -> subprocess.Popen[Any]:
        """A DNS server on UDP port 53 in ``netns``: A records from ``records`` (name -> IPv4), NXDOMAIN for other
        names, an empty answer for other types; with ``answer=False`` it reads queries and never answers. Each
        question is appended to ``log`` as "source-ip name type". Returns once it has bound its socket."""
        argv = [sys.executable, "-c", _DNS_SERVER, log or os.devnull, "1" if answer else ""]
        argv += [f"{name.lower()}={ip}" for name, ip in records.items()]
        proc = self.popen(netns, argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        assert proc.stdout is not None
        if proc.stdout.readline() != b"ready\n":
            raise RuntimeError(f"the DNS server in {_ns(netns)} did not start (rc={proc.poll()})")
        return proc

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
        """Stop relays and processes, kill whatever else runs in the lab's namespaces, unmount and delete them."""
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
            _kill_inside([_fd_key(fd) for fd in self._pins.values()])
        except Exception as exc:
            errors.append(exc)
        for mount in self._mounts:
            try:
                _unmount(mount)
            except Exception as exc:
                errors.append(exc)
        existing = [name for name in self._netns if os.path.exists(netns_path(name))]
        if existing:
            try:
                _ip(["-force"], [f"netns del {name}" for name in existing])
            except Exception as exc:
                errors.append(exc)
        for fd in self._pins.values():
            os.close(fd)
        self._pins.clear()
        shutil.rmtree(self.scratch, ignore_errors=True)
        if errors:
            raise errors[0]


_DNS_SERVER = r"""
import socket, struct, sys
log = open(sys.argv[1], "a", buffering=1)
answering, records = bool(sys.argv[2]), dict(arg.split("=") for arg in sys.argv[3:])
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("0.0.0.0", 53))
print("ready", flush=True)
while True:
    data, peer = sock.recvfrom(512)
    qid = struct.unpack("!H", data[:2])[0]
    i, labels = 12, []
    while data[i]:
        labels.append(data[i + 1 : i + 1 + data[i]].decode())
        i += 1 + data[i]
    qtype = struct.unpack("!H", data[i + 1 : i + 3])[0]
    question, name = data[12 : i + 5], ".".join(labels).lower()
    log.write(f"{peer[0]} {name} {qtype}\n")
    if not answering:
        continue
    answer, flags = b"", 0x8183  # NXDOMAIN
    if name in records:
        flags = 0x8180
        if qtype == 1:
            answer = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 30, 4) + socket.inet_aton(records[name])
    header = struct.pack("!HHHHHH", qid, flags, 1, 1 if answer else 0, 0, 0)
    sock.sendto(header + question + answer, peer)
"""

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


def _comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


def _key(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _fd_key(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _unmount(path: str) -> None:
    """Detach a namespace bind mount and remove its mount point (a plain file)."""
    done = subprocess.run(["umount", "--lazy", path], capture_output=True, text=True, check=False)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    if done.returncode != 0 and os.path.ismount(path):
        raise RuntimeError(f"umount {path} failed: {done.stderr.strip()}")


def _wait_gone(devices: Sequence[str]) -> None:
    """Until none of ``devices`` exists in the calling thread's netns."""
    deadline = time.monotonic() + 10
    for device in devices:
        while True:
            try:
                socket.if_nametoindex(device)
            except OSError:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{device} still exists 10 s after its pod's namespace was released")
            time.sleep(0.005)


def _pids_in(keys: Sequence[tuple[int, int]]) -> list[int]:
    """Processes whose netns is one of ``keys`` (nsfs identities; what ``ip netns pids`` does, in one pass)."""
    wanted = set(keys)
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and wanted:
            with contextlib.suppress(OSError):
                if _key(f"/proc/{entry}/ns/net") in wanted:
                    pids.append(int(entry))
    return pids


def _kill_inside(keys: Sequence[tuple[int, int]]) -> None:
    """SIGKILL everything left in the namespaces and wait until none is left (a zombie has left its netns).

    Identities only mean something while the namespaces are alive: callers hold them open (the lab's pins).
    """
    deadline = time.monotonic() + 10
    while pids := _pids_in(keys):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {pids} survived SIGKILL in lab namespaces")
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

    Default pods (Calico): ``client`` (namespace ``shop``) on node-1 at 10.251.1.10 / fd00:251:1::10 and
    ``server`` on node-2 at 10.251.2.10 / fd00:251:2::10. Node N is 10.250.0.N / fd00:250::N, its pods live in
    10.251.N.0/24 and fd00:251:N::/64.
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


# Pod name -> (node, last octet, cni, how the runtime exposes its netns). Node N's pods are 10.251.N.<octet> and
# fd00:251:N::<octet>. The multus pods also sit on the secondary network mnet1 as net1: 10.252.0.<octet>/24.
CNI_LAB_PODS: dict[str, tuple[str, int, str, str]] = {
    "calico-1": ("node-1", 10, "calico", "named"),
    "bridge-1": ("node-1", 20, "bridge", "named"),
    "bridge-1b": ("node-1", 21, "bridge", "named"),
    "cilium-1": ("node-1", 30, "cilium", "named"),
    "eni-1": ("node-1", 40, "eni", "named"),
    "multus-1": ("node-1", 50, "calico", "named"),
    "multus-1b": ("node-1", 51, "bridge", "named"),
    "procns-1": ("node-1", 60, "calico", "proc"),
    "dockerns-1": ("node-1", 70, "bridge", "dir"),
    "calico-2": ("node-2", 10, "calico", "named"),
    "bridge-2": ("node-2", 20, "bridge", "named"),
    "cilium-2": ("node-2", 30, "cilium", "named"),
    "eni-2": ("node-2", 40, "eni", "named"),
}


@contextlib.contextmanager
def build_cni_lab() -> Iterator[Lab]:
    """Two nodes with a pod of every wiring on each (``CNI_LAB_PODS``, namespace ``shop``, dual-stack).

    ``procns-1`` has no named namespace (only its container's /proc/PID/ns/net); ``dockerns-1``'s namespace is
    bind-mounted in ``<lab.scratch>/docker-netns``, like dockerd's. Pods of different CNIs on one node reach
    their node and other nodes' pods; same-subnet traffic between a bridge pod and a routed pod does not flow,
    as on a real node mixing the two.
    """
    with build_lab(default_pods=False) as lab:
        for name, (node, octet, cni, exposed) in CNI_LAB_PODS.items():
            n = node.rsplit("-", 1)[1]
            extra: tuple[ExtraInterface, ...] = ()
            if name.startswith("multus"):
                extra = (ExtraInterface("net1", (f"10.252.0.{octet}/24", f"fd00:252::{octet}/64")),)
            netns_dir = {"named": _NETNS_DIR, "proc": None, "dir": os.path.join(lab.scratch, "docker-netns")}
            lab.add_pod(
                node,
                "shop",
                name,
                f"10.251.{n}.{octet}",
                ip6=f"fd00:251:{n}::{octet}",
                cni=cni,
                extra_interfaces=extra,
                netns_dir=netns_dir[exposed],
            )
        yield lab


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
    """Delete lab namespaces left by dead runs, with their processes and bind mounts; return their names.

    Only names in the lab's format whose creator pid no longer exists count. At session start, before this
    process built any lab, a name carrying our own pid is also stale (a dead run whose pid was reused).
    Unnamed namespaces of dead runs die with their processes, found by the ``PODCAP_LAB`` tag.
    """
    if not os.path.isdir(_NETNS_DIR) or os.geteuid() != 0:
        return []

    def stale(pid: int) -> bool:
        if pid == os.getpid():
            return own_pid_is_stale
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    names = [n for n in os.listdir(_NETNS_DIR) if (m := _NAME_RE.fullmatch(n)) and stale(int(m["pid"], 16))]
    mounts = [p for p in _mount_points() if (m := _SCRATCH_RE.search(p)) and stale(int(m["pid"], 16))]
    with contextlib.suppress(Exception):  # a sweep is a courtesy: it must never fail a session
        keys = []
        for path in [*(netns_path(n) for n in names), *mounts]:
            with contextlib.suppress(OSError):
                keys.append(_key(path))
        for pid in _tagged_pids(stale):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _kill_inside(keys)
        for mount in mounts:
            _unmount(mount)
        if names:
            _ip(["-force"], [f"netns del {name}" for name in names])
    return names


def _mount_points() -> list[str]:
    """Mount points of this mount namespace (octal escapes of /proc/self/mountinfo decoded)."""
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), p) for p in points]


def _tagged_pids(stale: Callable[[int], bool]) -> list[int]:
    """Processes a lab of a stale run started (their environment carries its tag)."""
    pids = []
    marker = f"{_TAG}=".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        with contextlib.suppress(OSError), open(f"/proc/{entry}/environ", "rb") as f:
            for var in f.read().split(b"\0"):
                if var.startswith(marker) and (m := _RUN_RE.fullmatch(var[len(marker) :])):
                    if stale(int(m["pid"], 16)):
                        pids.append(int(entry))
                    break
    return pids


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


@pytest.fixture(scope="module")
def cni_lab() -> Iterator[Lab]:
    """``build_cni_lab()``, built once per test module: tests on it must leave it as they found it."""
    require_netns()
    with build_cni_lab() as built:
        yield built
