"""The summary of a pcap, made by real tshark from pcaps written here frame by frame.

The frames are built byte by byte (Ethernet, IPv4/IPv6, TCP, UDP, DNS, ICMP, with real checksums), so every number
the summary should show is known in advance: how many packets, how many bytes, which conversation carried what,
which segment is a retransmission, which DNS answer is NXDOMAIN. The bad files are the ones a node really leaves:
a capture with no packets, one cut off mid-write, garbage, and a tshark that does not finish in time. tshark parses
what pods sent, so it runs as the unprivileged tcpdump user with no capability, and summarises all the same.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import pwd
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from podcap.agent._summary import Conversation, Summary, summarise

T0 = datetime(2024, 3, 1, 12, 0, 0, 250_000, tzinfo=UTC)
STEP = timedelta(milliseconds=10)
CLIENT, SERVER, RESOLVER = "10.0.0.1", "10.0.0.2", "10.0.0.53"
V6_A, V6_B = "fd00::1", "fd00::2"


# --- frames ------------------------------------------------------------------------------------------------------


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _ethernet(payload: bytes, ethertype: int) -> bytes:
    return (
        bytes.fromhex("020000000002") + bytes.fromhex("020000000001") + struct.pack("!H", ethertype) + payload
    )


def _ip(src: str, dst: str, proto: int, payload: bytes) -> bytes:
    """An Ethernet frame carrying an IPv4 or IPv6 packet, whichever the addresses are."""
    a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if a.version == 6:
        header = struct.pack("!IHBB", 6 << 28, len(payload), proto, 64) + a.packed + b.packed
        return _ethernet(header + payload, 0x86DD)
    header = (
        struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(payload), 1, 0x4000, 64, proto, 0) + a.packed + b.packed
    )
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    return _ethernet(header + payload, 0x0800)


def _pseudo(src: str, dst: str, proto: int, length: int) -> bytes:
    a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if a.version == 6:
        return a.packed + b.packed + struct.pack("!IxxxB", length, proto)
    return a.packed + b.packed + struct.pack("!xBH", proto, length)


SYN, ACK, PSH, RST = 0x02, 0x10, 0x08, 0x04


def _tcp(
    src: str, sport: int, dst: str, dport: int, seq: int, ack: int, flags: int, data: bytes = b""
) -> bytes:
    header = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 65535, 0, 0)
    check = _checksum(_pseudo(src, dst, 6, len(header) + len(data)) + header + data)
    return _ip(src, dst, 6, header[:16] + struct.pack("!H", check) + header[18:] + data)


def _udp(src: str, sport: int, dst: str, dport: int, data: bytes) -> bytes:
    header = struct.pack("!HHHH", sport, dport, 8 + len(data), 0)
    check = _checksum(_pseudo(src, dst, 17, len(header) + len(data)) + header + data) or 0xFFFF
    return _ip(src, dst, 17, header[:6] + struct.pack("!H", check) + data)


def _dns(ident: int, name: str, *, rcode: int | None = None) -> bytes:
    """A query for an A record, or the answer to it with ``rcode`` (3 is NXDOMAIN) and no records."""
    flags = 0x0100 if rcode is None else 0x8180 | rcode
    question = b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0\0\1\0\1"
    return struct.pack("!HHHHHH", ident, flags, 1, 0, 0, 0) + question


def _icmp_echo(src: str, dst: str, kind: int, seq: int) -> bytes:
    message = struct.pack("!BBHHH", kind, 0, 0, 7, seq) + b"podcap-ping!"
    return _ip(src, dst, 1, message[:2] + struct.pack("!H", _checksum(message)) + message[4:])


def _write_pcap(path: Path, frames: Sequence[bytes], *, order: str = "<", nanoseconds: bool = False) -> Path:
    """A classic pcap, one frame every STEP from T0."""
    magic = 0xA1B23C4D if nanoseconds else 0xA1B2C3D4
    with path.open("wb") as out:
        out.write(struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, 262144, 1))
        for i, frame in enumerate(frames):
            stamp = T0 + i * STEP
            seconds = int(stamp.timestamp())
            fraction = stamp.microsecond * (1000 if nanoseconds else 1)
            out.write(struct.pack(order + "IIII", seconds, fraction, len(frame), len(frame)) + frame)
    return path


# --- the traffic -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Traffic:
    """The frames in capture order, and the frames of each conversation (keyed as the summary names it)."""

    frames: tuple[bytes, ...]
    conversations: dict[tuple[str, str, str], tuple[bytes, ...]]


def _traffic() -> Traffic:
    """A TCP connection with a retransmitted segment, a bulk download (> 10 kB) and a RST; DNS with one NXDOMAIN;
    a ping; one IPv6 datagram."""
    c, s = CLIENT, SERVER
    request = b"GET /checkout HTTP/1.1\r\nHost: shop\r\n\r\n"
    tcp = [
        _tcp(c, 40000, s, 443, 1000, 0, SYN),
        _tcp(s, 443, c, 40000, 5000, 1001, SYN | ACK),
        _tcp(c, 40000, s, 443, 1001, 5001, ACK),
        _tcp(c, 40000, s, 443, 1001, 5001, PSH | ACK, request),
        _tcp(c, 40000, s, 443, 1001, 5001, PSH | ACK, request),  # the same segment again: a retransmission
    ]
    seq, ack = 5001, 1001 + len(request)
    for _ in range(12):
        tcp.append(_tcp(s, 443, c, 40000, seq, ack, ACK, b"\xab" * 1400))
        seq += 1400
    tcp.append(_tcp(c, 40000, s, 443, ack, seq, ACK))
    tcp.append(_tcp(s, 443, c, 40000, seq, ack, RST | ACK))
    nxdomain = [
        _udp(c, 50000, RESOLVER, 53, _dns(7, "nope.shop.svc.cluster.local")),
        _udp(RESOLVER, 53, c, 50000, _dns(7, "nope.shop.svc.cluster.local", rcode=3)),
    ]
    found = [
        _udp(c, 50001, RESOLVER, 53, _dns(8, "shop.svc")),
        _udp(RESOLVER, 53, c, 50001, _dns(8, "shop.svc", rcode=0)),
    ]
    ping = [_icmp_echo(c, s, 8, 1), _icmp_echo(s, c, 0, 1)]
    v6 = [_udp(V6_A, 7000, V6_B, 9000, b"\x00" * 300)]
    frames = tcp[:4] + nxdomain + tcp[4:8] + found + ping + tcp[8:] + v6
    return Traffic(
        frames=tuple(frames),
        conversations={
            ("tcp", f"{c}:40000", f"{s}:443"): tuple(tcp),
            ("udp", f"{c}:50000", f"{RESOLVER}:53"): tuple(nxdomain),
            ("udp", f"{c}:50001", f"{RESOLVER}:53"): tuple(found),
            ("udp", f"[{V6_A}]:7000", f"[{V6_B}]:9000"): tuple(v6),
        },
    )


def _expected_conversations(traffic: Traffic) -> list[Conversation]:
    listed = [
        Conversation(protocol, a, b, len(frames), sum(map(len, frames)))
        for (protocol, a, b), frames in traffic.conversations.items()
    ]
    return sorted(listed, key=lambda c: -c.bytes)


def _hierarchy(summary: Summary) -> dict[str, tuple[int, int]]:
    """Protocol path -> (frames, bytes). tshark 4.0's hierarchy leaves out the "ethertype" layer that its
    frame.protocols field names; should another tshark list it, both read alike."""
    return {p.protocol.replace(":ethertype", ""): (p.frames, p.bytes) for p in summary.protocols}


def _tshark_children() -> list[str]:
    """tshark processes (running or zombie) that are children of this process."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name, rest = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :].split()
        if int(rest[1]) == os.getpid() and "tshark" in name:
            found.append(f"{name} pid {stat.parent.name} state {rest[0]}")
    return found


@pytest.fixture(autouse=True)
def _no_tshark_left() -> Iterator[None]:
    yield
    assert _tshark_children() == []


@pytest.fixture(scope="module")
def traffic() -> Traffic:
    return _traffic()


@pytest.fixture
def pcap(tmp_path: Path, traffic: Traffic) -> Path:
    return _write_pcap(tmp_path / "capture.pcap", traffic.frames)


# --- what a good capture holds -------------------------------------------------------------------------------------


def test_summary_counts_packets_bytes_and_time_span(pcap: Path, traffic: Traffic) -> None:
    summary = summarise(pcap)

    assert summary.error == ""
    assert summary.packets == len(traffic.frames)
    assert summary.bytes == sum(map(len, traffic.frames))
    assert summary.first_packet_time == T0
    assert summary.last_packet_time == T0 + (len(traffic.frames) - 1) * STEP


def test_protocol_hierarchy_counts_frames_per_protocol(pcap: Path, traffic: Traffic) -> None:
    summary = summarise(pcap)
    hierarchy = _hierarchy(summary)
    tcp = traffic.conversations["tcp", f"{CLIENT}:40000", f"{SERVER}:443"]

    assert hierarchy["eth"] == (len(traffic.frames), sum(map(len, traffic.frames)))
    assert hierarchy["eth:ip:tcp"] == (len(tcp), sum(map(len, tcp)))
    assert hierarchy["eth:ip:udp:dns"][0] == 4
    assert hierarchy["eth:ip:icmp"][0] == 2
    assert hierarchy["eth:ipv6:udp"][0] == 1
    # Depth first: every protocol comes after the one it is carried in.
    seen: set[str] = set()
    for protocol in summary.protocols:
        parent = protocol.protocol.rpartition(":")[0]
        assert not parent or parent in seen, f"{protocol.protocol} listed before {parent}"
        seen.add(protocol.protocol)


def test_conversations_are_exact_and_busiest_first(pcap: Path, traffic: Traffic) -> None:
    summary = summarise(pcap)

    # The TCP connection carries > 10 kB, which tshark 4.0 prints rounded ("17 kB"): the summary has it exact.
    assert list(summary.conversations) == _expected_conversations(traffic)
    assert summarise(pcap, top=2).conversations == summary.conversations[:2]
    assert summarise(pcap, top=0).conversations == ()


def test_resets_retransmissions_and_dns_errors_are_counted(pcap: Path) -> None:
    summary = summarise(pcap)

    assert summary.tcp_resets == 1
    assert summary.tcp_retransmissions == 1
    assert summary.dns_errors == 1  # the NXDOMAIN; the good answer is not an error


def test_chunked_tshark_runs_add_up_to_one(pcap: Path) -> None:
    """Small chunks on two tsharks give the same summary as one tshark: conversations split by a chunk border are
    joined again and stay exact. Application protocols may be told apart differently after a border (the module
    docstring says why), so the hierarchy is compared down to the transport layer."""

    def transport_and_below(summary: Summary) -> Summary:
        kept = tuple(p for p in summary.protocols if p.protocol.replace(":ethertype", "").count(":") < 3)
        return replace(summary, protocols=kept)

    chunked = summarise(pcap, chunk_packets=7, workers=2)  # the retransmission lands in its original's chunk
    whole = summarise(pcap)

    assert transport_and_below(chunked) == transport_and_below(whole)
    assert chunked.conversations == whole.conversations


def test_retransmission_of_a_segment_sent_in_the_previous_chunk_is_not_seen(pcap: Path) -> None:
    """The documented cost of chunks: tshark's TCP analysis starts afresh at a border."""
    assert summarise(pcap, chunk_packets=5).tcp_retransmissions == 0


def test_big_endian_nanosecond_pcap_reads_the_same(tmp_path: Path, pcap: Path, traffic: Traffic) -> None:
    other = _write_pcap(tmp_path / "be-ns.pcap", traffic.frames, order=">", nanoseconds=True)

    assert summarise(other) == summarise(pcap)


def test_megabyte_download_caught_mid_stream(tmp_path: Path) -> None:
    """8,000 segments of an HTTP body whose headers were never captured: tshark prints the conversation as "11 MB",
    the summary says 11,632,000 bytes (and tshark does not try to reassemble the body: that took 36 s)."""
    frames = [_tcp(SERVER, 80, CLIENT, 41000, 1 + i * 1400, 1, ACK, b"\x5a" * 1400) for i in range(8000)]
    summary = summarise(_write_pcap(tmp_path / "bulk.pcap", frames))

    assert summary.error == ""
    assert summary.conversations == (
        Conversation("tcp", f"{SERVER}:80", f"{CLIENT}:41000", len(frames), sum(map(len, frames))),
    )


def test_conversation_sizes_that_cannot_be_recovered_are_tshark_rounded_down(tmp_path: Path) -> None:
    """Three UDP endpoints all talking to each other (a cycle): no endpoint belongs to one conversation only, so
    exact sizes cannot be told apart and the summary keeps tshark's rounded-down figures."""
    peers = ["10.9.0.1", "10.9.0.2", "10.9.0.3"]
    sent = {
        f"{peer}:4000": [_udp(peer, 4000, peers[(i + 1) % 3], 4000, b"\x11" * (1000 + 100 * i))] * 15
        for i, peer in enumerate(peers)
    }
    summary = summarise(_write_pcap(tmp_path / "mesh.pcap", [f for frames in sent.values() for f in frames]))

    assert len(summary.conversations) == 3
    for conv in summary.conversations:
        exact = sum(map(len, sent[conv.endpoint_a]))  # each conversation is one peer sending to the next
        assert conv.frames == 15
        assert exact - 1000 < conv.bytes <= exact
        assert conv.bytes % 1000 == 0


def test_personal_wireshark_profile_neither_changes_nor_receives_anything(
    pcap: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whoever runs the agent may have a Wireshark profile that disables DNS and TCP analysis; the summary does
    not see it, and nothing is written to their home."""
    home = tmp_path / "home"
    profile = home / ".config" / "wireshark"
    profile.mkdir(parents=True)
    (profile / "disabled_protos").write_text("dns\n")
    (profile / "preferences").write_text("tcp.analyze_sequence_numbers: FALSE\n")
    before = sorted(home.rglob("*"))
    expected = summarise(pcap)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("WIRESHARK_CONFIG_DIR", str(profile))

    summary = summarise(pcap)

    assert summary == expected
    assert summary.dns_errors == 1
    assert summary.tcp_retransmissions == 1
    assert sorted(home.rglob("*")) == before


def test_summary_survives_json(pcap: Path) -> None:
    summary = summarise(pcap)

    assert Summary.from_json(summary.to_json()) == summary
    assert Summary.from_json('{"packets": 3, "from_a_newer_agent": true}') == Summary(packets=3)
    with pytest.raises(ValueError, match="not a summary"):
        Summary.from_json('{"protocols": [{"frames": 1}]}')
    with pytest.raises(ValueError):
        Summary.from_json("[]")


# --- bad files and a slow tshark -----------------------------------------------------------------------------------


def test_pcap_without_packets(tmp_path: Path) -> None:
    summary = summarise(_write_pcap(tmp_path / "empty.pcap", []))

    assert summary == Summary(error="the pcap holds no packets")


def test_empty_file(tmp_path: Path) -> None:
    empty = tmp_path / "zero.pcap"
    empty.touch()

    assert summarise(empty) == Summary(error="the file is empty: not even a pcap header")


def test_pcap_cut_short_is_summarised_up_to_the_cut(tmp_path: Path, pcap: Path, traffic: Traffic) -> None:
    """tcpdump killed mid-write leaves half a record at the end: what precedes it is summarised, and said so."""
    whole = pcap.read_bytes()
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(whole[: len(whole) - 150])  # the last frame is 362 bytes long
    complete = traffic.frames[:-1]
    expected = summarise(_write_pcap(tmp_path / "complete.pcap", complete))

    summary = summarise(cut)

    offset = len(whole) - 16 - len(traffic.frames[-1])
    assert summary.error == (
        f"the pcap was cut short in the middle of a packet at byte {offset}; "
        f"the summary covers the {len(complete)} complete packets before it"
    )
    assert replace(summary, error="") == expected
    assert summary.packets == len(complete)
    assert summary.tcp_resets == 1


def test_corrupt_record_stops_the_summary_there(tmp_path: Path, traffic: Traffic) -> None:
    pcap = _write_pcap(tmp_path / "corrupt.pcap", traffic.frames[:3])
    with pcap.open("ab") as out:
        out.write(struct.pack("<IIII", 1, 0, 50_000_000, 50_000_000) + b"\0" * 64)

    summary = summarise(pcap)

    assert summary.packets == 3
    assert summary.error.startswith("the pcap is corrupt at byte ")
    assert _hierarchy(summary)["eth:ip:tcp"][0] == 3


@pytest.mark.parametrize(
    ("content", "error"),
    [
        (b"GET / HTTP/1.1\r\nHost: not-a-pcap\r\n\r\n", "not a pcap file (it starts with 47455420)"),
        (
            bytes.fromhex("0a0d0d0a") + b"\0" * 60,
            "the file is pcapng; only classic pcap (tcpdump -w) is summarised",
        ),
        (bytes.fromhex("d4c3b2a1020004"), "the pcap was cut short inside its 24-byte header (7 bytes)"),
    ],
    ids=["text", "pcapng", "half-header"],
)
def test_file_that_is_not_a_pcap(tmp_path: Path, content: bytes, error: str) -> None:
    path = tmp_path / "capture.pcap"
    path.write_bytes(content)

    assert summarise(path) == Summary(error=error)


def test_link_type_tshark_does_not_know(tmp_path: Path, traffic: Traffic) -> None:
    pcap = _write_pcap(tmp_path / "odd.pcap", traffic.frames)
    with pcap.open("r+b") as out:
        out.seek(20)
        out.write(struct.pack("<I", 65000))

    summary = summarise(pcap)

    assert summary.packets == len(traffic.frames)
    assert summary.protocols == ()
    assert summary.error.startswith("tshark failed (exit 2): ")
    assert "network type 65000 unknown" in summary.error


def test_tshark_past_the_timeout_is_killed(pcap: Path, traffic: Traffic) -> None:
    summary = summarise(pcap, timeout=0.05, chunk_packets=5)

    assert summary.error == (
        "tshark did not finish within 0.05 s and was stopped; only packet counts and times are given"
    )
    assert summary.packets == len(traffic.frames)
    assert summary.first_packet_time == T0
    assert summary.protocols == ()
    assert summary.conversations == ()
    # the autouse fixture checks that no tshark is left running or unreaped


def test_cancel_stops_every_tshark(pcap: Path, traffic: Traffic) -> None:
    """The agent cancels a summary from its event loop (capture deleted, agent stopping): the thread returns the
    counts from the record headers and no tshark is left running."""
    cancel = threading.Event()
    result: list[Summary] = []
    worker = threading.Thread(
        target=lambda: result.append(summarise(pcap, chunk_packets=1, workers=1, cancel=cancel))
    )
    worker.start()
    deadline = time.monotonic() + 10
    while not _tshark_children() and time.monotonic() < deadline:  # one tshark per packet: seconds of work
        time.sleep(0.01)
    assert _tshark_children(), "no tshark started"

    cancel.set()
    worker.join(timeout=10)

    assert not worker.is_alive()
    assert result == [
        Summary(
            packets=len(traffic.frames),
            bytes=sum(map(len, traffic.frames)),
            first_packet_time=T0,
            last_packet_time=T0 + (len(traffic.frames) - 1) * STEP,
            error="the summary was cancelled; only packet counts and times are given",
        )
    ]


def test_tshark_as_the_unprivileged_user_summarises_the_same(pcap: Path, traffic: Traffic) -> None:
    """The pcap reaches tshark on stdin: its user needs no access to the spool (here: root's private tmp_path)."""
    assert oct(pcap.parent.stat().st_mode & 0o777) == oct(0o700)
    summary = summarise(pcap, user="tcpdump", chunk_packets=7, workers=2)
    assert summary == summarise(pcap, chunk_packets=7, workers=2)
    assert summary.error == "" and summary.protocols and summary.packets == len(traffic.frames)


@pytest.mark.parametrize("user", ["tcpdump", ""])
def test_every_tshark_runs_as_the_user_without_any_capability(pcap: Path, user: str) -> None:
    """setpriv starts each tshark as `user` (root's uid when there is none) with no capability in any set and
    no_new_privs; sampled from /proc while tshark runs, one per packet."""
    account = pwd.getpwnam(user or "root")
    uid, gid = account.pw_uid, account.pw_gid
    cancel = threading.Event()
    options = {"chunk_packets": 1, "workers": 1, "cancel": cancel, "user": user}
    worker = threading.Thread(target=summarise, args=(pcap,), kwargs=options)
    worker.start()
    seen: dict[str, dict[str, str]] = {}  # pid -> its /proc status, once it runs tshark
    deadline = time.monotonic() + 20
    try:
        while len(seen) < 3 and time.monotonic() < deadline:
            for path in Path("/proc").glob("[0-9]*/status"):
                with contextlib.suppress(OSError):
                    lines = path.read_text().splitlines()
                    status = {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}
                    if status["Name"] == "tshark" and status["PPid"] == str(os.getpid()):
                        seen[path.parent.name] = status
            time.sleep(0.002)
    finally:
        cancel.set()
        worker.join(timeout=10)
    assert len(seen) >= 3, seen
    for status in seen.values():
        assert set(status["Uid"].split()) == {str(uid)} and set(status["Gid"].split()) == {str(gid)}, status
        if user:
            assert status["Groups"] == ""
        for kind in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(status[kind], 16) == 0, (kind, status)
        assert status["NoNewPrivs"] == "1"


def test_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        summarise(tmp_path / "gone.pcap")
