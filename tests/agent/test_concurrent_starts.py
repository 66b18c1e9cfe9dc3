"""Starts on one node run side by side: a burst of captures on a node does not queue behind each one's tcpdump start.

The real CaptureManager runs in this process, its event loop on a thread inside the lab's node-2, with the real
resolver, spool and tcpdump under setpriv, as in test_captures.py. The resolver is the real one, except that each
call first waits until a given number of calls are inside it at once: starts that ran one after another would never
all get there, and the wait would give up (its timeout is a deadline for the test, not a figure it measures).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from podcap.agent._captures import CaptureManager
from podcap.agent._errors import NodeLimitReached
from podcap.agent._model import CaptureSnapshot, CaptureSpec, JobState, Limits
from podcap.agent._resolve import Resolution, Resolver
from podcap.agent._spool import Spool
from podcap.storage import open_store
from tests.support.agents import tcpdumps_writing_into
from tests.support.lab import Lab
from tests.support.netns import in_netns
from tests.support.processes import spool_root

pytestmark = pytest.mark.netns

# Below the agent's worker threads on a 2-CPU node (asyncio's default executor has cpu_count + 4): each waiting
# resolution holds one of them.
_AT_ONCE = 4


class _MeetingResolver(Resolver):
    """Resolves like the real resolver once `at_once` calls are inside `resolve` together."""

    def __init__(self, at_once: int) -> None:
        super().__init__(node_name="node-2")
        self._meeting = threading.Barrier(at_once, timeout=30)

    def resolve(self, ips: Sequence[str], pod_interface: str = "") -> Resolution:
        self._meeting.wait()
        return super().resolve(ips, pod_interface=pod_interface)


def _manager(spool: Path, store: Path, resolver: Resolver, max_concurrent: int = 8) -> CaptureManager:
    return CaptureManager(
        resolver=resolver,
        store=open_store(f"file://{store}"),
        spool=Spool(spool, "tcpdump"),
        tcpdump_user="tcpdump",
        limits=Limits(min_free_bytes=0, max_concurrent=max_concurrent),
    )


def _spec(lab: Lab, capture_id: str) -> CaptureSpec:
    return CaptureSpec(
        capture_id=capture_id,
        pod_ips=(lab.pods["server"].ip,),
        filter="tcp port 8080",
        duration_s=60,
        object_key=f"{capture_id}.pcap",
    )


async def _finish(manager: CaptureManager, ids: Sequence[str]) -> list[CaptureSnapshot]:
    """Stops the captures and follows each to its end."""
    finals = []
    for capture_id in ids:
        await manager.stop(capture_id)
        async with asyncio.timeout(60):
            async for snapshot in manager.watch(capture_id):
                last = snapshot
        finals.append(last)
    return finals


def test_many_starts_on_one_node_are_in_flight_at_once(lab: Lab, tmp_path: Path) -> None:
    ids = [f"burst-{i}" for i in range(_AT_ONCE)]

    async def scenario(spool: Path) -> tuple[list[CaptureSnapshot], list[CaptureSnapshot], int]:
        manager = _manager(spool, tmp_path / "store", _MeetingResolver(_AT_ONCE))
        try:
            started = await asyncio.gather(*(manager.start(_spec(lab, i)) for i in ids))
            tcpdumps = len(await asyncio.to_thread(tcpdumps_writing_into, spool))
            return list(started), await _finish(manager, ids), tcpdumps
        finally:
            await manager.shutdown(10)

    with spool_root() as spool:
        started, finals, tcpdumps = in_netns(lab.nodes["node-2"].netns, lambda: asyncio.run(scenario(spool)))
    assert [s.state for s in started] == [JobState.RUNNING] * _AT_ONCE
    assert tcpdumps == _AT_ONCE
    assert [f.state for f in finals] == [JobState.COMPLETED] * _AT_ONCE, [f.error for f in finals]
    assert all((tmp_path / "store" / f"{i}.pcap").exists() for i in ids)


def test_a_repeat_during_its_start_gets_the_same_capture(lab: Lab, tmp_path: Path) -> None:
    """The controller retries a StartCapture whose answer it did not get: the repeat waits for the first start
    and answers with its capture, and the node runs one tcpdump for it."""

    async def scenario(spool: Path) -> tuple[list[CaptureSnapshot], int, list[CaptureSnapshot]]:
        manager = _manager(spool, tmp_path / "store", Resolver(node_name="node-2"))
        try:
            both = await asyncio.gather(*(manager.start(_spec(lab, "twice")) for _ in range(2)))
            tcpdumps = len(await asyncio.to_thread(tcpdumps_writing_into, spool))
            return list(both), tcpdumps, await _finish(manager, ["twice"])
        finally:
            await manager.shutdown(10)

    with spool_root() as spool:
        both, tcpdumps, finals = in_netns(lab.nodes["node-2"].netns, lambda: asyncio.run(scenario(spool)))
    assert both[0] == both[1] and both[0].state == JobState.RUNNING
    assert tcpdumps == 1
    assert finals[0].state == JobState.COMPLETED, finals[0].error


def test_the_node_limit_counts_starts_in_progress(lab: Lab, tmp_path: Path) -> None:
    """Three starts at once on a node that may run two: two run, the third is refused with the numbers, however
    the starts interleave."""

    async def scenario(spool: Path) -> tuple[list[CaptureSnapshot | BaseException], list[CaptureSnapshot]]:
        manager = _manager(spool, tmp_path / "store", Resolver(node_name="node-2"), max_concurrent=2)
        try:
            outcomes = await asyncio.gather(
                *(manager.start(_spec(lab, f"limit-{i}")) for i in range(3)), return_exceptions=True
            )
            running = [o.spec.capture_id for o in outcomes if isinstance(o, CaptureSnapshot)]
            return list(outcomes), await _finish(manager, running)
        finally:
            await manager.shutdown(10)

    with spool_root() as spool:
        outcomes, finals = in_netns(lab.nodes["node-2"].netns, lambda: asyncio.run(scenario(spool)))
    refused = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(refused) == 1 and isinstance(refused[0], NodeLimitReached), outcomes
    assert "already runs 2 captures (at most 2)" in str(refused[0])
    assert [f.state for f in finals] == [JobState.COMPLETED] * 2, [f.error for f in finals]
