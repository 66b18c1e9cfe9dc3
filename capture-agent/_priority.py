"""Background work at a low priority, so that it never takes CPU or disk time that tcpdump needs.

Uploading, hashing and summarising a pcap can wait a little; tcpdump emptying the kernel's capture buffer cannot
(what it does not read in time, the kernel drops). Linux keeps the nice value and the IO priority per thread,
and a thread or a process inherits both from the thread that creates it, so a worker thread that calls
`lower_this_thread` first also lowers every thread and child process (tshark) it starts. Lowering is best
effort: a kernel or a seccomp profile that refuses it leaves the work at normal priority, logged once.

A low priority alone is not enough while tcpdump is capturing a flood: the processes that make the traffic
sleep and wake in turns, the CPU is idle for moments in between, and a nice 19 thread runs in every one of
them (a third of a core under TCP bulk, bench/fidelity.py), taking cache and memory bandwidth, and a CPU that
must be taken back, from the very work tcpdump is racing. `CpuPacer` holds such a thread to a share of a core
for as long as the node's CPU is contended, by Linux's pressure stall information.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

# CFS weight 15 against tcpdump's 1024 at nice 0: under contention (TCP bulk fills both cores of a small node)
# about 1.5% of a core, yet all of an idle one. Nice 10 (weight 110) still took 24-39% of a core from tcpdump's
# side under TCP bulk (bench/fidelity.py). Not SCHED_IDLE: on a node that is never idle the pcap would never be
# uploaded.
BACKGROUND_NICE = 19

_IOPRIO_WHO_PROCESS = 1  # a thread id is a "process" to ioprio_set
_IOPRIO_CLASS_BE, _IOPRIO_CLASS_SHIFT = 2, 13
# Best effort at its lowest level, not the idle class: an idle-class upload could starve behind any busy disk.
_IOPRIO_LOWEST_BE = (_IOPRIO_CLASS_BE << _IOPRIO_CLASS_SHIFT) | 7
_SYS_IOPRIO_SET = {"x86_64": 251, "aarch64": 30}.get(platform.machine())
_warned = threading.Event()


def lower_this_thread(nice: int = BACKGROUND_NICE) -> None:
    """Makes the calling thread (and what it starts from now on) nice `nice` and lowest best-effort IO."""
    tid = threading.get_native_id()
    try:
        if os.getpriority(os.PRIO_PROCESS, tid) < nice:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
    except OSError as exc:
        _warn_once(f"cannot lower the CPU priority of background work: {exc}")
    if _SYS_IOPRIO_SET is None:
        return
    libc = ctypes.CDLL(None, use_errno=True)  # libc is in the process already (find_library runs ldconfig)
    if libc.syscall(_SYS_IOPRIO_SET, _IOPRIO_WHO_PROCESS, tid, _IOPRIO_LOWEST_BE) != 0:
        _warn_once(f"cannot lower the IO priority of background work: {os.strerror(ctypes.get_errno())}")


def _warn_once(message: str) -> None:
    if not _warned.is_set():
        _warned.set()
        log.warning("%s; it runs at normal priority", message)


# While capturing, at most this share of one core for a paced thread, whenever the CPU is contended.
PACED_SHARE = 0.1
# Contended: in the last interval, some task was waiting for a CPU at least this share of the time. An idle
# node stays under it, so a capture with CPU to spare uploads at full speed.
CONTENDED = 0.05
_MAX_PAUSE_S = 1.0  # one pause at most, so a stop or a cancellation queued behind it is not kept waiting
_CPU_PRESSURE = Path("/proc/pressure/cpu")


class CpuPacer:
    """Paces one thread's blocks of work to ``share`` of a core while the node's CPU is contended.

    Call `after_block` from that thread after each block: it sleeps long enough that the thread's CPU time
    since the last call is at most ``share`` of the time that passed, but only while /proc/pressure/cpu says
    that over the last ``window_s`` tasks were kept waiting for a CPU. The window is long on purpose: a nice 19
    thread runs when nobody else is runnable, so the moments it runs in always look uncontended. Without PSI
    (an old kernel, ``psi=0``) it never sleeps: the thread then has only its nice value.
    """

    def __init__(
        self,
        share: float = PACED_SHARE,
        *,
        contended: float = CONTENDED,
        window_s: float = 0.5,
        pressure: Path = _CPU_PRESSURE,
    ) -> None:
        if not 0 < share <= 1:
            raise ValueError("share must be in (0, 1]")
        self._share = share
        self._contended = contended
        self._window_s = window_s
        self._pressure = pressure
        self._window = (time.monotonic(), self._stalled())  # its start: monotonic and stalled seconds
        self._is_contended = False
        self._last = (time.monotonic(), time.thread_time())  # the last block's end: monotonic, thread CPU
        self.paused_s = 0.0  # in all, for the log and the benchmarks

    def after_block(self) -> None:
        now, cpu = time.monotonic(), time.thread_time()
        if now - self._window[0] >= self._window_s:
            stalled = self._stalled()
            began, stalled_then = self._window
            known = stalled >= 0 and stalled_then >= 0
            self._is_contended = known and stalled - stalled_then >= self._contended * (now - began)
            self._window = (now, stalled)
        pause = min((cpu - self._last[1]) / self._share - (now - self._last[0]), _MAX_PAUSE_S)
        if self._is_contended and pause > 0:
            time.sleep(pause)
            self.paused_s += pause
            now = time.monotonic()
        self._last = (now, cpu)

    def _stalled(self) -> float:
        """Seconds so far that some task waited for a CPU (PSI ``some total``); -1 when unknown."""
        try:
            first = self._pressure.read_text().split("\n", 1)[0]
        except OSError:
            return -1.0
        fields = dict(word.split("=", 1) for word in first.split()[1:] if "=" in word)
        try:
            return int(fields["total"]) / 1e6
        except (KeyError, ValueError):
            return -1.0
