"""Saving a capture's pcaps: one pod's pcap, every pod's pcap into a directory, or one pcapng merged by time in
which each packet's interface is named `namespace/pod@node`, so Wireshark shows which pod it came from."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from podcap.api.v1 import capture_pb2, common_pb2

from ._client import ClientError, Connection
from ._pcapng import PcapFormatError, merge_pcaps

_STORED = (common_pb2.CAPTURE_STATE_COMPLETED, common_pb2.CAPTURE_STATE_FAILED)


def _filename(capture: capture_pb2.Capture, target: capture_pb2.CaptureTarget) -> str:
    start = (target.start_time if target.HasField("start_time") else capture.create_time).ToDatetime()
    return f"{target.namespace}_{target.pod}_{start:%Y%m%dT%H%M%SZ}.pcap"


def _stored(capture: capture_pb2.Capture) -> list[int]:
    return [i for i, t in enumerate(capture.targets) if t.state in _STORED and t.sha256]


async def download(
    conn: Connection,
    capture: capture_pb2.Capture,
    path: Path,
    target: int | None,
    every: bool,
    merge: bool,
) -> None:
    """Saves what was asked; a multi-pod capture needs --target, --all or --merge."""
    if not (every or merge):
        if target is None:
            if len(capture.targets) > 1:
                raise ClientError(
                    f"capture {capture.id} covers {len(capture.targets)} pods: give --target N, --all or --merge"
                )
            target = 0
        size = await conn.download(capture.id, target, path)
        print(f"saved {size} bytes to {path}", file=sys.stderr)
        return
    indexes = _stored(capture)
    if not indexes:
        raise ClientError(f"capture {capture.id} has no stored pcap yet")
    if every:
        path.mkdir(parents=True, exist_ok=True)
        for i in indexes:
            size = await conn.download(capture.id, i, path / _filename(capture, capture.targets[i]))
            print(f"saved {size} bytes to {path / _filename(capture, capture.targets[i])}", file=sys.stderr)
        return
    with tempfile.TemporaryDirectory(prefix="podcap-merge-") as scratch:
        inputs = []
        for i in indexes:
            t = capture.targets[i]
            part = Path(scratch) / f"{i}.pcap"
            await conn.download(capture.id, i, part)
            inputs.append((part, f"{t.namespace}/{t.pod}@{t.node}"))
        try:
            result = merge_pcaps(inputs, path)
        except PcapFormatError as exc:
            raise ClientError(f"cannot merge: {exc}") from exc
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"merged {result.total} packets of {len(inputs)} pods into {path}", file=sys.stderr)
