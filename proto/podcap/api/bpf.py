"""Checks a capture filter, with libpcap itself, before anything is stored or started.

Both servers check every filter: the controller before it stores a capture, the agent again before it runs
tcpdump, because it does not trust its caller. The filter is compiled with `pcap_compile` on a "dead" Ethernet
handle (no device, no privileges, no subprocess), so a bad filter is refused with libpcap's own message, and a
token that tcpdump would read as an option (`-z`, `-w`, ...) is refused before that. It lives in podcap.api
because the controller and the agent share nothing else.

Compiling can block for seconds (libpcap's optimiser on some long filters, a DNS lookup for `host NAME`):
call `check_filter` from a worker thread.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import threading

_DLT_EN10MB = 1
_SNAPLEN = 262144
_NETMASK_UNKNOWN = 0xFFFFFFFF
# Debian's and Ubuntu's soname for libpcap 1.x (the image's). Loaded by name, the dynamic loader finds it with no
# subprocess; ctypes.util.find_library would run `/sbin/ldconfig -p` (and may look for gcc or ld on PATH) inside
# the agent, the most privileged process of podcap, so it is only the fallback for other systems.
_SONAME = "libpcap.so.0.8"


class _BpfProgram(ctypes.Structure):
    _fields_ = [("bf_len", ctypes.c_uint), ("bf_insns", ctypes.c_void_p)]


class FilterError(ValueError):
    """The filter does not compile; the message is libpcap's."""


# Older libpcaps' compilers are not reentrant; one compile at a time costs nothing at our rates.
_lock = threading.Lock()


@functools.cache
def _libpcap() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(_SONAME)
    except OSError:
        name = ctypes.util.find_library("pcap")
        if name is None:
            raise
        lib = ctypes.CDLL(name)
    lib.pcap_open_dead.restype = ctypes.c_void_p
    lib.pcap_open_dead.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.pcap_compile.restype = ctypes.c_int
    lib.pcap_compile.argtypes = [
        ctypes.c_void_p,
        ctypes.POINTER(_BpfProgram),
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_uint32,
    ]
    lib.pcap_geterr.restype = ctypes.c_char_p
    lib.pcap_geterr.argtypes = [ctypes.c_void_p]
    lib.pcap_freecode.argtypes = [ctypes.POINTER(_BpfProgram)]
    lib.pcap_close.argtypes = [ctypes.c_void_p]
    return lib


MAX_FILTER_LENGTH = 4096


def check_filter(expression: str) -> None:
    """Raises FilterError, saying why, unless `expression` is a filter: at most MAX_FILTER_LENGTH ASCII
    characters, no NUL, and it compiles for Ethernet.

    What keeps a filter from being read as tcpdump options is where it goes, not what it looks like: the agent
    passes it as one argument after `--` (capture-agent/_tcpdump.py), so `len - 54 > 0`, pcap-filter(7)'s
    arithmetic examples and any other token starting with `-` are filter text; one that is not a filter
    (`-w /etc/passwd`) fails to compile here."""
    if len(expression) > MAX_FILTER_LENGTH:
        raise FilterError(f"the filter is longer than {MAX_FILTER_LENGTH} characters")
    if "\x00" in expression:
        raise FilterError("the filter contains a NUL character")
    try:
        encoded = expression.encode("ascii")
    except UnicodeEncodeError:
        raise FilterError("the filter may only contain ASCII characters") from None
    lib = _libpcap()
    with _lock:
        handle = lib.pcap_open_dead(_DLT_EN10MB, _SNAPLEN)
        if not handle:
            raise FilterError("libpcap could not open a handle to compile the filter")
        try:
            program = _BpfProgram()
            if lib.pcap_compile(handle, ctypes.byref(program), encoded, 1, _NETMASK_UNKNOWN) != 0:
                message = (lib.pcap_geterr(handle) or b"no reason given").decode("utf-8", "replace")
                raise FilterError(f"the filter does not compile: {message[:200]}")
            lib.pcap_freecode(ctypes.byref(program))
        finally:
            lib.pcap_close(handle)
