"""Starting a capture is all or nothing: a start that fails half-way leaves no tcpdump and no spool entry behind.

The real CaptureManager runs in this process, its event loop on a thread inside the lab's node-2 (so the threads it
makes, and tcpdump, are there too), with the real resolver, spool, tcpdump under setpriv as the tcpdump user, and a
local directory store. The failures are real: a command line refused after the spool entry exists, and a spool
disk out of inodes once tcpdump has created its pcap, so that the capture's record cannot be written. Each time the
same capture id is then started again and captures the pod's traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from podcap.agent._captures import CaptureManager
from podcap.agent._errors import InvalidCaptureRequest
from podcap.agent._model import CaptureSnapshot, CaptureSpec, JobState, Limits
from podcap.agent._resolve import Resolver
from podcap.agent._spool import Spool
from podcap.storage import open_store
from tests.support.agents import tcpdumps_writing_into
from tests.support.lab import Lab
from tests.support.netns import in_netns
from tests.support.processes import spool_root

pytestmark = pytest.mark.netns

PORT = 8080
# A spool disk with room for its own root, one capture directory and the pcap tcpdump creates in it: nothing more.
_INODES_FOR_TCPDUMP_ONLY = 3


def _spec(lab: Lab, filter_expr: str) -> CaptureSpec:
    return CaptureSpec(
        capture_id="again",
        pod_ips=(lab.pods["server"].ip,),
        filter=filter_expr,
        duration_s=60,
        object_key="again.pcap",
    )


def _manager(spool: Path, store: Path) -> CaptureManager:
    return CaptureManager(
        resolver=Resolver(node_name="node-2"),
        store=open_store(f"file://{store}"),
        spool=Spool(spool, "tcpdump"),
        tcpdump_user="tcpdump",
        limits=Limits(min_free_bytes=0),  # the tmpfs spool below is small
    )


async def _capture_traffic(lab: Lab, manager: CaptureManager, spec: CaptureSpec) -> CaptureSnapshot:
    """Starts `spec`, sends the pod an HTTP request, stops the capture and returns its final snapshot."""
    assert (await manager.start(spec)).state == JobState.RUNNING
    url = f"http://{lab.pods['server'].ip}:{PORT}/hello.txt"
    assert await asyncio.to_thread(lab.http_get, lab.pods["client"].netns, url) == 200
    await manager.stop(spec.capture_id)  # it waits for the ring block holding the request to be handed over
    async with asyncio.timeout(60):
        async for snapshot in manager.watch(spec.capture_id):
            last = snapshot
    return last


def _leftovers(spool: Path) -> tuple[list[int], list[str]]:
    """tcpdumps writing into the spool, and the spool's entries."""
    return tcpdumps_writing_into(spool), [path.name for path in spool.iterdir()]


@contextlib.contextmanager
def _tmpfs(path: Path, inodes: int) -> Iterator[Path]:
    options = f"size=4m,nr_inodes={inodes},mode=0711"
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "podcap-test-spool", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def _make_room(path: Path) -> None:
    subprocess.run(["mount", "-o", "remount,nr_inodes=64", str(path)], check=True)


def test_a_command_line_refused_after_the_spool_entry_exists_leaves_nothing(lab: Lab, tmp_path: Path) -> None:
    """tcpdump_argv refuses a filter with a NUL (the servicer refuses it earlier: this is the agent's own last
    line) after the spool entry was made; the entry goes, so the id is not taken."""
    lab.http_server(lab.pods["server"].netns, PORT)
    store = tmp_path / "store"

    async def scenario(spool: Path) -> CaptureSnapshot:
        manager = _manager(spool, store)
        try:
            with pytest.raises(InvalidCaptureRequest, match="NUL"):
                await manager.start(_spec(lab, "tcp\x00 -w /etc/passwd"))
            assert await asyncio.to_thread(_leftovers, spool) == ([], [])
            assert manager.all() == []
            return await _capture_traffic(lab, manager, _spec(lab, f"tcp port {PORT}"))
        finally:
            await manager.shutdown(10)

    with spool_root() as spool:
        ended = in_netns(lab.nodes["node-2"].netns, lambda: asyncio.run(scenario(spool)))
        assert ended.state == JobState.COMPLETED, ended.error
        assert ended.stats.packets > 0 and (store / "again.pcap").stat().st_size == ended.size
        assert list(spool.iterdir()) == []


def test_a_record_that_cannot_be_written_ends_tcpdump_and_frees_the_id(lab: Lab, tmp_path: Path) -> None:
    """The record is written once tcpdump listens (it names tcpdump's pid). When that fails (here: the spool disk
    has no inode left), the tcpdump already running is ended and the entry removed; once the disk has room, the
    same id starts and captures."""
    lab.http_server(lab.pods["server"].netns, PORT)
    store = tmp_path / "store"

    async def scenario(spool: Path) -> CaptureSnapshot:
        manager = _manager(spool, store)
        try:
            with pytest.raises(OSError, match="No space left on device"):
                await manager.start(_spec(lab, f"tcp port {PORT}"))
            # tcpdump was ended at once, not when the agent exits, and its entry removed.
            assert await asyncio.to_thread(_leftovers, spool) == ([], [])
            assert manager.all() == []
            await asyncio.to_thread(_make_room, spool)
            return await _capture_traffic(lab, manager, _spec(lab, f"tcp port {PORT}"))
        finally:
            await manager.shutdown(10)

    with spool_root() as root, _tmpfs(root, _INODES_FOR_TCPDUMP_ONLY) as spool:
        ended = in_netns(lab.nodes["node-2"].netns, lambda: asyncio.run(scenario(spool)))
        assert ended.state == JobState.COMPLETED, ended.error
        assert ended.stats.packets > 0 and (store / "again.pcap").stat().st_size == ended.size
        assert list(spool.iterdir()) == []
