"""What a waiting `podcap capture` tells the engineer on stderr as the snapshots of WatchCapture arrive."""

from __future__ import annotations

import io

import pytest

from podcap.api.v1 import capture_pb2, common_pb2
from podcap.cli._live import Progress


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


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_one_status_line_shows_the_counts_as_they_move() -> None:
    screen = _Terminal()
    progress = Progress(enabled=True, stream=screen)
    running = _snapshot(common_pb2.CAPTURE_STATE_RUNNING, 0, 0)
    running.duration.FromSeconds(30)
    progress.update(running)
    running.targets[0].stats.packets, running.targets[0].stats.bytes = 1234, 3 << 20
    progress.update(running)
    progress.tick()
    drawn = screen.getvalue()
    # Redrawn in place (carriage return, erase line), never a new line per update.
    assert drawn.count("\n") == 1 and drawn.count("\r\x1b[K") >= 3
    last = drawn.rsplit("\r\x1b[K", 1)[-1]
    assert "RUNNING" in last and "/ 00:30" in last and "1,234 packets" in last and "3.0 MiB" in last
    assert "0 dropped" in last and "Ctrl-C" in last
    progress.update(_snapshot(common_pb2.CAPTURE_STATE_COMPLETED, 1234, 0, common_pb2.SUMMARY_STATE_READY))
    assert screen.getvalue().endswith("c1: COMPLETED (1234 packets)\n")  # the status line is gone
