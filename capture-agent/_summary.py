"""What is inside a pcap, summarised on the node right after its upload: the one module that runs tshark.

Support staff want to know whether a capture is worth downloading before they open it: how many packets, over
what time, which protocols, who talked most, and whether TCP resets, retransmissions or DNS errors show up. The
agent has the spooled pcap on local disk, so it summarises it there and the controller stores the result.

Why tshark's statistics and not pyshark per packet: pyshark turns every packet into Python objects (~5k
packets/s with JSON, ~600/s with PDML; its ``only_summaries`` mode is broken in 0.6), so a 1,000,000-packet
capture would take minutes. tshark's own ``-z`` statistics do the counting in C. pyshark has no way to run them
(its parsers expect per-packet output), so this module runs tshark itself. It does not even let pyshark find
tshark: pyshark 0.6 reads a config.ini from the current directory to choose the binary, and the agent runs as
root.

Why the pcap is fed to several tshark processes in chunks rather than read by one: a tshark reading a file keeps
per-packet state for the whole file (~0.8 KB a packet: 800 MB for 1M packets, several GB for a full spool), and its
``-M`` session reset leaks ~12 MB per reset. A fresh tshark per chunk of at most ``chunk_packets`` packets bounds
the memory of each (~160 MB plus ~0.6 KB a packet), and two of them use both cores of a small node. The chunks'
counts add up exactly, with two costs at chunk borders, where tshark's per-stream state starts afresh: a segment
whose original was sent in the previous chunk is not counted as a retransmission, and a stream's first frames
after a border may be put under another application protocol (tls rather than http, say) than before it.

Why the record headers are walked in Python first: that gives exact packet and byte counts, the time span and the
chunk borders in one cheap pass (~0.5 s per million packets, no packet data parsed), and it notices a file cut
short in the middle of a packet, so tshark is only ever given complete records.

Why conversations are paired with endpoint tables: tshark 4.0 prints a conversation's size rounded ("18 MB" for
18,902,000 bytes) but an endpoint's exactly. An endpoint's bytes are the sum of its conversations' bytes, and the
ephemeral side of almost every TCP or UDP conversation takes part in that one conversation only, so peeling such
endpoints off gives every conversation's exact size; a figure that cannot be recovered that way (endpoints all
shared, a cycle of conversations) stays tshark's rounded-down one. Conversations with the same two endpoints are
counted as one.

Why TCP reassembly is off: a stream caught mid-way (a capture started during a download, or any chunk border)
makes tshark's HTTP dissector reassemble a body whose headers it never saw, which is quadratic: 8,000 packets of
such a download took 36 s instead of 0.3 s. Without it each frame is counted under the protocols it shows by
itself; TCP analysis (retransmissions, resets) does not need reassembly.

Why tshark runs under setpriv, as the unprivileged tcpdump user with no capability: its dissectors parse whatever
the captured pods sent, so a dissector bug must not be a way into the agent's root and capabilities. setpriv
starts it as ``user`` (when given; root otherwise, still without a single capability), with an empty bounding
set, no_new_privs and a parent-death signal, so it dies with the agent. It needs no file access: the chunk comes on
stdin from the agent, which opened the pcap.

tshark runs as an argument list with ``-n`` (no name resolution, so no DNS lookups from the node) in a minimal
environment whose HOME and configuration directories are a private empty directory (searchable, not writable, by
tshark's user), so personal preferences or plugins never change the numbers and nothing is written to the agent's
home. Every tshark is reaped; past the timeout, or when the caller cancels, all of them are killed.
"""

from __future__ import annotations

import enum
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from ._confine import confined

__all__ = [
    "Conversation",
    "DnsQuery",
    "ProtocolCount",
    "Runner",
    "Summary",
    "SummaryState",
    "TcpAttempt",
    "TsharkFailed",
    "Walk",
    "summarise",
    "walk_records",
]

_CHUNK_PACKETS = 200_000
_CHUNK_BYTES = 128 << 20  # and a chunk of jumbo frames stays bounded too (IP reassembly keeps fragments)
_GLOBAL_HEADER = 24
_RECORD_HEADER = 16
# libpcap's largest snaplen; a record claiming more (and more than the file's own snaplen) is garbage.
_MAX_SNAPLEN = 262144
_BLOCK = 1 << 20
_MICRO_MAGIC, _NANO_MAGIC, _PCAPNG_MAGIC = 0xA1B2C3D4, 0xA1B23C4D, 0x0A0D0D0A
_STDERR_KEEP = 400
# Frames counted by filter, each with a filtered protocol hierarchy (``io,phs,FILTER``): io,stat would do, but it
# prints no row at all for a chunk whose packets share one timestamp or run backwards in time. Fast and spurious
# retransmissions carry the plain retransmission field too in Wireshark 4.0; naming them keeps it so if that changes.
_COUNTED = {
    "tcp.analysis.retransmission || tcp.analysis.fast_retransmission || tcp.analysis.spurious_retransmission": (
        "tcp_retransmissions"
    ),
    "tcp.flags.reset == 1": "tcp_resets",
    "dns.flags.response == 1 && dns.flags.rcode != 0": "dns_errors",
}
_POLL_S = 0.1
_CANCELLED = "the summary was cancelled; only packet counts and times are given"
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class ProtocolCount:
    """One node of tshark's protocol hierarchy, named by its path from the link layer ("eth:ip:tcp").

    tshark 4.0's hierarchy has no "ethertype" layer, although its ``frame.protocols`` field names one
    ("eth:ethertype:ip:tcp"); the paths are the hierarchy's, as Wireshark's Statistics menu shows them.
    """

    protocol: str
    frames: int
    bytes: int


@dataclass(frozen=True)
class Conversation:
    """Traffic between two endpoints ("10.0.0.1:443", "[fd00::1]:443"), both directions; ``protocol`` is tcp/udp.

    ``endpoint_a`` is the side tshark saw first, usually the one that opened the conversation.
    """

    protocol: str
    endpoint_a: str
    endpoint_b: str
    frames: int
    bytes: int


@dataclass(frozen=True)
class TcpAttempt:
    """One TCP connection attempt (a SYN) as this end saw it, keyed by the client's "address:port".

    ``server`` is where the SYN went as seen here (a ClusterIP at the client's end, the endpoint at the server's).
    `podcap.agent._exchanges` says how each field is told.
    """

    client: str
    server: str
    first_syn_time: datetime
    syns: int = 0
    syn_acks: int = 0
    server_reset: bool = False
    client_reset: bool = False
    established: bool = False
    retransmissions: int = 0


@dataclass(frozen=True)
class DnsQuery:
    """One DNS query (client, server, id) as this end saw it; ``rcode`` is the answer's ("" if unanswered)."""

    client: str
    server: str
    id: int
    name: str
    type: str
    first_query_time: datetime
    queries: int = 0
    answered: bool = False
    rcode: str = ""


class SummaryState(enum.StrEnum):
    PENDING = "PENDING"  # queued or being made: nothing counted yet
    READY = "READY"
    INCOMPLETE = "INCOMPLETE"  # made as far as it could be; ``error`` says what is missing


@dataclass(frozen=True)
class Summary:
    """What a pcap holds. ``error`` says why the summary is missing or partial; the pcap itself is unaffected.

    ``bytes`` are bytes on the wire (a packet's original length, also when the capture cut it to a snaplen), the
    same measure as the protocol and conversation sizes. Timestamps are UTC, to the microsecond. ``pending``
    marks the placeholder a stored capture carries until its summary is made (`Summary.PENDING`).
    """

    packets: int = 0
    bytes: int = 0
    first_packet_time: datetime | None = None
    last_packet_time: datetime | None = None
    protocols: tuple[ProtocolCount, ...] = ()
    conversations: tuple[Conversation, ...] = ()
    tcp_resets: int = 0
    tcp_retransmissions: int = 0
    dns_errors: int = 0
    # Every TCP connection attempt and DNS query, earliest first, at most 1000 of each (`_exchanges`).
    tcp_attempts: tuple[TcpAttempt, ...] = ()
    dns_queries: tuple[DnsQuery, ...] = ()
    exchanges_truncated: bool = False
    error: str = ""
    pending: bool = False

    @property
    def state(self) -> SummaryState:
        if self.pending:
            return SummaryState.PENDING
        return SummaryState.INCOMPLETE if self.error else SummaryState.READY

    def to_json(self) -> str:
        """Compact JSON text, as the controller stores it; ``from_json`` reads it back."""
        record = asdict(self)
        for name in ("first_packet_time", "last_packet_time"):
            value = getattr(self, name)
            record[name] = value.isoformat() if value is not None else None
        for attempt in record["tcp_attempts"]:
            attempt["first_syn_time"] = attempt["first_syn_time"].isoformat()
        for query in record["dns_queries"]:
            query["first_query_time"] = query["first_query_time"].isoformat()
        return json.dumps(record, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Summary:
        """The summary ``to_json`` wrote. Unknown keys (from a newer agent) are ignored, missing ones default.

        Raises ValueError for text that is not such JSON.
        """
        record = json.loads(text)
        if not isinstance(record, dict):
            raise ValueError("a summary is a JSON object")
        try:
            return cls(
                packets=int(record.get("packets", 0)),
                bytes=int(record.get("bytes", 0)),
                first_packet_time=_time_from_json(record.get("first_packet_time")),
                last_packet_time=_time_from_json(record.get("last_packet_time")),
                protocols=tuple(
                    ProtocolCount(str(p["protocol"]), int(p["frames"]), int(p["bytes"]))
                    for p in record.get("protocols", ())
                ),
                conversations=tuple(
                    Conversation(
                        str(c["protocol"]),
                        str(c["endpoint_a"]),
                        str(c["endpoint_b"]),
                        int(c["frames"]),
                        int(c["bytes"]),
                    )
                    for c in record.get("conversations", ())
                ),
                tcp_resets=int(record.get("tcp_resets", 0)),
                tcp_retransmissions=int(record.get("tcp_retransmissions", 0)),
                dns_errors=int(record.get("dns_errors", 0)),
                tcp_attempts=tuple(
                    TcpAttempt(**{**a, "first_syn_time": _time_from_json(a["first_syn_time"])})
                    for a in record.get("tcp_attempts", ())
                ),
                dns_queries=tuple(
                    DnsQuery(**{**q, "first_query_time": _time_from_json(q["first_query_time"])})
                    for q in record.get("dns_queries", ())
                ),
                exchanges_truncated=bool(record.get("exchanges_truncated", False)),
                error=str(record.get("error", "")),
                pending=bool(record.get("pending", False)),
            )
        except (KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"not a summary: {error!r}") from error


def summarise(
    pcap: Path,
    *,
    top: int = 10,
    timeout: float = 120.0,
    workers: int | None = None,
    chunk_packets: int = _CHUNK_PACKETS,
    cancel: threading.Event | None = None,
    user: str = "",
    tshark: str = "tshark",
    setpriv: str = "setpriv",
) -> Summary:
    """Summarises the classic pcap file ``pcap`` (what ``tcpdump -w`` writes). Blocking: run it in a thread.

    Every tshark runs under ``setpriv`` as ``user`` (root if "") without any capability (the module docstring
    says why). ``tshark`` and ``setpriv`` are paths, or names looked up on PATH (the agent passes the absolute
    paths it found at start).

    ``top`` conversations (TCP and UDP together, most bytes first) are kept. ``timeout`` bounds the whole call:
    past it every tshark is killed and the summary holds the counts from the record headers only. ``workers``
    tshark processes (default: up to 2, one per CPU) each take at most ``chunk_packets`` packets. Setting
    ``cancel`` (from the agent's event loop when the capture is cancelled or the agent stops) kills every tshark
    within ~0.1 s and returns the counts so far: a thread cannot be cancelled, so this is how it is stopped.

    Content is never a reason to raise: an empty, truncated, corrupt or foreign file, a missing or failing tshark
    all give a Summary with ``error`` set and whatever could be counted. Raises OSError when the file cannot be
    opened (FileNotFoundError when it does not exist), ValueError for a negative ``top`` or ``chunk_packets`` < 1.
    """
    if top < 0 or chunk_packets < 1:
        raise ValueError("top must be >= 0 and chunk_packets >= 1")
    deadline = time.monotonic() + timeout
    with pcap.open("rb") as source:
        cancel = cancel or threading.Event()
        walk = walk_records(source, chunk_packets, cancel)
        summary = Summary(
            packets=walk.packets,
            bytes=walk.wire_bytes,
            first_packet_time=_time_from_ns(walk.first_ns),
            last_packet_time=_time_from_ns(walk.last_ns),
            error=walk.error,
        )
        if not walk.chunks or cancel.is_set():
            return summary
        tshark_path, setpriv_path = shutil.which(tshark), shutil.which(setpriv)
        if tshark_path is None or setpriv_path is None:
            missing = tshark if tshark_path is None else setpriv
            return replace(summary, error=_join(walk.error, f"{missing} not found, so no statistics"))
        workers = workers if workers is not None else min(2, os.cpu_count() or 1)
        try:
            totals = _Totals()
            argv = _argv(setpriv_path, tshark_path, user)
            runner = Runner(argv, source.fileno(), walk.header, deadline, timeout, cancel)
            for text in runner.run(walk.chunks, max(1, workers)):
                totals.add(_parse(text))
        except TsharkFailed as error:
            return replace(summary, error=_join(walk.error, str(error)))
    return replace(
        summary,
        protocols=totals.protocols(),
        conversations=totals.conversations(top),
        tcp_retransmissions=totals.counters["tcp_retransmissions"],
        tcp_resets=totals.counters["tcp_resets"],
        dns_errors=totals.counters["dns_errors"],
    )


class TsharkFailed(Exception):
    """tshark timed out, failed or printed something we cannot read; the message is the summary's error."""


def _join(*errors: str) -> str:
    return "; ".join(e for e in errors if e)


def _time_from_ns(ns: int | None) -> datetime | None:
    if ns is None:
        return None
    return datetime.fromtimestamp(ns // 1_000_000_000, UTC).replace(microsecond=ns % 1_000_000_000 // 1000)


def _time_from_json(value: object) -> datetime | None:
    if value is None:
        return None
    parsed = datetime.fromisoformat(str(value))
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


# --- the record walk -------------------------------------------------------------------------------------------


@dataclass
class Walk:
    """The file's global header, counts and time span of its complete records, and the chunks to give tshark."""

    header: bytes = b""
    packets: int = 0
    wire_bytes: int = 0
    first_ns: int | None = None
    last_ns: int | None = None
    chunks: list[tuple[int, int]] = field(default_factory=list)  # [start, end) byte offsets of whole records
    error: str = ""


def walk_records(source: BinaryIO, chunk_packets: int, cancel: threading.Event) -> Walk:
    """Reads only record headers, a block at a time; stops at the first record that is cut short or absurd.

    It is linear in the file's size and never waits on anything, so only ``cancel`` (checked once a block) stops
    it early; the timeout is left to the tshark runs.
    """
    size = os.fstat(source.fileno()).st_size
    header = source.read(_GLOBAL_HEADER)
    walk = Walk(header=header)
    if not header:
        walk.error = "the file is empty: not even a pcap header"
        return walk
    record, frac_ns, snaplen = _global_header(header)
    if record is None:
        walk.error = _not_pcap(header)
        return walk
    # A record must fit in one block; bigger ones exist only for link types tcpdump does not write.
    limit = min(max(snaplen, _MAX_SNAPLEN), _BLOCK - _RECORD_HEADER)
    unpack = record.unpack_from
    offset = chunk_start = _GLOBAL_HEADER
    packets = total = in_chunk = 0
    lo, hi = 1 << 64, -1
    while offset + _RECORD_HEADER <= size:
        if cancel.is_set():
            break
        source.seek(offset)
        block = source.read(_BLOCK)
        at, available = 0, len(block)
        # The hot loop (~0.35 s per million records): plain comparisons, no calls, no attribute lookups.
        while at + _RECORD_HEADER <= available:
            seconds, fraction, captured, original = unpack(block, at)
            end = at + _RECORD_HEADER + captured
            if end > available or captured > limit:
                break
            stamp = seconds * 1_000_000_000 + fraction * frac_ns
            if stamp < lo:  # noqa: PLR1730 -- min() per record costs 30% more
                lo = stamp
            if stamp > hi:  # noqa: PLR1730
                hi = stamp
            packets += 1
            total += original
            at = end
            in_chunk += 1
            if in_chunk >= chunk_packets or offset + at - chunk_start >= _CHUNK_BYTES:
                walk.chunks.append((chunk_start, offset + at))
                chunk_start, in_chunk = offset + at, 0
        if at == 0:
            break  # the record at offset is cut short or absurd
        offset += at
    if offset > chunk_start:
        walk.chunks.append((chunk_start, offset))
    if cancel.is_set():
        walk.error, walk.chunks = _CANCELLED, []
    elif offset < size:
        source.seek(offset)
        head = source.read(_RECORD_HEADER)
        if len(head) == _RECORD_HEADER and record.unpack(head)[2] > limit:
            walk.error = (
                f"the pcap is corrupt at byte {offset} (a record claims {record.unpack(head)[2]} bytes)"
            )
        else:
            walk.error = f"the pcap was cut short in the middle of a packet at byte {offset}"
        walk.error += f"; the summary covers the {packets} complete packets before it"
    elif packets == 0:
        walk.error = "the pcap holds no packets"
    walk.packets, walk.wire_bytes = packets, total
    walk.first_ns, walk.last_ns = (lo, hi) if packets else (None, None)
    return walk


def _global_header(header: bytes) -> tuple[struct.Struct | None, int, int]:
    """The record header layout, nanoseconds per timestamp fraction unit and snaplen; no layout if not pcap."""
    if len(header) == _GLOBAL_HEADER:
        for order in "<>":
            (magic,) = struct.unpack_from(order + "I", header)
            if magic in (_MICRO_MAGIC, _NANO_MAGIC):
                (snaplen,) = struct.unpack_from(order + "I", header, 16)
                return struct.Struct(order + "IIII"), 1000 if magic == _MICRO_MAGIC else 1, snaplen
    return None, 0, 0


def _not_pcap(header: bytes) -> str:
    if len(header) >= 4 and struct.unpack_from("<I", header)[0] == _PCAPNG_MAGIC:
        return "the file is pcapng; only classic pcap (tcpdump -w) is summarised"
    if len(header) < _GLOBAL_HEADER and header[:4] in (
        struct.pack(o + "I", m) for o in "<>" for m in (_MICRO_MAGIC, _NANO_MAGIC)
    ):
        return f"the pcap was cut short inside its {_GLOBAL_HEADER}-byte header ({len(header)} bytes)"
    return f"not a pcap file (it starts with {header[:4].hex()})"


# --- running tshark --------------------------------------------------------------------------------------------


def _argv(setpriv: str, tshark: str, user: str) -> list[str]:
    return [
        *confined(setpriv, user),  # as ``user`` (root if "") without any capability
        tshark,
        "-r",
        "-",
        "-n",
        "-q",
        "-o",
        "tcp.analyze_sequence_numbers:TRUE",  # what retransmissions need; a global preference may turn it off
        "-o",
        "tcp.desegment_tcp_streams:FALSE",  # see the module docstring
        "-z",
        "io,phs",
        "-z",
        "conv,tcp",
        "-z",
        "conv,udp",
        "-z",
        "endpoints,tcp",
        "-z",
        "endpoints,udp",
        *(arg for counted in _COUNTED for arg in ("-z", f"io,phs,{counted}")),
    ]


class Runner:
    """Runs each chunk through its own tshark, ``workers`` at a time, and stops them all at the first failure.

    ``argv`` may also be a program that starts tshark itself (the exchanges pass runs pyshark so): each child gets
    its own process group, and a stop kills the whole group, so such a tshark dies with its parent.
    """

    def __init__(
        self,
        argv: list[str],
        source: int,
        header: bytes,
        deadline: float,
        timeout: float,
        cancel: threading.Event,
    ) -> None:
        self._argv = argv
        self._source, self._header = source, header
        self._deadline, self._timeout, self._cancel = deadline, timeout, cancel
        self._lock = threading.Lock()
        self._live: set[subprocess.Popen[bytes]] = set()
        self._error: TsharkFailed | None = None

    def run(self, chunks: Sequence[tuple[int, int]], workers: int) -> list[str]:
        """The outputs in chunk order, or the first failure raised (not one it caused by stopping the others)."""
        with tempfile.TemporaryDirectory(prefix="podcap-tshark-") as home:
            # tshark's user may look for its configuration files here (there are none), not list or write.
            os.chmod(home, 0o711)  # noqa: S103
            env = {
                "PATH": _PATH,
                "HOME": home,
                "XDG_CONFIG_HOME": home,
                "WIRESHARK_CONFIG_DIR": home,
                "LC_ALL": "C",
                "TZ": "UTC",
            }
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tshark") as pool:
                futures = [pool.submit(self._one, chunk, env, home) for chunk in chunks]
                outputs = [future.result() for future in futures]
        if self._error is not None:
            raise self._error
        return outputs

    def _one(self, chunk: tuple[int, int], env: Mapping[str, str], home: str) -> str:
        stdin, feed = os.pipe()
        try:
            with self._lock:
                if self._cancel.is_set():
                    self._error = self._error or TsharkFailed(_CANCELLED)
                if self._error is not None:
                    os.close(feed)
                    return ""
                try:
                    process = subprocess.Popen(
                        self._argv,
                        stdin=stdin,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        env=dict(env),
                        cwd=home,
                        # Its own session: a Ctrl-C meant for the agent would make tshark stop reading and print
                        # statistics of part of the chunk as if that were all of it.
                        start_new_session=True,
                    )
                except OSError as error:
                    os.close(feed)
                    self._fail(TsharkFailed(f"tshark could not be started: {error}"))
                    return ""
                self._live.add(process)
        finally:
            os.close(stdin)
        feeder = threading.Thread(target=_feed, args=(feed, self._source, self._header, chunk), daemon=True)
        feeder.start()
        try:
            out, err = self._wait(process)
        except TsharkFailed as error:
            self._fail(error)
            return ""
        finally:
            if process.poll() is None:
                _kill_group(process)  # its end of the pipe closes, so the feeder stops too
                process.communicate()
            feeder.join()
            with self._lock:
                self._live.discard(process)
        if process.returncode != 0:
            detail = _stderr_tail(err)
            self._fail(
                TsharkFailed(f"tshark failed (exit {process.returncode}){': ' + detail if detail else ''}")
            )
            return ""
        return out.decode("utf-8", "replace")

    def _wait(self, process: subprocess.Popen[bytes]) -> tuple[bytes, bytes]:
        """tshark's output once it exits; short waits in turn, so that a cancel is seen within one of them."""
        while True:
            try:
                return process.communicate(timeout=max(0.0, min(self._deadline - time.monotonic(), _POLL_S)))
            except subprocess.TimeoutExpired:
                if self._cancel.is_set():
                    raise TsharkFailed(_CANCELLED) from None
                if time.monotonic() >= self._deadline:
                    raise TsharkFailed(
                        f"tshark did not finish within {self._timeout:g} s and was stopped; "
                        "only packet counts and times are given"
                    ) from None

    def _fail(self, error: TsharkFailed) -> None:
        with self._lock:
            if self._error is None:
                self._error = error
                for process in self._live:
                    _kill_group(process)


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """Kills the child and whatever it started in its process group (its own: ``start_new_session``)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        process.kill()  # a group already gone; the child itself may still be unreaped


def _feed(feed: int, source: int, header: bytes, chunk: tuple[int, int]) -> None:
    """Writes the global header and the chunk's records to tshark; stops quietly when tshark goes away."""
    try:
        os.write(feed, header)
        offset, end = chunk
        while offset < end:
            sent = os.sendfile(feed, source, offset, end - offset)
            if sent == 0:
                break  # the file shrank; tshark reports the short read
            offset += sent
    except BrokenPipeError:
        pass
    finally:
        os.close(feed)


def _stderr_tail(err: bytes) -> str:
    lines = [
        line.strip()
        for line in err.decode("utf-8", "replace").splitlines()
        if line.strip() and "This could be dangerous" not in line
    ]
    return " ".join(lines)[-_STDERR_KEEP:]


# --- reading tshark's statistics -------------------------------------------------------------------------------

_UNITS = {"bytes": 1, "kB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_SIZE = r"(\d+) (bytes|[kMGT]B)"
_CONV = re.compile(rf"^(\S+):(\d+)\s+<->\s+(\S+):(\d+)\s+\d+\s+{_SIZE}\s+\d+\s+{_SIZE}\s+(\d+)\s+{_SIZE}\s")
_ENDPOINT = re.compile(r"^(\S+)\s+(\d+)\s+(\d+)\s+(\d+)\s+\d+\s+\d+\s+\d+\s+\d+\s*$")
_PHS = re.compile(r"^( *)(\S+)\s+frames:(\d+)\s+bytes:(\d+)\s*$")
_SECTIONS = {
    "Protocol Hierarchy Statistics": "phs",
    "TCP Conversations": "conv tcp",
    "UDP Conversations": "conv udp",
    "TCP Endpoints": "endpoints tcp",
    "UDP Endpoints": "endpoints udp",
}


@dataclass
class _Chunk:
    """One tshark's statistics, as printed."""

    protocols: list[tuple[tuple[str, ...], int, int]] = field(default_factory=list)
    # protocol, endpoint a, endpoint b, frames, bytes at least, bytes at most (tshark rounds big sizes down)
    conversations: list[tuple[str, str, str, int, int, int]] = field(default_factory=list)
    endpoints: dict[tuple[str, str], int] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_COUNTED.values(), 0))


def _parse(text: str) -> _Chunk:
    """Reads the tables ``_argv`` asks for; a table missing from the output is an error, not zeros."""
    chunk = _Chunk()
    seen: set[str] = set()
    section = ""
    path: list[str] = []
    for line in text.splitlines():
        title = next((s for t, s in _SECTIONS.items() if line.startswith(t)), None)
        if title is not None:
            section = title
            seen.add(section)
            continue
        if section.startswith("phs") and line.startswith("Filter:"):
            counted = line[len("Filter:") :].strip()
            section = f"phs {_COUNTED[counted]}" if counted in _COUNTED else "phs" if not counted else ""
            seen.add(section)
        elif section.startswith("phs") and (m := _PHS.match(line)):
            if section != "phs":
                if not m[1]:  # a top-level protocol: its frames are all the matching frames of that link type
                    chunk.counters[section[4:]] += int(m[3])
                continue
            depth = len(m[1]) // 2
            path[depth:] = [m[2]]
            chunk.protocols.append((tuple(path), int(m[3]), int(m[4])))
        elif section.startswith("conv ") and (m := _CONV.match(line)):
            a, b, frames = _endpoint(m[1], m[2]), _endpoint(m[3], m[4]), int(m[9])
            low, unit = int(m[10]), _UNITS[m[11]]
            chunk.conversations.append((section[5:], a, b, frames, low * unit, low * unit + unit - 1))
        elif section.startswith("endpoints ") and (m := _ENDPOINT.match(line)):
            key = (section[10:], _endpoint(m[1], m[2]))
            chunk.endpoints[key] = chunk.endpoints.get(key, 0) + int(m[4])
    missing = ({*_SECTIONS.values()} | {f"phs {name}" for name in _COUNTED.values()}) - seen
    if missing:
        raise TsharkFailed(f"tshark's output lacks statistics: {', '.join(sorted(missing))}")
    return chunk


def _endpoint(address: str, port: str) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


@dataclass
class _Conv:
    protocol: str
    a: str
    b: str
    frames: int = 0
    low: int = 0  # bytes; equal to high once exact
    high: int = 0


class _Totals:
    """The chunks' statistics added up: counters and tables sum, conversations split by a border join again."""

    def __init__(self) -> None:
        self._protocols: dict[tuple[str, ...], list[int]] = {}
        self._conversations: dict[tuple[str, str, str], _Conv] = {}
        self._endpoints: dict[tuple[str, str], int] = {}
        self.counters = dict.fromkeys(_COUNTED.values(), 0)

    def add(self, chunk: _Chunk) -> None:
        for path, frames, size in chunk.protocols:
            counts = self._protocols.setdefault(path, [0, 0])
            counts[0] += frames
            counts[1] += size
        for protocol, a, b, frames, low, high in chunk.conversations:
            first, second = sorted((a, b))
            conv = self._conversations.setdefault((protocol, first, second), _Conv(protocol, a, b))
            conv.frames += frames
            conv.low += low
            conv.high += high
        for key, size in chunk.endpoints.items():
            self._endpoints[key] = self._endpoints.get(key, 0) + size
        for name, count in chunk.counters.items():
            self.counters[name] += count

    def protocols(self) -> tuple[ProtocolCount, ...]:
        """Depth first, siblings in the order tshark first printed them (the first chunk's order, then new ones)."""
        rank = {path: i for i, path in enumerate(self._protocols)}
        ordered = sorted(self._protocols, key=lambda p: [rank.get(p[: n + 1], 0) for n in range(len(p))])
        return tuple(ProtocolCount(":".join(p), *self._protocols[p]) for p in ordered)

    def conversations(self, top: int) -> tuple[Conversation, ...]:
        _exact_sizes(self._conversations.values(), self._endpoints)
        ranked = sorted(self._conversations.values(), key=lambda c: (-c.low, -c.frames, c.protocol, c.a, c.b))
        return tuple(Conversation(c.protocol, c.a, c.b, c.frames, c.low) for c in ranked[:top])


def _exact_sizes(conversations: Iterable[_Conv], endpoints: Mapping[tuple[str, str], int]) -> None:
    """Recovers exact conversation sizes from exact endpoint sizes (see the module docstring), in place.

    An endpoint in one conversation whose size is still unknown gives that size: its own bytes minus those of its
    other, known conversations. A value outside the rounding bounds tshark printed is not trusted, and neither is
    anything derived from it later.
    """
    remaining: dict[tuple[str, str], int | None] = dict(endpoints)
    unknown: dict[tuple[str, str], set[int]] = {}
    by_id: dict[int, _Conv] = {}
    for conv in conversations:
        ends = ((conv.protocol, conv.a), (conv.protocol, conv.b))
        if conv.low == conv.high:
            for end in ends:
                size = remaining.get(end)
                remaining[end] = None if size is None else size - conv.low
        elif conv.a != conv.b:
            by_id[id(conv)] = conv
            for end in ends:
                unknown.setdefault(end, set()).add(id(conv))
    ready = [end for end, convs in unknown.items() if len(convs) == 1]
    while ready:
        end = ready.pop()
        if len(unknown[end]) != 1:
            continue
        conv = by_id[unknown[end].pop()]
        other = (conv.protocol, conv.b if end == (conv.protocol, conv.a) else conv.a)
        unknown[other].discard(id(conv))
        size = remaining.get(end)
        if size is not None and conv.low <= size <= conv.high:
            conv.low = conv.high = size
            rest = remaining.get(other)
            remaining[other] = None if rest is None else rest - size
        else:
            remaining[other] = None
        if len(unknown[other]) == 1:
            ready.append(other)
