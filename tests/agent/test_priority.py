"""CpuPacer: background work held to a share of a core while the CPU is contended, free when it is not.

The node's pressure stall information is stood in for by a file the test writes, in /proc/pressure/cpu's own
format, whose ``total`` grows as fast as the test says tasks are kept waiting. The work paced is real: a thread
that burns CPU in blocks, as the uploader's worker does while tcpdump writes a flood.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from podcap.agent._priority import CpuPacer
from podcap.agent._upload import GrowingFileUploader
from podcap.storage import open_store

_BLOCK_CPU_S = 0.002


class _Pressure:
    """A /proc/pressure/cpu whose stall time grows at ``stalled_share`` of the wall time."""

    def __init__(self, path: Path, stalled_share: float) -> None:
        self.path = path
        self._share = stalled_share
        self._stop = threading.Event()
        self._began = time.monotonic()
        self._write()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _write(self) -> None:
        total = int((time.monotonic() - self._began) * self._share * 1e6)
        part = self.path.with_suffix(".part")
        part.write_text(
            f"some avg10=0.00 avg60=0.00 avg300=0.00 total={total}\n"
            "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
        )
        os.replace(part, self.path)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self._write()

    def __enter__(self) -> _Pressure:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _burn(pacer: CpuPacer, seconds: float) -> tuple[float, float]:
    """Blocks of ~2 ms of CPU, each followed by the pacer, for ``seconds``; (thread CPU, wall) spent."""
    began, cpu = time.monotonic(), time.thread_time()
    while time.monotonic() - began < seconds:
        block = time.thread_time()
        while time.thread_time() - block < _BLOCK_CPU_S:
            pass
        pacer.after_block()
    return time.thread_time() - cpu, time.monotonic() - began


def _in_thread(pacer: CpuPacer, seconds: float) -> tuple[float, float]:
    out: list[tuple[float, float]] = []
    thread = threading.Thread(target=lambda: out.append(_burn(pacer, seconds)))
    thread.start()
    thread.join()
    return out[0]


@pytest.fixture
def contended(tmp_path: Path) -> Iterator[Path]:
    with _Pressure(tmp_path / "cpu", stalled_share=0.5) as pressure:
        yield pressure.path


def test_contended_cpu_holds_the_thread_to_its_share(contended: Path) -> None:
    pacer = CpuPacer(0.1, pressure=contended, window_s=0.1)
    cpu, wall = _in_thread(pacer, 1.5)
    # The first window (0.1 s) runs unpaced; after it, a tenth of a core. A busy machine only lowers the CPU.
    assert cpu <= 0.1 * wall + 0.1 + 0.02, f"{cpu:.2f} s of CPU in {wall:.2f} s"
    assert pacer.paused_s >= 0.5 * wall


def test_uncontended_cpu_is_never_paused(tmp_path: Path) -> None:
    with _Pressure(tmp_path / "cpu", stalled_share=0.0) as pressure:
        pacer = CpuPacer(0.1, pressure=pressure.path, window_s=0.1)
        _in_thread(pacer, 0.5)
    assert pacer.paused_s == 0


def test_without_pressure_information_nothing_is_paused(tmp_path: Path) -> None:
    pacer = CpuPacer(0.1, pressure=tmp_path / "absent", window_s=0.1)
    _in_thread(pacer, 0.5)
    assert pacer.paused_s == 0


def test_the_real_pressure_file_is_read() -> None:
    """On this kernel /proc/pressure/cpu exists (CI's machine has PSI): a pacer reads a growing total."""
    pacer = CpuPacer()
    first = pacer._stalled()
    if not Path("/proc/pressure/cpu").exists():
        assert first == -1
        return
    assert first >= 0


def test_paced_upload_of_a_growing_file_is_whole(contended: Path, tmp_path: Path) -> None:
    """Pacing slows the upload while the file grows, never loses from it: the stored object is the file."""
    store = open_store(f"file://{tmp_path / 'store'}")
    spool = tmp_path / "spool.pcap"
    data = os.urandom(12 << 20)

    async def run() -> None:
        done = asyncio.Event()
        uploader = GrowingFileUploader(
            store,
            "c/p.pcap",
            spool,
            read_size=1 << 20,
            poll_interval=0.05,
            pacer=CpuPacer(0.1, pressure=contended),
        )
        task = asyncio.create_task(uploader.run(done))
        with spool.open("wb") as out:
            for i in range(0, len(data), 1 << 19):
                out.write(data[i : i + (1 << 19)])
                out.flush()
                await asyncio.sleep(0.02)
        done.set()
        stored = await asyncio.wait_for(task, 60)
        assert stored.size == len(data)
        assert stored.sha256 == hashlib.sha256(data).hexdigest()

    asyncio.run(run())
    assert (tmp_path / "store" / "c" / "p.pcap").read_bytes() == data
