"""Every TCP connection attempt and DNS query in a stored pcap, as this end saw it: what verdicts are made from.

The controller puts the ends of a capture side by side (`podcap.controller._verdicts`) to say where an attempt
died: did the server's end see the SYN, did it answer, did the answer reach the client's end. Each end only has to
report, per attempt, what crossed its device: SYNs, SYN+ACKs, resets, whether the handshake completed, and
retransmissions after it; per DNS query, how often it was sent and the answer's rcode.

Why pyshark: it gives every packet's fields by name, and a display filter keeps only the few packets that matter
(SYNs, resets, retransmissions, DNS, and a stream's first segment each way), so the per-packet cost of pyshark
(~5k packets/s with JSON) is paid for those only. pyshark runs in a child Python process (`_dissect`, the module
that says why and how tshark's path is pinned) started under the same setpriv as the summary's tsharks: the
unprivileged tcpdump user without any capability, a minimal environment, a private empty home and working
directory, at the summary thread's low priority.

Why in chunks: the pcap is cut at record borders into chunks of at most ``chunk_packets`` packets (the summary's
record walk), each fed on stdin to its own child, so no tshark holds per-packet state for more than a chunk. The
children print the kept packets in order and this module folds them, chunk after chunk, into attempts and queries,
so an attempt whose SYN fell into one chunk and its answer into the next is still one attempt. What a border
costs: tshark's retransmission analysis starts afresh there, as in the summary.

How an attempt is told: it starts with a SYN from client to server (more SYNs with the same client and server are
its retries); a SYN+ACK back counts as an answer; a reset from the server's side is ``server_reset``, from the
client's ``client_reset``; any other segment from the client with ACK set means the handshake completed
(``established``); a segment tshark marks as a retransmission, other than a SYN, counts in ``retransmissions``.
Packets of a stream whose SYN was not captured are not an attempt. A DNS query is keyed by client, server and id;
its answer comes back from the server to the client with the same id. At most ``limit`` of each are kept (the
earliest); ``truncated`` says more were seen.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from ._confine import confined
from ._summary import DnsQuery, Runner, Summary, TcpAttempt, TsharkFailed, summarise, walk_records

__all__ = ["Exchanges", "ExchangesFailed", "add_exchanges", "find_exchanges", "summarise_with_exchanges"]

_CHILD = Path(__file__).with_name("_dissect.py")
_LIMIT = 1000
_CHUNK_PACKETS = 200_000
_SYN, _RST, _ACK = 0x02, 0x04, 0x10
_TYPES = {
    1: "A",
    2: "NS",
    5: "CNAME",
    6: "SOA",
    12: "PTR",
    15: "MX",
    16: "TXT",
    28: "AAAA",
    33: "SRV",
    65: "HTTPS",
}
_RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}


class ExchangesFailed(Exception):
    """The pass could not be made (tshark missing or failing, timeout, cancel); the message says why."""


@dataclass(frozen=True)
class Exchanges:
    tcp_attempts: tuple[TcpAttempt, ...] = ()
    dns_queries: tuple[DnsQuery, ...] = ()
    truncated: bool = False


def summarise_with_exchanges(
    pcap: Path,
    *,
    cancel: threading.Event,
    workers: int | None,
    user: str,
    tshark: str,
    setpriv: str,
) -> Summary:
    """`summarise`, then this pass over the same pcap with the same tshark, user, workers and cancel."""
    summary = summarise(pcap, cancel=cancel, workers=workers, user=user, tshark=tshark, setpriv=setpriv)
    return add_exchanges(
        summary, pcap, cancel=cancel, workers=workers, user=user, tshark=tshark, setpriv=setpriv
    )


def add_exchanges(
    summary: Summary,
    pcap: Path,
    *,
    cancel: threading.Event | None = None,
    workers: int | None = None,
    user: str = "",
    tshark: str = "tshark",
    setpriv: str = "setpriv",
) -> Summary:
    """``summary`` with the pcap's exchanges, or made INCOMPLETE with the reason: this pass never fails a capture.

    The options are `find_exchanges`'s. A pcap the summary found no packet in is left as it is.
    """
    if summary.packets == 0:
        return summary
    try:
        found = find_exchanges(
            pcap, cancel=cancel, workers=workers, user=user, tshark=tshark, setpriv=setpriv
        )
    except (ExchangesFailed, OSError) as error:
        reason = f"no TCP attempts or DNS queries: {error}"
        return replace(summary, error="; ".join(e for e in (summary.error, reason) if e))
    return replace(
        summary,
        tcp_attempts=found.tcp_attempts,
        dns_queries=found.dns_queries,
        exchanges_truncated=found.truncated,
    )


def find_exchanges(
    pcap: Path,
    *,
    timeout: float = 120.0,
    workers: int | None = None,
    chunk_packets: int = _CHUNK_PACKETS,
    cancel: threading.Event | None = None,
    user: str = "",
    tshark: str = "tshark",
    setpriv: str = "setpriv",
    python: str = sys.executable,
    limit: int = _LIMIT,
) -> Exchanges:
    """The TCP attempts and DNS queries in the classic pcap ``pcap``. Blocking: run it in a thread.

    ``tshark``, ``setpriv`` and ``python`` (the interpreter that has pyshark) are paths or names on PATH; the
    child and its tshark run as ``user`` (root if "") without any capability. ``timeout`` bounds the whole call
    and ``cancel`` stops it within ~0.1 s, as for `summarise`; both raise ExchangesFailed, as does a failing
    tshark. Raises OSError when the file cannot be opened.
    """
    cancel = cancel or threading.Event()
    deadline = time.monotonic() + timeout
    paths = {name: shutil.which(name) for name in (tshark, setpriv, python)}
    missing = [name for name, found in paths.items() if found is None]
    if missing:
        raise ExchangesFailed(f"{missing[0]} not found")
    # pyshark finds tshark as dirname(path) + "tshark": the path given must be that file, links resolved.
    tshark_path = os.path.realpath(paths[tshark] or "")
    argv = [*confined(paths[setpriv] or "", user), paths[python] or "", "-I", str(_CHILD), tshark_path]
    with pcap.open("rb") as source:
        walk = walk_records(source, chunk_packets, cancel)
        if not walk.chunks:
            return Exchanges()
        runner = Runner(argv, source.fileno(), walk.header, deadline, timeout, cancel)
        workers = workers if workers is not None else min(2, os.cpu_count() or 1)
        try:
            outputs = runner.run(walk.chunks, max(1, workers))
        except TsharkFailed as error:
            if cancel.is_set():
                raise ExchangesFailed("cancelled") from error
            if time.monotonic() >= deadline:
                raise ExchangesFailed(f"not done within {timeout:g} s") from error
            raise ExchangesFailed(str(error)) from error
    fold = _Fold(limit)
    for text in outputs:
        for line in text.splitlines():
            fold.add(json.loads(line))
    return fold.result()


@dataclass
class _Attempt:
    client: str
    server: str
    first: datetime
    syns: int = 0
    syn_acks: int = 0
    server_reset: bool = False
    client_reset: bool = False
    established: bool = False
    retransmissions: int = 0


@dataclass
class _Query:
    client: str
    server: str
    id: int
    name: str
    type: str
    first: datetime
    queries: int = 0
    rcode: str | None = None


@dataclass
class _Fold:
    """Attempts and queries built from the children's packets, in capture order (see the module docstring)."""

    limit: int
    attempts: dict[tuple[str, str], _Attempt] = field(default_factory=dict)
    queries: dict[tuple[str, str, int], _Query] = field(default_factory=dict)
    truncated: bool = False

    def add(self, event: list[object]) -> None:
        kind, when, src, dst = str(event[0]), _time(str(event[1])), str(event[2]), str(event[3])
        if kind == "tcp":
            self._tcp(when, src, dst, int(str(event[4])), bool(event[5]))
        elif kind == "dns":
            ident, response, name = int(str(event[4])), bool(event[5]), str(event[6])
            self._dns(when, src, dst, ident, response, name, int(str(event[7])), int(str(event[8])))

    def _tcp(self, when: datetime, src: str, dst: str, flags: int, retransmission: bool) -> None:
        syn, ack, rst = flags & _SYN, flags & _ACK, flags & _RST
        if syn and not ack:
            attempt = self.attempts.get((src, dst))
            if attempt is None:
                if len(self.attempts) >= self.limit:
                    self.truncated = True
                    return
                attempt = self.attempts[src, dst] = _Attempt(src, dst, when)
            attempt.syns += 1
            return
        from_client = self.attempts.get((src, dst))
        to_client = self.attempts.get((dst, src))
        if syn:
            if to_client is not None:
                to_client.syn_acks += 1
        elif rst:
            if to_client is not None:
                to_client.server_reset = True
            elif from_client is not None:
                from_client.client_reset = True
        else:
            if from_client is not None and ack:
                from_client.established = True
            if retransmission and (attempt := from_client or to_client) is not None:
                attempt.retransmissions += 1

    def _dns(
        self,
        when: datetime,
        src: str,
        dst: str,
        ident: int,
        response: bool,
        name: str,
        qtype: int,
        rcode: int,
    ) -> None:
        if response:
            query = self.queries.get((dst, src, ident))
            if query is not None:
                query.rcode = _RCODES.get(rcode, str(rcode))
            return
        query = self.queries.get((src, dst, ident))
        if query is None:
            if len(self.queries) >= self.limit:
                self.truncated = True
                return
            query = self.queries[src, dst, ident] = _Query(
                src, dst, ident, name, _TYPES.get(qtype, str(qtype)), when
            )
        query.queries += 1

    def result(self) -> Exchanges:
        return Exchanges(
            tcp_attempts=tuple(
                TcpAttempt(
                    client=a.client,
                    server=a.server,
                    first_syn_time=a.first,
                    syns=a.syns,
                    syn_acks=a.syn_acks,
                    server_reset=a.server_reset,
                    client_reset=a.client_reset,
                    established=a.established,
                    retransmissions=a.retransmissions,
                )
                for a in sorted(self.attempts.values(), key=lambda a: a.first)
            ),
            dns_queries=tuple(
                DnsQuery(
                    client=q.client,
                    server=q.server,
                    id=q.id,
                    name=q.name,
                    type=q.type,
                    first_query_time=q.first,
                    queries=q.queries,
                    answered=q.rcode is not None,
                    rcode=q.rcode or "",
                )
                for q in sorted(self.queries.values(), key=lambda q: q.first)
            ),
            truncated=self.truncated,
        )


def _time(text: str) -> datetime:
    """tshark's epoch time ("1709294400.250000000") as UTC, to the microsecond like the summary's times."""
    seconds, _, fraction = text.partition(".")
    return datetime.fromtimestamp(int(seconds), UTC).replace(microsecond=int((fraction + "000000")[:6]))
