"""Hundreds of engineers watching captures cost the controller no thread each: 300 WatchCapture streams on a
running capture all get its end, while the controller's thread count stays what it was."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from podcap.api.v1 import capture_pb2, capture_pb2_grpc, common_pb2
from tests.e2e.conftest import Stack
from tests.support.processes import PODCAP

pytestmark = pytest.mark.netns

WATCHERS = 300


def _controller_threads(address: str) -> int:
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if b"controller" in argv and address.encode() in argv:
                status = (proc / "status").read_text()
                return int(
                    next(line.split()[1] for line in status.splitlines() if line.startswith("Threads:"))
                )
        except OSError:
            continue
    raise AssertionError(f"no controller process serving {address}")


async def _watch_all(address: str, capture_id: str) -> tuple[list[int], int]:
    channels = [grpc.aio.insecure_channel(address) for _ in range(3)]
    try:
        stubs = [capture_pb2_grpc.CaptureServiceStub(c) for c in channels]
        streams = [
            aiter(stubs[i % 3].WatchCapture(capture_pb2.WatchCaptureRequest(id=capture_id)))
            for i in range(WATCHERS)
        ]
        firsts = await asyncio.gather(*(anext(stream) for stream in streams))
        assert all(first.state == common_pb2.CAPTURE_STATE_RUNNING for first in firsts)
        during = _controller_threads(address)
        await stubs[0].StopCapture(capture_pb2.StopCaptureRequest(id=capture_id), timeout=30)

        async def last(stream: AsyncIterator[capture_pb2.Capture]) -> int:
            state: int = common_pb2.CAPTURE_STATE_RUNNING
            async for snapshot in stream:
                state = snapshot.state
            return state

        finals = await asyncio.wait_for(asyncio.gather(*(last(stream) for stream in streams)), timeout=60)
        return list(finals), during
    finally:
        for channel in channels:
            await channel.close(grace=None)


def test_three_hundred_watchers_cost_no_thread_each(stack: Stack) -> None:
    started = subprocess.run(
        [PODCAP, "capture", "shop/server", "--duration", "10m", "-o", "json"],
        env={**os.environ, "PODCAP_SERVER": stack.server},
        capture_output=True,
        text=True,
        check=False,
    )
    assert started.returncode == 0, started.stderr
    capture_id = json.loads(started.stdout)["id"]
    before = _controller_threads(stack.server)
    finals, during = asyncio.run(_watch_all(stack.server, capture_id))
    assert finals == [common_pb2.CAPTURE_STATE_COMPLETED] * WATCHERS
    assert during <= before + 10, f"{WATCHERS} watchers took the controller from {before} to {during} threads"
