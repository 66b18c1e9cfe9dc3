"""Background work at a low priority, so that it never takes CPU or disk time that tcpdump needs.

Uploading, hashing and summarising a pcap can wait a little; tcpdump emptying the kernel's capture buffer cannot
(what it does not read in time, the kernel drops). Linux keeps the nice value and the IO priority per thread,
and a thread or a process inherits both from the thread that creates it, so a worker thread that calls
`lower_this_thread` first also lowers every thread and child process (tshark) it starts. Lowering is best
effort: a kernel or a seccomp profile that refuses it leaves the work at normal priority, logged once.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import threading

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
