"""How `podcap diagnose` shows its ladder: a table of steps and the capture that recorded them, or JSON/YAML
(`-o json|yaml`: `steps` with name, ok, detail and milliseconds, and `capture_id`) for scripts."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from podcap.api.v1 import capture_pb2

from ._output import dump


def diagnosis_dict(response: capture_pb2.DiagnoseResponse) -> dict[str, Any]:
    # Built by hand rather than with protobuf's JSON printer, which leaves out `ok: false` (a default value) and
    # writes int64 milliseconds as strings.
    return {
        "steps": [
            {"name": s.name, "ok": s.ok, "detail": s.detail, "milliseconds": s.milliseconds}
            for s in response.steps
        ],
        "capture_id": response.capture_id,
    }


def print_diagnosis(
    response: capture_pb2.DiagnoseResponse, output: str, pod: str, out: TextIO = sys.stdout
) -> None:
    """`pod` names the pcap in the download hint."""
    view = diagnosis_dict(response)
    if output != "text":
        print(dump(view, output), file=out)
        return
    rows = [
        ("ok" if s["ok"] else "FAIL", s["name"], f"{s['milliseconds']} ms", s["detail"])
        for s in view["steps"]
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)] if rows else [0, 0, 0]
    for status, name, took, detail in rows:
        print(f"{status:<{widths[0]}}  {name:<{widths[1]}}  {took:>{widths[2]}}  {detail}", file=out)
    capture_id = view["capture_id"]
    print(
        f"\ncapture {capture_id} recorded this on the pod; once it has ended: "
        f"podcap download {capture_id} -f {pod}-diagnose.pcap",
        file=out,
    )
