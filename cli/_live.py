"""Following a capture as it happens: the status line on stderr, the live pcap stream, and Ctrl-C.

A waiting command shows where the capture stands: on a terminal one status line rewritten in place (a spinner,
elapsed of the requested duration, packets, bytes, kernel drops), elsewhere (a log, CI) a plain line per state
change and at most one progress line every few seconds. `podcap capture --live -w FILE|-` also copies the pcap
as the node writes it (StreamPackets) to a file or standard output, so `… -w - | wireshark -k -i -` shows packets
about a second after they crossed the pod's device; the capture is stored as usual all the same.

Ctrl-C while a capture runs stops it cleanly (StopCapture: what was captured is kept and still downloaded); a
second Ctrl-C leaves at once, the capture going on without us.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import BinaryIO, TextIO

from podcap.api.v1 import capture_pb2, common_pb2

from ._client import TERMINAL, ClientError, Connection, _state_name
from ._download import STDOUT
from ._output import human_size

_SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
_TICK_S = 0.1
_PLAIN_EVERY_S = 5.0


class Progress:
    """What a waiting command says on stderr: the capture's state and counts as they change, the summary's
    arrival, and a warning the moment a capture ends with packets the kernel dropped (what was captured is still
    complete, but not all)."""

    def __init__(self, enabled: bool = True, stream: TextIO | None = None) -> None:
        self._enabled = enabled
        self._out = stream or sys.stderr
        self._live = enabled and self._out.isatty()
        self._last_state = -1
        self._warned = False
        self._summaries_pending = False
        self._capture: capture_pb2.Capture | None = None
        self._started = time.monotonic()
        self._ticks = 0
        self._line_shown = False
        self._plain_at = time.monotonic()

    def update(self, capture: capture_pb2.Capture) -> None:
        if not self._enabled:
            return
        self._capture = capture
        packets = sum(t.stats.packets for t in capture.targets)
        if capture.state != self._last_state:
            self._last_state = capture.state
            self._say(f"{capture.id}: {_state_name(capture.state)} ({packets} packets)")
        elif not self._live and capture.state == common_pb2.CAPTURE_STATE_RUNNING:
            now = time.monotonic()
            if now - self._plain_at >= _PLAIN_EVERY_S:
                self._plain_at = now
                self._say(f"{capture.id}: {self._counts(capture)}")
        self._draw()
        if capture.state not in TERMINAL:
            return
        drops = sum(t.stats.kernel_drops for t in capture.targets)
        if not self._warned:
            self._warned = True
            for t in capture.targets:
                if t.interruption:
                    self._say(f"warning: {t.namespace}/{t.pod}: {t.interruption}")
            if drops:
                self._say(
                    f"warning: the kernel dropped {drops} packets that matched the filter ({packets} captured); "
                    "capture again with a larger --buffer-size (e.g. 128M) or a narrower --filter"
                )
        pending = any(
            t.HasField("summary") and t.summary.state == common_pb2.SUMMARY_STATE_PENDING
            for t in capture.targets
        )
        if pending and not self._summaries_pending:
            self._say(f"{capture.id}: the pcap is stored; summarising what is inside")
        self._summaries_pending = pending

    def say(self, text: str) -> None:
        """A line of its own (above the status line on a terminal)."""
        if self._enabled:
            self._say(text)

    def tick(self) -> None:
        """Turns the spinner and the elapsed time on a terminal; called every _TICK_S while waiting."""
        self._ticks += 1
        self._draw()

    def close(self) -> None:
        if self._line_shown:
            self._out.write("\r\x1b[K")
            self._out.flush()
            self._line_shown = False

    def _say(self, text: str) -> None:
        self.close()
        print(text, file=self._out, flush=True)
        self._draw()

    def _draw(self) -> None:
        capture = self._capture
        if not self._live or capture is None or capture.state not in _DRAWN:
            self.close()
            return
        spinner = _SPINNER[self._ticks % len(_SPINNER)]
        elapsed = time.monotonic() - self._started
        if capture.HasField("start_time"):
            elapsed = max(0.0, time.time() - capture.start_time.ToSeconds())
        duration = capture.duration.ToTimedelta().total_seconds()
        fraction = min(1.0, elapsed / duration) if duration else 0.0
        bar = "█" * int(fraction * 20) + "·" * (20 - int(fraction * 20))
        line = (
            f"{spinner} {_state_name(capture.state):<9} {_clock(elapsed)} / {_clock(duration)} {bar} "
            f"{self._counts(capture)}  (Ctrl-C stops and keeps what was captured)"
        )
        self._out.write("\r\x1b[K" + line)
        self._out.flush()
        self._line_shown = True

    @staticmethod
    def _counts(capture: capture_pb2.Capture) -> str:
        packets = sum(t.stats.packets for t in capture.targets)
        size = sum(t.stats.bytes for t in capture.targets)
        if any(t.stats.kernel_drops_unknown for t in capture.targets):
            drops = "drops unknown"
        else:
            drops = f"{sum(t.stats.kernel_drops for t in capture.targets)} dropped"
        return f"{packets:,} packets, {human_size(size)}, {drops}"


_DRAWN = frozenset((common_pb2.CAPTURE_STATE_PENDING, common_pb2.CAPTURE_STATE_RUNNING))


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes:02d}:{secs:02d}"


class Interrupts:
    """Ctrl-C, as a request to stop the capture: the first SIGINT calls `on_first`, the second raises
    KeyboardInterrupt at once (the capture goes on without us, and says so)."""

    def __init__(self, on_first: Callable[[], None]) -> None:
        self._on_first = on_first
        self.count = 0

    def __enter__(self) -> Interrupts:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGINT, self._interrupted)
        return self

    def __exit__(self, *_: object) -> None:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGINT)

    def _interrupted(self) -> None:
        self.count += 1
        if self.count == 1:
            self._on_first()
            return
        asyncio.get_running_loop().remove_signal_handler(signal.SIGINT)
        for task in asyncio.all_tasks():
            task.cancel()


async def follow(
    conn: Connection,
    capture_id: str,
    *,
    progress: Progress,
    live_to: Path | None = None,
    force: bool = False,
    on_ended: Callable[[capture_pb2.Capture], object] | None = None,
) -> capture_pb2.Capture:
    """Follows the capture until it is settled, showing progress; Ctrl-C stops it (once). With `live_to`, the
    pcap is copied there as it is captured. `on_ended` is awaited with the first terminal snapshot (to download
    the pcap while its summary is still being made)."""
    stop_sent: asyncio.Task[object] | None = None

    def stop() -> None:
        nonlocal stop_sent
        progress.say(f"{capture_id}: stopping (Ctrl-C again leaves at once; the capture would go on)")
        stop_sent = asyncio.ensure_future(_stop_quietly(conn, capture_id, progress))

    with Interrupts(stop) as interrupts:
        ticker = asyncio.create_task(_tick(progress))
        streamer = (
            asyncio.create_task(_stream(conn, capture_id, live_to, force, progress))
            if live_to is not None
            else None
        )
        try:
            last: capture_pb2.Capture | None = None
            ended = False
            async for capture in conn.watch(capture_id):
                progress.update(capture)
                last = capture
                if capture.state in TERMINAL and not ended:
                    ended = True
                    if streamer is not None:
                        await streamer  # the pcap is complete: the stream's last bytes are on their way
                    if on_ended is not None:
                        result = on_ended(capture)
                        if asyncio.iscoroutine(result):
                            await result
            if streamer is not None:
                await streamer
            if stop_sent is not None:
                await stop_sent
        except asyncio.CancelledError:
            if interrupts.count > 1:
                progress.close()
                print(
                    f"podcap: left capture {capture_id} running; `podcap stop {capture_id}` ends it",
                    file=sys.stderr,
                )
                raise KeyboardInterrupt from None
            raise
        finally:
            ticker.cancel()
            if streamer is not None and not streamer.done():
                streamer.cancel()
            progress.close()
    if last is None:
        raise ClientError(f"the controller sent nothing for capture {capture_id}")
    return last


async def _stop_quietly(conn: Connection, capture_id: str, progress: Progress) -> None:
    try:
        await conn.stop(capture_id)
    except ClientError as exc:  # it ended by itself meanwhile, say: the watch shows how it ended
        progress.say(f"{capture_id}: stop: {exc}")


async def _tick(progress: Progress) -> None:
    while True:
        await asyncio.sleep(_TICK_S)
        progress.tick()


async def _live_or_stored(conn: Connection, capture_id: str, progress: Progress) -> AsyncIterator[bytes]:
    """The live pcap; for a capture that ended before the stream began (a short one), its stored pcap."""
    try:
        async for chunk in conn.stream_packets(capture_id):
            yield chunk
        return
    except ClientError as exc:
        if "has ended" not in str(exc) or "download" not in str(exc):
            raise
    progress.say(f"{capture_id}: ended before the live stream began; writing its stored pcap")
    async for chunk in conn.download(capture_id, 0):
        yield chunk


async def _stream(conn: Connection, capture_id: str, path: Path, force: bool, progress: Progress) -> None:
    """Copies the live pcap to `path` (or standard output), each chunk written and flushed as it arrives so that
    a reader (Wireshark, tshark, `tail -f`) sees packets at once. A reader that goes away ends the copy, not the
    capture."""
    out: BinaryIO = sys.stdout.buffer if path == STDOUT else path.open("wb" if force else "xb")
    try:
        async for chunk in _live_or_stored(conn, capture_id, progress):
            try:
                out.write(chunk)
                out.flush()
            except BrokenPipeError:
                progress.say(
                    f"{capture_id}: the reader of the live stream went away; the capture goes on and is "
                    f"stored as usual (podcap get {capture_id})"
                )
                with contextlib.suppress(OSError):
                    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                return
    finally:
        if path != STDOUT:
            out.close()
