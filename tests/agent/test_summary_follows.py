"""The summary never holds the pcap back: a capture is COMPLETED, stored and downloadable first, its summary follows.

The real CaptureManager runs in this process on a thread inside the lab's node-2, with the real resolver, spool,
tcpdump and tshark under setpriv as the tcpdump user and a local directory store (as tests/agent/test_captures.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from podcap.agent._captures import CaptureManager
from podcap.agent._model import CaptureSnapshot, CaptureSpec, JobState, Limits
from podcap.agent._resolve import Resolver
from podcap.agent._spool import Spool
from podcap.agent._summary import SummaryState
from podcap.storage import open_store
from tests.support.lab import Lab
from tests.support.netns import in_netns
from tests.support.processes import spool_root

pytestmark = pytest.mark.netns

PORT = 8080


def _spec(lab: Lab, capture_id: str) -> CaptureSpec:
    return CaptureSpec(
        capture_id=capture_id,
        pod_ips=(lab.pods["server"].ip,),
        filter=f"tcp port {PORT}",
        duration_s=60,
        object_key=f"{capture_id}.pcap",
    )


def _manager(spool: Path, store: Path, **limits: int) -> CaptureManager:
    return CaptureManager(
        resolver=Resolver(node_name="node-2"),
        store=open_store(f"file://{store}"),
        spool=Spool(spool, "tcpdump"),
        tcpdump_user="tcpdump",
        limits=Limits(min_free_bytes=0, **limits),
    )


async def _capture(lab: Lab, manager: CaptureManager, specs: list[CaptureSpec]) -> None:
    """Starts every spec, sends the pod HTTP requests they all see, and stops them together."""
    for spec in specs:
        assert (await manager.start(spec)).state == JobState.RUNNING
    url = f"http://{lab.pods['server'].ip}:{PORT}/hello.txt"
    for _ in range(3):
        assert await asyncio.to_thread(lab.http_get, lab.pods["client"].netns, url) == 200
    await asyncio.sleep(0.2)
    for spec in specs:
        await manager.stop(spec.capture_id)


async def _until_settled(manager: CaptureManager, capture_id: str) -> list[CaptureSnapshot]:
    async with asyncio.timeout(60):
        return [snapshot async for snapshot in manager.watch(capture_id)]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_pcap_is_stored_and_completed_before_its_summary_which_follows(lab: Lab, tmp_path: Path) -> None:
    lab.http_server(lab.pods["server"].netns, PORT)
    store = tmp_path / "store"
    seen_stored: list[tuple[CaptureSnapshot, str]] = []

    async def scenario(spool: Path) -> list[CaptureSnapshot]:
        manager = _manager(spool, store)
        try:
            spec = _spec(lab, "first")
            await _capture(lab, manager, [spec])
            snapshots = []
            async with asyncio.timeout(60):
                async for snapshot in manager.watch(spec.capture_id):
                    snapshots.append(snapshot)
                    if snapshot.state == JobState.COMPLETED and snapshot.summary and snapshot.summary.pending:
                        # What a download now gets: the whole object, while the summary is still being made.
                        seen_stored.append((snapshot, _sha256(store / spec.object_key)))
            return snapshots
        finally:
            await manager.shutdown(10)

    with spool_root() as spool:
        snapshots = in_netns(lab.nodes["node-2"].netns, lambda: asyncio.run(scenario(spool)))
        assert list(spool.iterdir()) == []  # freed once the summary is in
    assert seen_stored, [(s.state, s.summary) for s in snapshots]
    completed, stored_sha256 = seen_stored[0]
    assert completed.sha256 == stored_sha256 and completed.size == (store / "first.pcap").stat().st_size
    assert completed.summary is not None and completed.summary.state == SummaryState.PENDING
    final = snapshots[-1]
    assert final.state == JobState.COMPLETED and final.summary is not None
    assert final.summary.state == SummaryState.READY, final.summary.error
    assert final.summary.packets == final.stats.packets > 0
    assert any(p.protocol.endswith(":tcp") for p in final.summary.protocols)


@contextmanager
def _tsharks_counted() -> Iterator[list[int]]:
    """Samples how many tshark processes run on the machine, every 5 ms, until the block ends."""
    counts: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            running = 0
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    with suppress(OSError):
                        running += Path(f"/proc/{pid}/comm").read_text().strip() == "tshark"
            counts.append(running)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield counts
    finally:
        done.set()
        sampler.join()


def test_summaries_of_captures_ending_together_share_the_nodes_tshark_limit(lab: Lab, tmp_path: Path) -> None:
    lab.http_server(lab.pods["server"].netns, PORT)
    store = tmp_path / "store"
    specs = [_spec(lab, f"together-{i}") for i in range(4)]

    async def scenario(spool: Path) -> list[CaptureSnapshot]:
        manager = _manager(spool, store, summary_tsharks=1)
        try:
            await _capture(lab, manager, specs)
            with _tsharks_counted() as counts:
                finals = [
                    runs[-1]
                    for runs in await asyncio.gather(*(_until_settled(manager, s.capture_id) for s in specs))
                ]
            # The machine may run other tsharks (another test's): only this node's limit is ours to check.
            assert max(counts) >= 1, "no tshark was ever seen running: the sampling measured nothing"
            assert max(counts) <= 1, f"{max(counts)} tsharks ran at once with a node-wide limit of 1"
            return finals
        finally:
            await manager.shutdown(10)

    with spool_root() as spool:
        finals = in_netns(lab.nodes["node-2"].netns, lambda: asyncio.run(scenario(spool)))
    for final in finals:
        assert final.state == JobState.COMPLETED and final.summary is not None
        assert final.summary.state == SummaryState.READY and final.summary.packets == final.stats.packets > 0


def test_a_summary_cut_short_by_a_restart_is_made_by_the_next_start_without_uploading_again(
    lab: Lab, tmp_path: Path
) -> None:
    lab.http_server(lab.pods["server"].netns, PORT)
    store = tmp_path / "store"
    spec = _spec(lab, "restarted")
    slot_free = threading.Event()

    async def first_agent(spool: Path) -> CaptureSnapshot:
        manager = _manager(spool, store)
        # The node's one summary slot is busy (another capture's summary, say), so this one waits in line.
        manager._summaries.submit(slot_free.wait, 30)
        try:
            await _capture(lab, manager, [spec])
            async with asyncio.timeout(60):
                async for snapshot in manager.watch(spec.capture_id):
                    if snapshot.state in (JobState.COMPLETED, JobState.FAILED):
                        return snapshot
            raise AssertionError("the watch ended before the capture did")
        finally:
            await manager.shutdown(10)  # with the summary still waiting: the spool keeps it
            slot_free.set()

    async def second_agent(spool: Path) -> list[CaptureSnapshot]:
        manager = _manager(spool, store)
        try:
            await manager.recover()
            return await _until_settled(manager, spec.capture_id)
        finally:
            await manager.shutdown(10)

    with spool_root() as spool:
        completed = in_netns(lab.nodes["node-2"].netns, lambda: asyncio.run(first_agent(spool)))
        assert completed.state == JobState.COMPLETED and completed.summary and completed.summary.pending
        stored = store / spec.object_key
        uploaded = (stored.stat().st_mtime_ns, _sha256(stored))
        assert uploaded[1] == completed.sha256
        assert [p.name for p in spool.iterdir()] == [spec.capture_id]

        snapshots = in_netns(lab.nodes["node-2"].netns, lambda: asyncio.run(second_agent(spool)))
        assert list(spool.iterdir()) == []
    assert snapshots[0].state == JobState.COMPLETED and snapshots[0].sha256 == completed.sha256
    final = snapshots[-1]
    assert final.summary is not None and final.summary.state == SummaryState.READY, final.summary
    assert final.summary.packets == completed.stats.packets > 0
    assert (stored.stat().st_mtime_ns, _sha256(stored)) == uploaded  # the object was not written again
