"""Where each TCP connection attempt and DNS query of a capture died, told from every end that saw it.

Each agent reports, per end (a target's pcap), the TCP attempts and DNS queries that crossed its device
(`CaptureSummary.tcp_attempts` / `dns_queries`). An attempt is keyed by the client's address:port, which a
Service's DNAT keeps, so the client's end (which sent the SYN to a ClusterIP) and the server's end (which saw it
arrive for its own IP) name the same attempt; a DNS query by the client's address:port and the query id.

Which end is which: the client's end is the target holding the client's IP; the server's end the target holding
the server's address as some end saw it (the endpoint's IP at the server's end), or else another target that saw
the attempt arrive. With both among the targets the verdict says where it died; with one (a single-pod capture,
or a peer that is not a target) it says what that end can tell. An end whose summary has no exchanges (not made,
or cut at 1000) is no witness of absence. The codes are documented in common.proto's Verdict and docs/diagnosis.md.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from podcap.api.v1 import common_pb2

__all__ = ["End", "verdicts"]


@dataclass(frozen=True)
class End:
    """One target of a capture: "namespace/pod@node", the pod's IPs, and its summary (None: no pcap)."""

    label: str
    ips: tuple[str, ...]
    summary: common_pb2.CaptureSummary | None

    def witness(self) -> bool:
        """Its exchanges were made: absence from them means the end did not see it."""
        s = self.summary
        if s is None or s.exchanges_truncated:
            return False
        return s.state == common_pb2.SUMMARY_STATE_READY or bool(s.tcp_attempts or s.dns_queries)

    def holds(self, endpoint: str) -> bool:
        return _ip(endpoint) in {_ip(ip) for ip in self.ips}


def verdicts(ends: Sequence[End]) -> list[common_pb2.Verdict]:
    """Every attempt's verdict, then every query's, each in the order it was first seen."""
    return _tcp(ends) + _dns(ends)


def _ip(endpoint: str) -> str:
    host = endpoint.rsplit(":", 1)[0] if endpoint.count(":") == 1 or endpoint.startswith("[") else endpoint
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return host


def _roles(
    ends: Sequence[End], seen: Mapping[int, object], client: str, servers: set[str]
) -> tuple[int | None, int | None]:
    """Indexes of the client's end and the server's end among ``ends`` (None: not a target)."""
    client_end = next((i for i, e in enumerate(ends) if e.holds(client)), None)
    server_end = next(
        (i for i, e in enumerate(ends) if i != client_end and any(e.holds(s) for s in servers)), None
    )
    if server_end is None:
        server_end = next((i for i in seen if i != client_end), None)
    return client_end, server_end


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _tcp(ends: Sequence[End]) -> list[common_pb2.Verdict]:
    by_client: dict[str, dict[int, common_pb2.TcpAttempt]] = {}
    for i, end in enumerate(ends):
        for attempt in end.summary.tcp_attempts if end.summary is not None else ():
            by_client.setdefault(attempt.client, {}).setdefault(i, attempt)
    order = sorted(
        by_client, key=lambda c: min(a.first_syn_time.ToNanoseconds() for a in by_client[c].values())
    )
    out = []
    for client in order:
        seen = by_client[client]
        c_end, s_end = _roles(ends, seen, client, {a.server for a in seen.values()})
        c, s = seen.get(c_end) if c_end is not None else None, seen.get(s_end) if s_end is not None else None
        first = c or s or next(iter(seen.values()))
        subject = f"{client} -> {first.server}"
        evidence = [
            _tcp_evidence(ends[i], seen.get(i))
            for i in (c_end, s_end)
            if i is not None and (i in seen or ends[i].witness())
        ]
        if c is not None and s_end is not None and (s is not None or ends[s_end].witness()):
            code, text, ok = _tcp_between(c, s)
        else:
            code, text, ok = _tcp_alone(first)
        out.append(
            common_pb2.Verdict(
                protocol="tcp", subject=subject, ok=ok, code=code, verdict=text, evidence=evidence
            )
        )
    return out


def _tcp_between(c: common_pb2.TcpAttempt, s: common_pb2.TcpAttempt | None) -> tuple[str, str, bool]:
    if s is None:
        return "syn_not_received", "the server never received the SYN", False
    if s.server_reset and not s.established:
        return "server_reset", "the server answered RST", False
    if s.syn_acks == 0:
        return "server_silent", "the server received the SYN and never answered", False
    if c.syn_acks == 0:
        return "reply_lost", "the reply was lost between the nodes", False
    return _after_handshake(c, s)


def _tcp_alone(a: common_pb2.TcpAttempt) -> tuple[str, str, bool]:
    if a.server_reset and not a.established:
        return "server_reset", "the server answered RST", False
    if a.syn_acks == 0:
        return "syn_unanswered", f"{_plural(a.syns, 'SYN')} without an answer", False
    return _after_handshake(a, a)


def _after_handshake(c: common_pb2.TcpAttempt, s: common_pb2.TcpAttempt) -> tuple[str, str, bool]:
    retransmissions = max(c.retransmissions, s.retransmissions)
    if c.server_reset or s.server_reset:
        return "server_reset", "connected, then the server reset the connection", False
    if retransmissions:
        return "retransmissions", f"connected, with {_plural(retransmissions, 'retransmission')}", False
    # A client that resets a connection it completed is usually just closing with data unread: no trouble.
    if (c.client_reset or s.client_reset) and not (c.established or s.established):
        return "client_reset", "the client reset the connection before completing the handshake", False
    return "connected", "connected", True


def _tcp_evidence(end: End, a: common_pb2.TcpAttempt | None) -> str:
    if a is None:
        return f"{end.label}: nothing"
    seen = [_plural(a.syns, "SYN"), _plural(a.syn_acks, "SYN+ACK")]
    if a.server_reset:
        seen.append("reset by the server")
    if a.client_reset:
        seen.append("reset by the client")
    if a.established:
        seen.append("established")
    if a.retransmissions:
        seen.append(_plural(a.retransmissions, "retransmission"))
    return f"{end.label}: {', '.join(seen)}"


def _dns(ends: Sequence[End]) -> list[common_pb2.Verdict]:
    by_key: dict[tuple[str, int], dict[int, common_pb2.DnsQuery]] = {}
    for i, end in enumerate(ends):
        for query in end.summary.dns_queries if end.summary is not None else ():
            by_key.setdefault((query.client, query.id), {}).setdefault(i, query)
    order = sorted(by_key, key=lambda k: min(q.first_query_time.ToNanoseconds() for q in by_key[k].values()))
    out = []
    for key in order:
        seen = by_key[key]
        c_end, s_end = _roles(ends, seen, key[0], {q.server for q in seen.values()})
        c, s = seen.get(c_end) if c_end is not None else None, seen.get(s_end) if s_end is not None else None
        first = c or s or next(iter(seen.values()))
        subject = f"{first.type} {first.name} from {first.client} to {first.server}"
        evidence = [
            _dns_evidence(ends[i], seen.get(i))
            for i in (c_end, s_end)
            if i is not None and (i in seen or ends[i].witness())
        ]
        if c is not None and s_end is not None and (s is not None or ends[s_end].witness()):
            if s is None:
                code, text, ok = "query_not_received", "the DNS server never received the query", False
            elif not s.answered:
                code, text, ok = "no_dns_answer", "no DNS answer", False
            elif not c.answered:
                code, text, ok = "dns_answer_lost", "the DNS answer was lost on its way back", False
            else:
                code, text, ok = _rcode(c)
        else:
            code, text, ok = _rcode(first) if first.answered else ("no_dns_answer", "no DNS answer", False)
        out.append(
            common_pb2.Verdict(
                protocol="dns", subject=subject, ok=ok, code=code, verdict=text, evidence=evidence
            )
        )
    return out


def _rcode(q: common_pb2.DnsQuery) -> tuple[str, str, bool]:
    if q.rcode == "NOERROR":
        return "answered", "answered", True
    return "dns_error", f"the DNS server answered {q.rcode}", False


def _dns_evidence(end: End, q: common_pb2.DnsQuery | None) -> str:
    if q is None:
        return f"{end.label}: nothing"
    answer = f"answered {q.rcode}" if q.answered else "no answer"
    return f"{end.label}: {_plural(q.queries, 'query')}, {answer}".replace("querys", "queries")
