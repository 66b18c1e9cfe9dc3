"""How the CLI shows captures: a short human view, or JSON (`-o json`) and YAML (`-o yaml`) for scripts.

The JSON view is flat for the common one-pod capture (node, interface, packets, ... at the top) and keeps every
target under `targets`, so scripts work the same for multi-pod captures. YAML has the same structure as JSON. The human view gives sizes in
powers of 1024 (1.2 MiB) and times in local time with their age ("2026-12-07 08:01:02 (3m ago)").
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, TextIO

from google.protobuf import json_format

from podcap.api.v1 import capture_pb2, common_pb2


def _state(value: int) -> str:
    return common_pb2.CaptureState.Name(value).removeprefix("CAPTURE_STATE_")  # type: ignore[arg-type]


def _time(capture: Any, field: str) -> str:
    return getattr(capture, field).ToJsonString() if capture.HasField(field) else ""


def _target(t: capture_pb2.CaptureTarget) -> dict[str, Any]:
    return {
        "namespace": t.namespace,
        "pod": t.pod,
        "node": t.node,
        "pod_ip": t.pod_ip,
        "interface": t.interface,
        "state": _state(t.state),
        "packets": t.stats.packets,
        "packets_received": t.stats.packets_received,
        "drops": None if t.stats.kernel_drops_unknown else t.stats.kernel_drops,  # None: unknown, not 0
        "interruption": t.interruption,
        "bytes": t.stats.bytes,
        "object_key": t.object_key,
        "sha256": t.sha256,
        "error": t.error,
        "started": _time(t, "start_time"),
        "ended": _time(t, "end_time"),
        "summary": json_format.MessageToDict(t.summary) if t.HasField("summary") else None,
        "resolution": (
            json_format.MessageToDict(t.resolution, preserving_proto_field_name=True)
            if t.HasField("resolution")
            else None
        ),
        "context": (
            json_format.MessageToDict(t.context, preserving_proto_field_name=True)
            if t.HasField("context")
            else None
        ),
    }


def capture_dict(c: capture_pb2.Capture) -> dict[str, Any]:
    targets = [_target(t) for t in c.targets]
    one = targets[0] if len(targets) == 1 else None
    return {
        "id": c.id,
        "state": _state(c.state),
        "namespace": c.namespace,
        "pod": c.pod,
        "label_selector": c.label_selector,
        "between": [
            f"{end.namespace}/{end.pod}" if end.pod else f"{end.namespace}/svc/{end.service}"
            for end in c.between
        ],
        "node": one["node"] if one else "",
        "interface": one["interface"] if one else "",
        "filter": c.filter,
        "duration_seconds": c.duration.ToTimedelta().total_seconds(),
        "limits": {
            "max_packets": c.limits.max_packets,
            "max_bytes": c.limits.max_bytes,
            "snaplen": c.limits.snaplen,
            "buffer_size": c.limits.buffer_size,
        },
        "packets": sum(t["packets"] for t in targets),
        "drops": None if any(t["drops"] is None for t in targets) else sum(t["drops"] for t in targets),
        "bytes": sum(t["bytes"] for t in targets),
        "sha256": one["sha256"] if one else "",
        "object_key": one["object_key"] if one else "",
        "requester": c.requester,
        "reason": c.reason,
        "created": _time(c, "create_time"),
        "started": _time(c, "start_time"),
        "ended": _time(c, "end_time"),
        "error": c.error,
        "stopped_by": c.stopped_by,
        "stopped": _time(c, "stop_time"),
        "targets": targets,
        "verdicts": [
            json_format.MessageToDict(
                v, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
            )
            for v in c.verdicts
        ],
        "history": [
            {"state": _state(h.state), "time": h.time.ToJsonString(), "pod": h.pod, "detail": h.detail}
            for h in c.history
        ],
    }


def _format(output: str | bool) -> str:
    """`-o`'s value; True and False stand for json and text (the older boolean form)."""
    if isinstance(output, bool):
        return "json" if output else "text"
    return output


def dump(data: Any, output: str | bool) -> str:
    """`data` (plain dicts and lists) as JSON or YAML; the same structure either way."""
    if _format(output) == "yaml":
        import yaml

        dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
        return str(yaml.dump(data, Dumper=dumper, sort_keys=False, default_flow_style=False)).rstrip("\n")
    return json.dumps(data, indent=2)


def human_size(size: int) -> str:
    """Bytes in powers of 1024, as ls -h: 512 B, 1.2 KiB, 3.4 MiB."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _age(seconds: float) -> str:
    ago = seconds >= 0
    seconds = abs(seconds)
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            amount = f"{int(seconds // length)}{unit}"
            break
    else:
        amount = f"{int(seconds)}s"
    return f"{amount} ago" if ago else f"in {amount}"


def human_time(stamp: str, now: datetime | None = None) -> str:
    """An RFC 3339 time (as in the JSON view) in local time with its age; "" stays ""."""
    if not stamp:
        return ""
    when = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    age = ((now or datetime.now(UTC)) - when).total_seconds()
    return f"{when.astimezone():%Y-%m-%d %H:%M:%S} ({_age(age)})"


def print_capture(capture: capture_pb2.Capture, output: str | bool, out: TextIO = sys.stdout) -> None:
    """`output` is -o's value: text, json or yaml."""
    view = capture_dict(capture)
    fmt = _format(output)
    text = "\n".join(_capture_lines(view)) if fmt == "text" else dump(view, fmt)
    print(text, file=out)


def _capture_lines(view: dict[str, Any]) -> Iterator[str]:
    keys = ["id", "state", "namespace", "label_selector" if view["label_selector"] else "pod"]
    if view["between"]:
        keys[-1] = "between"
    for key in (
        *keys,
        "filter",
        "duration_seconds",
        "requester",
        "reason",
        "created",
        "started",
        "ended",
    ):
        value = human_time(view[key]) if key in ("created", "started", "ended") else view[key]
        if key == "between":
            value = " and ".join(view[key])
        yield f"{key:>16}: {value}" + (_stopped(view) if key == "duration_seconds" else "")
    limits = ", ".join(
        f"{name} {human_size(value) if name in ('max_bytes', 'buffer_size') else value}"
        for name, value in view["limits"].items()
        if value
    )
    yield f"{'limits':>16}: {limits or 'node defaults'}"
    if view["error"]:
        yield f"{'error':>16}: {view['error']}"
    for t in view["targets"]:
        yield (
            f"  {t['namespace']}/{t['pod']} on {t['node'] or '?'} via {t['interface'] or '?'}: {t['state']}"
        )
        if t["resolution"]:
            yield _resolution_line(t["resolution"])
        drops = "unknown" if t["drops"] is None else t["drops"]
        yield f"      packets {t['packets']}, kernel drops {drops}, {human_size(t['bytes'])}"
        if t["interruption"]:
            yield f"      {t['interruption']}"
        if t["sha256"]:
            yield f"      sha256 {t['sha256']}  ({t['object_key']})"
        if t["error"]:
            yield f"      error: {t['error']}"
        if t["summary"]:
            yield from _summary_lines(t["summary"])
        if t["context"]:
            yield from _context_lines(t["context"])
    if view["verdicts"]:
        yield "  Verdicts:"
    for v in view["verdicts"]:
        mark = "ok" if v.get("ok") else "!!"
        yield f"    {mark} {v.get('subject', '')}: {v.get('verdict', '')}"
    for h in view["history"]:
        where = h["pod"] or "capture"
        detail = f" ({h['detail']})" if h["detail"] else ""
        yield f"  {human_time(h['time'])}  {where}: {h['state']}{detail}"


def _stopped(view: dict[str, Any]) -> str:
    """After the requested duration: who cut it short, and how long it ran."""
    if not view["stopped_by"]:
        return ""
    ran = ""
    if view["started"] and view["stopped"]:
        seconds = (
            datetime.fromisoformat(view["stopped"]) - datetime.fromisoformat(view["started"])
        ).total_seconds()
        ran = f" after {max(seconds, 0):.1f} s"
    return f" requested; stopped by {view['stopped_by']}{ran} (at {view['stopped']})"


def print_captures(captures: list[capture_pb2.Capture], output: str | bool) -> None:
    views = [capture_dict(c) for c in captures]
    if _format(output) != "text":
        print(dump(views, output))
        return
    print(f"{'ID':32}  {'STATE':9}  {'POD':40}  {'PACKETS':>8}  {'SIZE':>10}  CREATED")
    for v in views:
        pod = " ".join(v["between"]) or f"{v['namespace']}/{v['pod'] or v['label_selector']}"
        size, created = human_size(v["bytes"]), human_time(v["created"])
        print(f"{v['id']:32}  {v['state']:9}  {pod[:40]:40}  {v['packets']:>8}  {size:>10}  {created}")


def _resolution_line(r: dict[str, Any]) -> str:
    """Why that device: the pod's interface, where its netns was found, and its peer on the node."""
    pod_side = (
        f"pod {r.get('pod_interface', '?')} (ifindex {r.get('pod_ifindex', '?')}, {r.get('pod_mac', '?')})"
    )
    host_side = f"node {r.get('interface', '?')} (ifindex {r.get('ifindex', '?')}, {r.get('host_mac', '?')})"
    where = f" in {r['netns']}" if r.get("netns") else ""
    return f"      found by {r.get('strategy', '?')}: {r.get('pod_ip', '?')} on {pod_side}{where} <-> {host_side}"


def _summary_lines(summary: dict[str, Any]) -> Iterator[str]:
    """What is inside, in a few lines: the protocol mix, the busiest conversations and the trouble signs."""
    if summary.get("state") == "SUMMARY_STATE_PENDING":
        yield "      inside: being summarised on the node (the pcap is ready; `podcap get` shows the summary)"
        return
    span = f"{summary.get('firstPacketTime', '?')} .. {summary.get('lastPacketTime', '?')}"
    size = human_size(int(summary.get("bytes", 0)))
    yield f"      inside: {summary.get('packets', 0)} packets, {size}, {span}"
    trouble = {k: summary.get(k, 0) for k in ("tcpResets", "tcpRetransmissions", "dnsErrors")}
    yield (
        "      tcp resets {tcpResets}, tcp retransmissions {tcpRetransmissions}, dns errors {dnsErrors}".format(
            **trouble
        )
    )
    for proto in summary.get("protocols", [])[:8]:
        yield f"        {proto['protocol']}: {proto.get('frames', 0)} frames"
    for conv in summary.get("conversations", [])[:5]:
        yield (
            f"        {conv['protocol']} {conv['endpointA']} <-> {conv['endpointB']}: "
            f"{human_size(int(conv.get('bytes', 0)))}"
        )
    if summary.get("error"):
        yield f"      summary incomplete: {summary['error']}"


def print_config(view: dict[str, Any], output: str | bool) -> None:
    """`podcap config`: each setting, its value and where it came from (the token only as set or not)."""
    if _format(output) != "text":
        print(dump(view, output))
        return
    print(f"{'config file':>12}: {view['config_file']}")
    for key, entry in view.items():
        if isinstance(entry, dict):
            value = entry["value"]
            shown = "" if value == "" else str(value).lower() if isinstance(value, bool) else value
            source = "" if key == "token" and value != "not set" else f"  ({entry['source']})"
            print(f"{key:>12}: {shown or '-'}{source}")


def _context_lines(context: dict[str, Any]) -> Iterator[str]:
    """The network around the capture in a few lines; the whole record is the context.json object."""
    addresses = "; ".join(context.get("pod_addresses", [])) or "?"
    yield f"      network: pod {addresses}"
    parts = []
    if conntrack := context.get("conntrack"):
        count, maximum = int(conntrack.get("count", 0)), int(conntrack.get("max", 0))
        fill = f"{100 * count // maximum}% " if maximum else ""
        parts.append(
            f"conntrack {fill}full ({count}/{maximum}), {int(conntrack.get('pod_entries', 0))} entries of the pod"
        )
    parts.append(f"{len(context.get('nat_rules', []))} NAT rules")
    if context.get("ipvs"):
        parts.append(f"{len(context['ipvs'])} IPVS lines")
    for label, start, end in (
        ("host", "host_device_start", "host_device_end"),
        ("pod", "pod_device_start", "pod_device_end"),
    ):
        if start in context and end in context:
            grew = {
                k: int(context[end].get(k, 0)) - int(context[start].get(k, 0))
                for k in ("rx_dropped", "tx_dropped")
            }
            device = context[end].get("device", "?")
            parts.append(f"{label} {device} drops rx +{grew['rx_dropped']} tx +{grew['tx_dropped']}")
    yield f"      network: {', '.join(parts)}"
    sources = context.get("sources", [])
    unavailable = [f"{s.get('name', '?')}: {s.get('detail', '')}" for s in sources if not s.get("ok")]
    if unavailable:
        yield f"      network context unavailable: {'; '.join(unavailable)}"
    for warning in context.get("warnings", []):
        yield f"      warning: {warning}"
    if context.get("object_key"):
        yield f"      network context: {context['object_key']}"
