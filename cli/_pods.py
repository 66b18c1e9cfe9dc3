"""How `podcap pods` shows the pods a caller may capture: a table, or JSON/YAML (`-o json|yaml`) for scripts."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, TextIO

from podcap.api.v1 import capture_pb2

from ._output import dump


def pod_dict(pod: capture_pb2.PodInfo) -> dict[str, Any]:
    return {
        "namespace": pod.namespace,
        "name": pod.name,
        "node": pod.node,
        "pod_ip": pod.pod_ip,
        "host_network": pod.host_network,
    }


def print_pods(pods: Sequence[capture_pb2.PodInfo], output: str, out: TextIO = sys.stdout) -> None:
    views = [pod_dict(pod) for pod in pods]
    if output != "text":
        print(dump(views, output), file=out)
        return
    if not views:
        print("no running pods that you may capture", file=sys.stderr)
        return
    rows = [
        (f"{v['namespace']}/{v['name']}", v["node"], v["pod_ip"], "host" if v["host_network"] else "pod")
        for v in views
    ]
    header = ("POD", "NODE", "IP", "NETWORK")
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(3)]
    for row in (header, *rows):
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)),
            row[3],
            sep="  ",
            file=out,
        )
