"""Saving a capture's pcaps: one pod's pcap, every pod's pcap into a directory, or one pcapng merged by time in
which each packet's interface is named `namespace/pod@node`, so Wireshark shows which pod it came from.

Every pcap is checked against the sha256 and size its capture's metadata holds, however it came (streamed by the
controller, or fetched from the store through a short-lived URL with `--url`): it is written under a hidden
temporary name beside the file asked for and renamed to that name only once it matched, so a name the user gave
never holds a partial or altered pcap, and an existing file is replaced only with `--force`. `-` is standard
output (for `| wireshark -k -i -`), where nothing can be taken back: a mismatch there is an error the caller sees
in the exit status.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import BinaryIO

from podcap.api.v1 import capture_pb2, common_pb2

from ._client import ClientError, Connection
from ._pcapng import PcapFormatError, merge_pcaps

STDOUT = Path("-")
_STORED = (common_pb2.CAPTURE_STATE_COMPLETED, common_pb2.CAPTURE_STATE_FAILED)
_URL_READ = 1 << 20


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
    *,
    via_url: bool = False,
    force: bool = False,
    one_copy: bool = False,
) -> None:
    """Saves what was asked; a multi-pod capture needs --target, --all or --merge."""
    if not (every or merge):
        if target is None:
            if len(capture.targets) > 1:
                raise ClientError(
                    f"capture {capture.id} covers {len(capture.targets)} pods: give --target N, --all or --merge"
                )
            target = 0
        size = await _save(conn, capture, target, path, via_url=via_url, force=force)
        print(f"saved {size} bytes to {_shown(path)} (sha256 verified)", file=sys.stderr)
        return
    indexes = _stored(capture)
    if not indexes:
        raise ClientError(f"capture {capture.id} has no stored pcap yet")
    if every:
        if path == STDOUT:
            raise ClientError("--all saves one file per pod into a directory: give a directory, not -")
        path.mkdir(parents=True, exist_ok=True)
        for i in indexes:
            into = path / _filename(capture, capture.targets[i])
            size = await _save(conn, capture, i, into, via_url=via_url, force=force)
            print(f"saved {size} bytes to {into} (sha256 verified)", file=sys.stderr)
        return
    _refuse_overwrite(path, force)
    with tempfile.TemporaryDirectory(prefix="podcap-merge-") as scratch:
        inputs = []
        for i in indexes:
            t = capture.targets[i]
            part = Path(scratch) / f"{i}.pcap"
            await _save(conn, capture, i, part, via_url=via_url, force=True)
            inputs.append((part, f"{t.namespace}/{t.pod}@{t.node}"))
        merged = Path(scratch) / "merged.pcapng"
        try:
            result = merge_pcaps(inputs, merged, one_copy=one_copy)
        except PcapFormatError as exc:
            raise ClientError(f"cannot merge: {exc}") from exc
        with _output(path, force=True) as out, merged.open("rb") as source:
            while block := source.read(_URL_READ):
                out.write(block)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    if result.copies and one_copy:
        print(f"note: {result.copies} copies of packets seen on two pods were left out", file=sys.stderr)
    elif result.copies:
        print(
            f"note: {result.copies} packets crossed two of these pods and are in the file once per pod; Wireshark "
            "marks the later copies as retransmissions (--one-copy keeps one)",
            file=sys.stderr,
        )
    print(f"merged {result.total} packets of {len(inputs)} pods into {_shown(path)}", file=sys.stderr)


async def _save(
    conn: Connection, capture: capture_pb2.Capture, index: int, path: Path, *, via_url: bool, force: bool
) -> int:
    """One target's pcap into `path`, verified; returns its size."""
    if not 0 <= index < len(capture.targets):
        raise ClientError(f"capture {capture.id} has no target {index} (it has {len(capture.targets)})")
    target = capture.targets[index]
    _refuse_overwrite(path, force)
    if via_url:
        chunks = _url_chunks(await conn.download_url(capture.id, index))
    else:
        chunks = conn.download(capture.id, index)
    digest, size = hashlib.sha256(), 0
    with _output(path, force) as out:
        async for data in chunks:
            out.write(data)
            digest.update(data)
            size += len(data)
        if not target.sha256:
            raise ClientError(
                f"capture {capture.id}'s metadata holds no sha256 for {_who(target)}: not verified"
            )
        if digest.hexdigest() != target.sha256 or size != target.stats.bytes:
            kept = "discard what was written to standard output" if path == STDOUT else "nothing was saved"
            raise ClientError(
                f"the pcap of {_who(target)} does not match its metadata: got {size} bytes with sha256 "
                f"{digest.hexdigest()}, expected {target.stats.bytes} bytes with sha256 {target.sha256}; "
                f"{kept}. Download it again; if it still differs, the stored object was altered"
            )
    return size


def _who(target: capture_pb2.CaptureTarget) -> str:
    return f"{target.namespace}/{target.pod}"


def _shown(path: Path) -> str:
    return "standard output" if path == STDOUT else str(path)


def _refuse_overwrite(path: Path, force: bool) -> None:
    if path != STDOUT and path.exists() and not force:
        raise ClientError(f"{path} exists: give --force to replace it, or another -f PATH")


@contextlib.contextmanager
def _output(path: Path, force: bool) -> Iterator[BinaryIO]:
    """Where bytes go: standard output, or a hidden temporary file renamed over `path` when the block succeeds
    (removed when it fails, so `path` is untouched)."""
    if path == STDOUT:
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
        _refuse_overwrite(path, force)  # another program may have made it meanwhile
        os.replace(temp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)


async def _url_chunks(url: str) -> AsyncIterator[bytes]:
    """The body behind a download URL (the store's presigned https URL, or file:// for a local store)."""
    try:
        response = await asyncio.to_thread(urllib.request.urlopen, url, timeout=30)  # the controller's URL
    except (urllib.error.URLError, OSError) as exc:
        raise ClientError(f"cannot fetch the download URL: {exc}") from exc
    try:
        while data := await asyncio.to_thread(response.read, _URL_READ):
            yield data
    except OSError as exc:
        raise ClientError(f"the download from the URL broke off: {exc}") from exc
    finally:
        response.close()
