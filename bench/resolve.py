"""Pod resolution on a busy node: how long the agent takes from a pod IP to the pod's host-side device.

Builds a lab node (tests/support/lab.py) with 200 Calico pods plus a few flannel/bridge, Cilium and AWS VPC CNI
pods, then runs the resolver the way the agent does, as a process inside that node's netns:

* cold: a fresh resolver per request, so every request pays the full scan (process start, agent restart);
* warm: one resolver, requests for random pods after a first scan (the agent's steady state);
* not on node: a pod of another node, which always costs a full scan (nothing to remember);
* netns_alive: the check the agent polls during a capture;
* for scale, one ``nsenter --net=… ip -j -d addr show``: what each namespace cost before the netlink reader.

It also reports whether all those requests left a file descriptor or a child process behind.

    python -m bench.resolve [--pods 200] [--requests 300] [--write-docs]

``--write-docs`` replaces the "Pod resolution" section of docs/bench.md with the printed one. Needs root.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from bench._docs import DOCS, write_section

_HEADING = "## Pod resolution"
_OTHER_CNIS = (("bridge", 4), ("cilium", 4), ("eni", 4))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.resolve", description=__doc__.split("\n")[0])
    parser.add_argument("--pods", type=int, default=200, help="Calico pods on the measured node")
    parser.add_argument("--requests", type=int, default=300, help="requests per measurement")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--write-docs", action="store_true", help="update the section in docs/bench.md")
    parser.add_argument("--probe", help=argparse.SUPPRESS)  # internal: the half that runs inside the node
    args = parser.parse_args(argv)
    if args.probe:
        print(json.dumps(_probe(json.loads(args.probe))))
        return 0
    if os.geteuid() != 0:
        print("bench.resolve needs root (it builds network namespaces)", file=sys.stderr)
        return 1
    section = _run(args.pods, args.requests, args.seed)
    print(section)
    if args.write_docs:
        write_section(_HEADING, section)
        print(f"updated {DOCS}")
    return 0


def _run(pods: int, requests: int, seed: int) -> str:
    from tests.support.lab import build_lab  # the test lab: imported only where namespaces are built

    if pods + sum(n for _, n in _OTHER_CNIS) > 240:
        raise SystemExit("at most 240 pods fit in the node's /24 next to the gateways")
    started = time.monotonic()
    with build_lab(default_pods=False) as lab:
        specs = [("calico", i) for i in range(pods)]
        specs += [(cni, i) for cni, count in _OTHER_CNIS for i in range(count)]
        for octet, (cni, i) in enumerate(specs, start=10):
            lab.add_pod(
                "node-1", "bench", f"{cni}-{i}", f"10.251.1.{octet}", ip6=f"fd00:251:1::{octet:x}", cni=cni
            )
        lab.add_pod("node-2", "bench", "elsewhere", "10.251.2.10", ip6="fd00:251:2::10")
        built = time.monotonic() - started
        node = lab.nodes["node-1"]
        here = [[p.ip] if i % 2 else [p.ip6] for i, p in enumerate(lab.pods.values()) if p.node == "node-1"]
        plan = {
            "here": here,
            "elsewhere": [lab.pods["elsewhere"].ip],
            "pod_netns": f"/run/netns/{lab.pods['calico-0'].netns}",
            "requests": requests,
            "seed": seed,
        }
        probe = [sys.executable, "-m", "bench.resolve", "--probe", json.dumps(plan)]
        done = lab.run(node, probe, timeout=600)
        result: dict[str, Any] = json.loads(done.stdout)
    return _section(result, pods, len(here), built, requests)


def _probe(plan: dict[str, Any]) -> dict[str, Any]:
    """Inside the node's netns: time the resolver like the agent uses it."""
    from podcap.agent._errors import PodNotOnNode
    from podcap.agent._resolve import Resolver

    rng = random.Random(plan["seed"])
    here: list[list[str]] = plan["here"]
    n: int = plan["requests"]
    fds, kids = _fd_count(), _children()

    cold = _timed(lambda: Resolver().resolve(rng.choice(here)), n)
    warm_resolver = Resolver()
    first = warm_resolver.resolve(rng.choice(here))
    warm = _timed(lambda: warm_resolver.resolve(rng.choice(here)), n)
    strategies = {warm_resolver.resolve(ips).strategy for ips in here}

    def elsewhere() -> None:
        try:
            warm_resolver.resolve(plan["elsewhere"])
        except PodNotOnNode:
            return
        raise AssertionError("a pod of another node was found on this one")

    missing = _timed(elsewhere, max(n // 3, 10))
    alive = _timed(lambda: warm_resolver.netns_alive(first), n)
    old_way = ["nsenter", f"--net={plan['pod_netns']}", "ip", "-j", "-d", "addr", "show"]
    nsenter = _timed(lambda: subprocess.run(old_way, check=True, capture_output=True), max(n // 10, 10))
    return {
        "cold": cold,
        "warm": warm,
        "missing": missing,
        "alive": alive,
        "nsenter": nsenter,
        "strategies": sorted(strategies),
        "fds_leaked": _fd_count() - fds,
        "children_left": len(_children()) - len(kids),
        "cpu": os.cpu_count(),
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
    }


def _timed(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000)
    return out


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _children() -> list[str]:
    kids = []
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children") as f:
            kids += f.read().split()
    return kids


def _stats(samples: list[float]) -> str:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return f"{statistics.median(ordered):.2f} | {p95:.2f} | {ordered[-1]:.2f} | {len(ordered)} |"


def _section(r: dict[str, Any], calico: int, pods: int, built: float, requests: int) -> str:
    others = ", ".join(f"{n} {cni}" for cni, n in _OTHER_CNIS)
    command = "sudo .venv/bin/python -m bench.resolve"
    if calico != 200 or requests != 300:
        command += f" --pods {calico} --requests {requests}"
    return f"""{_HEADING}

From a pod IP to the pod's host-side device on a node with {pods} pods ({calico} Calico, {others}), the
resolver running as a process inside the node's netns like the agent; random pods, asked by their v4 or v6 address.
Machine: {r["cpu"]} CPUs, Linux {r["kernel"]}, Python {r["python"]}; lab built in {built:.1f} s.

| request | p50 ms | p95 ms | max ms | n |
| --- | ---: | ---: | ---: | ---: |
| cold: fresh resolver, full scan of every namespace | {_stats(r["cold"])}
| warm: remembered namespace, re-read and re-checked | {_stats(r["warm"])}
| pod of another node (always a full scan) | {_stats(r["missing"])}
| `netns_alive` (polled during a capture) | {_stats(r["alive"])}
| for scale: one `nsenter --net=<pod netns> ip -j -d addr show` | {_stats(r["nsenter"])}

Warm answers said {" / ".join(f"`{s}`" for s in r["strategies"])}. After all requests the probe had
{r["fds_leaked"]} more open file descriptors and {r["children_left"]} more child processes than before.
The old scan ran that `nsenter … ip` once per pod namespace, about {statistics.median(r["nsenter"]) * pods:.0f} ms
for this node.

Reproduce: `{command}` (add `--write-docs` to rewrite this section).
"""


if __name__ == "__main__":
    raise SystemExit(main())
