"""The one module that runs tcpdump.

tcpdump runs as an argument list, never through a shell, with the user's filter as the single last argument after
`--`, so no user text can ever be read as an option (a filter like `-z /evil.sh` ran code as root in another capture
tool). We wait for tcpdump's "listening on" line before reporting the capture as running, stop it with SIGINT so
that it flushes and prints its closing statistics, and always reap it.

How tcpdump captures is chosen from measurements (bench/fidelity.py, docs/capture-fidelity.md): a large kernel
buffer (-B, the node's default or the request's), no immediate mode (libpcap then hands packets over a ring block
at a time, at the latest after its 1 s timeout, instead of waking tcpdump for every packet, which lost 9-38% of
a 200k packet/s flood here), and -U, so that each block's packets reach the file on disk at once: the uploader,
and a live view, read the file no more than about a second behind the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
from dataclasses import dataclass
from pathlib import Path

from ._confine import confined
from ._errors import CaptureError, InvalidCaptureRequest, MissingPrivilege

_STATS = {
    "packets": re.compile(rb"^(\d+) packets? captured", re.M),
    "packets_received": re.compile(rb"^(\d+) packets? received by filter", re.M),
    "kernel_drops": re.compile(rb"^(\d+) packets? dropped by kernel", re.M),
}
# What SIGUSR1 makes a running tcpdump print, on one line: its counts so far (tcpdump.c, requestinfo → info(0)).
_RUNNING_STATS = re.compile(
    rb"^\S+: (\d+) packets? captured, (\d+) packets? received by filter, (\d+) packets? dropped by kernel"
)
_LISTENING = b"listening on "
_START_TIMEOUT_S = 10.0  # without CPU progress before "listening on" (see Tcpdump._until_started)
_START_LIMIT_S = 120.0
_STOP_TIMEOUT_S = 10.0
# tcpdump's libpcap timeout (tcpdump sets 1000 ms): outside immediate mode the kernel hands a ring block over once
# it is full or that long after it was opened. SIGINT ends tcpdump without reading a block still open, so `stop()`
# waits that long, and a little, first: every packet that arrived before the stop is then in the pcap. An end
# without `stop()` (the agent killed, so the parent-death SIGINT; the pod's device gone) loses up to that last second.
_BUFFER_TIMEOUT_S = 1.0
_STOP_DRAIN_S = _BUFFER_TIMEOUT_S + 0.1
_STDERR_KEEP = 64 * 1024
# An AF_PACKET socket is all tcpdump needs: promiscuous mode through PACKET_ADD_MEMBERSHIP takes no capability,
# and tcpdump changes no interface setting (tests/agent/test_privileges.py captures on a routed /32 veth, a bridge
# port veth and a node interface with this alone).
_CAP = "net_raw"
# What the agent must hold to run tcpdump as another user with only _CAP (bit numbers of linux/capability.h):
# setpriv can hand tcpdump only capabilities the agent has, changes ids and groups (SETUID, SETGID) and shrinks
# tcpdump's bounding set (SETPCAP; without it setpriv silently leaves the bounding set whole). Signalling a process
# of another user takes KILL, for SIGINT and for the parent-death signal alike: without it tcpdump could be
# neither stopped nor ended with its agent.
_LAUNCH_CAPS = {
    "CAP_NET_RAW": 13,
    "CAP_SETUID": 7,
    "CAP_SETGID": 6,
    "CAP_SETPCAP": 8,
    "CAP_KILL": 5,
}


@dataclass(frozen=True)
class TcpdumpStats:
    """tcpdump's closing statistics; without them (tcpdump ended with the agent) the packets are counted from the
    pcap and the kernel's drops are unknown, not 0."""

    packets: int = 0
    packets_received: int = 0
    kernel_drops: int = 0
    drops_known: bool = True


def _cpu_ticks(pid: int) -> int:
    """utime + stime of a process, in clock ticks (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def parse_stats(stderr: bytes) -> TcpdumpStats:
    """Reads the three counters tcpdump prints on exit; a missing line counts as zero."""
    values = {name: int(m.group(1)) if (m := rx.search(stderr)) else 0 for name, rx in _STATS.items()}
    return TcpdumpStats(values["packets"], values["packets_received"], values["kernel_drops"])


def tcpdump_argv(
    tcpdump: str,
    interface: str,
    spool_file: Path,
    snaplen: int,
    filter_expr: str,
    user: str,
    max_packets: int = 0,
    *,
    setpriv: str,
    buffer_kib: int = 0,
) -> list[str]:
    """The exact command line: tcpdump under setpriv, the filter one argument, last, after `--`.

    `tcpdump` and `setpriv` are absolute paths (`Programs`), so no exec searches PATH. setpriv starts tcpdump as
    `user` (when given) with only CAP_NET_RAW, so it is never root, and with a parent-death signal, so it flushes
    and exits if the agent dies, even by SIGKILL. (tcpdump's own `-Z` would drop root only after starting as root,
    and a credential change clears the parent-death signal.)
    """
    if "\x00" in filter_expr:
        raise InvalidCaptureRequest("the filter contains a NUL character")
    # Without a user the agent keeps tcpdump's uid and capabilities as they are (a local, unprivileged run).
    argv = confined(setpriv, user, [_CAP], pdeathsig="INT") if user else [setpriv, "--pdeathsig=INT", "--"]
    argv += [tcpdump, "-i", interface, "-w", str(spool_file), "-U", "-n"]
    argv += ["-s", str(snaplen)]
    if buffer_kib:
        argv += ["-B", str(buffer_kib)]
    if max_packets:
        argv += ["-c", str(max_packets)]
    argv.append("--")
    if filter_expr.strip():
        argv.append(filter_expr)
    return argv


class Tcpdump:
    """One running tcpdump: started, then stopped by `stop()` or ended by itself, and always reaped by `wait()`."""

    def __init__(self, process: asyncio.subprocess.Process, argv: list[str]) -> None:
        self._process = process
        self.argv = argv
        self._stderr = bytearray()
        self._stderr_done = asyncio.Event()
        self._listening = asyncio.Event()
        self._running_stats: TcpdumpStats | None = None
        self._reader = asyncio.create_task(self._read_stderr())

    @classmethod
    async def start(cls, argv: list[str]) -> Tcpdump:
        """Starts tcpdump and returns once it is capturing; CaptureError with tcpdump's message if it cannot,
        MissingPrivilege (before anything runs) if the agent could not run it as intended. A tcpdump that does not
        come up, also when the caller is cancelled meanwhile, is killed and reaped before this returns."""
        if missing := _missing_launch_caps(argv):
            raise MissingPrivilege(
                f"cannot start tcpdump: the agent lacks {', '.join(missing)}. Running tcpdump as an "
                "unprivileged user with only CAP_NET_RAW, and stopping it, take "
                f"{', '.join(_LAUNCH_CAPS)} in the agent container's securityContext.capabilities.add "
                "(deploy/base/agent/daemonset.yaml)"
            )
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            raise CaptureError(f"cannot run {argv[0]}: {exc.strerror}") from exc
        tcpdump = cls(process, argv)
        listening = asyncio.create_task(tcpdump._listening.wait())
        exited = asyncio.create_task(process.wait())
        try:
            await tcpdump._until_started(listening, exited)
        except BaseException:
            await tcpdump.kill()
            raise
        finally:
            listening.cancel()
            exited.cancel()
        if tcpdump._listening.is_set():
            return tcpdump
        await tcpdump.kill()
        message = tcpdump.stderr_text().strip() or "tcpdump did not start listening in time"
        if "syntax error" in message or "can't parse filter" in message:
            raise InvalidCaptureRequest(f"the filter does not compile: {message}")
        raise CaptureError(f"tcpdump failed to start: {message}")

    async def _until_started(self, listening: asyncio.Task[bool], exited: asyncio.Task[int]) -> None:
        """Waits until tcpdump listens or exits, for as long as it is working towards it.

        Before "listening on" tcpdump compiles the filter, which takes seconds for some 4 KiB filters and many
        more on a loaded node. So the limit is on time without progress: a tcpdump that has used no CPU for
        _START_TIMEOUT_S is stuck; one that is still compiling gets up to _START_LIMIT_S in all."""
        loop = asyncio.get_running_loop()
        began = idle_since = loop.time()
        cpu = _cpu_ticks(self._process.pid)
        while loop.time() - began < _START_LIMIT_S:
            done, _ = await asyncio.wait(
                {listening, exited}, timeout=1.0, return_when=asyncio.FIRST_COMPLETED
            )
            if done:
                return
            now, used = loop.time(), _cpu_ticks(self._process.pid)
            if used > cpu:
                cpu, idle_since = used, now
            elif now - idle_since >= _START_TIMEOUT_S:
                return

    async def _read_stderr(self) -> None:
        stream = self._process.stderr
        assert stream is not None
        try:
            while line := await stream.readline():
                if (counts := _RUNNING_STATS.match(line)) is not None:
                    packets, received, drops = map(int, counts.groups())
                    self._running_stats = TcpdumpStats(packets, received, drops)
                    continue  # a count asked for (`ask_for_counts`), not one of tcpdump's messages
                if len(self._stderr) < _STDERR_KEEP:
                    self._stderr += line
                if line.startswith(_LISTENING) or b": listening on " in line:
                    self._listening.set()
        finally:
            self._stderr_done.set()

    @property
    def pid(self) -> int:
        return self._process.pid

    def stats(self) -> TcpdumpStats:
        """The statistics tcpdump printed so far (all of them once it has exited)."""
        return parse_stats(bytes(self._stderr))

    def ask_for_counts(self) -> None:
        """Asks a listening tcpdump for its counts so far (SIGUSR1); `running_stats` has them a moment later.

        Only once tcpdump listens: it handles SIGUSR1 from then on, and before that the signal would end it."""
        if self._listening.is_set() and self.running:
            with contextlib.suppress(ProcessLookupError):
                self._process.send_signal(signal.SIGUSR1)

    @property
    def running_stats(self) -> TcpdumpStats | None:
        """The counts tcpdump last gave `ask_for_counts`: packets written so far, received, dropped by the
        kernel (only blocks the kernel has handed over count, so up to a buffer timeout behind)."""
        return self._running_stats

    def stderr_text(self) -> str:
        return self._stderr.decode("utf-8", "replace")

    @property
    def running(self) -> bool:
        return self._process.returncode is None

    async def stop(self) -> None:
        """Asks tcpdump to finish once it has had the packets that arrived before this call (a buffer timeout
        later): SIGINT makes it flush the pcap and print its statistics."""
        exited = asyncio.create_task(self._process.wait())
        try:
            await asyncio.wait({exited}, timeout=_STOP_DRAIN_S)
        finally:
            exited.cancel()
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                self._process.send_signal(signal.SIGINT)

    async def wait(self) -> TcpdumpStats:
        """Waits for tcpdump to end (killing it if it ignores SIGINT) and returns its statistics."""
        try:
            await asyncio.wait_for(self._process.wait(), timeout=_STOP_TIMEOUT_S)
        except TimeoutError:
            await self.kill()
        await self._stderr_done.wait()
        returncode = self._process.returncode
        if returncode not in (0, None) and returncode != -signal.SIGINT:
            raise CaptureError(f"tcpdump exited with status {returncode}: {self.stderr_text().strip()}")
        return parse_stats(bytes(self._stderr))

    async def exited(self) -> None:
        """Returns when tcpdump has exited on its own or been stopped."""
        await self._process.wait()

    async def kill(self) -> None:
        """Ends tcpdump at once and reaps it; used on failure paths."""
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()
        await self._process.wait()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(self._stderr_done.wait(), timeout=_STOP_TIMEOUT_S)


def _missing_launch_caps(argv: list[str]) -> list[str]:
    """The capabilities `_LAUNCH_CAPS` names that are outside the agent's bounding set, so that no child of the
    agent can have them; [] when tcpdump keeps the agent's own user."""
    launcher = argv[: argv.index("--")] if "--" in argv else argv
    if not any(arg.startswith("--reuid=") for arg in launcher):
        return []
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return []  # no procfs to ask: setpriv's own error will have to do
    bounding = next(
        (int(line.split()[1], 16) for line in status.splitlines() if line.startswith("CapBnd:")), -1
    )
    return [name for name, bit in _LAUNCH_CAPS.items() if not bounding >> bit & 1]
