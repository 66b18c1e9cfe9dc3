"""What a waiting `podcap capture` tells the engineer on stderr as the snapshots of WatchCapture arrive."""

from __future__ import annotations

import pytest

from podcap.api.v1 import capture_pb2, common_pb2
from podcap.cli._client import Progress


def _snapshot(state: int, packets: int, drops: int, summary: int = 0) -> capture_pb2.Capture:
    target = capture_pb2.CaptureTarget(
        namespace="shop",
        pod="checkout",
        state=state,  # type: ignore[arg-type]
        stats=common_pb2.CaptureStats(packets=packets, kernel_drops=drops),
    )
    if summary:
        target.summary.state = summary  # type: ignore[assignment]
    return capture_pb2.Capture(id="c1", state=state, targets=[target])  # type: ignore[arg-type]


def test_drops_are_warned_once_when_the_capture_ends(capsys: pytest.CaptureFixture[str]) -> None:
    progress = Progress(enabled=True)
    progress.update(_snapshot(common_pb2.CAPTURE_STATE_RUNNING, 10, 0))
    progress.update(_snapshot(common_pb2.CAPTURE_STATE_COMPLETED, 990, 12, common_pb2.SUMMARY_STATE_PENDING))
    progress.update(_snapshot(common_pb2.CAPTURE_STATE_COMPLETED, 990, 12, common_pb2.SUMMARY_STATE_READY))
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "c1: RUNNING (10 packets)"
    assert lines[1] == "c1: COMPLETED (990 packets)"
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 1
    assert "dropped 12 packets" in warnings[0] and "--buffer-size" in warnings[0]
    assert lines[-1] == "c1: the pcap is stored; summarising what is inside"


def test_a_clean_capture_warns_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    progress = Progress(enabled=True)
    progress.update(_snapshot(common_pb2.CAPTURE_STATE_COMPLETED, 5, 0, common_pb2.SUMMARY_STATE_READY))
    assert capsys.readouterr().err == "c1: COMPLETED (5 packets)\n"
