"""The merged pcapng of a multi-pod capture, read back by the real tshark and capinfos.

The inputs are classic pcaps written here byte by byte, in the variants tcpdump and libpcap produce: µs and ns
magic, little- and big-endian, Ethernet and raw-IP link types, a header-only file, a file cut short.
"""

from __future__ import annotations

import re
import struct
import subprocess
from decimal import Decimal
from pathlib import Path

import pytest

from podcap.cli._pcapng import PcapFormatError, merge_pcaps

MICRO, NANO = 0xA1B2C3D4, 0xA1B23C4D
ETHERNET, RAW_IP = 1, 101


def _udp(source_port: int, payload: bytes) -> bytes:
    """An IPv4/UDP packet 10.0.0.1:source_port -> 10.0.0.2:53 (checksums left zero: tshark does not check)."""
    udp = struct.pack("!HHHH", source_port, 53, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, b"\n\0\0\1", b"\n\0\0\2")
    return ip + udp


def _frame(source_port: int, payload: bytes = b"x") -> bytes:
    return b"\x02\0\0\0\0\2" + b"\x02\0\0\0\0\1" + b"\x08\x00" + _udp(source_port, payload)


def _pcap(
    path: Path,
    records: list[tuple[int, int, bytes]],
    *,
    magic: int = MICRO,
    endian: str = "<",
    linktype: int = ETHERNET,
    snaplen: int = 262144,
) -> Path:
    """Write a classic pcap: records are (seconds, fraction in the magic's unit, packet bytes)."""
    data = struct.pack(endian + "IHHiIII", magic, 2, 4, 0, 0, snaplen, linktype)
    for seconds, fraction, packet in records:
        data += struct.pack(endian + "IIII", seconds, fraction, len(packet), len(packet)) + packet
    path.write_bytes(data)
    return path


def _tshark(path: Path, *fields: str) -> list[list[str]]:
    args = [arg for field in fields for arg in ("-e", field)]
    done = subprocess.run(
        ["tshark", "-n", "-r", str(path), "-T", "fields", *args], capture_output=True, text=True, check=True
    )
    return [line.split("\t") for line in done.stdout.splitlines()]


def _interfaces(path: Path) -> list[tuple[str, str, str, int]]:
    """(name, encapsulation, time precision, packets) of every IDB, as capinfos -I reports them."""
    done = subprocess.run(["capinfos", "-I", str(path)], capture_output=True, text=True, check=True)
    found = re.findall(
        r"Name = (.*)\n.*\n\s+Encapsulation = (.*)\n(?:.*\n)*?\s+Time precision = (\w+).*\n"
        r"(?:.*\n)*?\s+Number of packets = (\d+)",
        done.stdout,
    )
    return [
        (name, encapsulation, precision, int(packets)) for name, encapsulation, precision, packets in found
    ]


def test_packets_from_every_pod_merged_by_time_on_named_interfaces(tmp_path: Path) -> None:
    little_micro = _pcap(
        tmp_path / "a.pcap",
        [(1000, 1, _frame(1001)), (1000, 3, _frame(1002, b"yy")), (1001, 0, _frame(1003, b"zzz"))],
    )
    little_nano = _pcap(
        tmp_path / "b.pcap",
        # 1000.000003000 equals a.pcap's second packet: input order breaks the tie.
        [(1000, 2_000, _frame(2001)), (1000, 3_000, _frame(2002)), (1000, 999_999_999, _frame(2003))],
        magic=NANO,
    )
    big_micro = _pcap(
        tmp_path / "c.pcap", [(999, 999_999, _frame(3001)), (1000, 4, _frame(3002))], endian=">", snaplen=96
    )
    empty = _pcap(tmp_path / "d.pcap", [])
    raw_ip = _pcap(tmp_path / "e.pcap", [(1000, 5, _udp(5001, b"q"))], linktype=RAW_IP)
    names = [
        "shop/checkout-7d9f@node-1",
        "shop/checkout-8a1b@node-2",
        "shop/cart-1@node-1",
        "shop/idle-0@node-3",
        "shop/raw-2@node-2",
    ]
    merged = tmp_path / "merged.pcapng"

    result = merge_pcaps(
        list(zip([little_micro, little_nano, big_micro, empty, raw_ip], names, strict=True)), merged
    )

    assert result.packets == (3, 3, 2, 0, 1)
    assert result.total == 9
    assert result.notes == ()
    rows = _tshark(merged, "frame.interface_name", "frame.time_epoch", "udp.srcport", "frame.len")
    assert [(name, Decimal(stamp), int(port)) for name, stamp, port, _ in rows] == [
        (names[2], Decimal("999.999999"), 3001),
        (names[0], Decimal("1000.000001"), 1001),
        (names[1], Decimal("1000.000002"), 2001),
        (names[0], Decimal("1000.000003"), 1002),
        (names[1], Decimal("1000.000003"), 2002),
        (names[2], Decimal("1000.000004"), 3002),
        (names[4], Decimal("1000.000005"), 5001),
        (names[1], Decimal("1000.999999999"), 2003),
        (names[0], Decimal("1001"), 1003),
    ]
    # Odd frame lengths come back whole: the padding of each block is right.
    assert [int(row[3]) for row in rows] == [43, 43, 43, 44, 43, 43, 29, 43, 45]
    assert _interfaces(merged) == [
        (names[0], "Ethernet (1 - ether)", "microseconds", 3),
        (names[1], "Ethernet (1 - ether)", "nanoseconds", 3),
        (names[2], "Ethernet (1 - ether)", "microseconds", 2),
        (names[3], "Ethernet (1 - ether)", "microseconds", 0),
        (names[4], "Raw IP (7 - rawip)", "microseconds", 1),
    ]
    descriptions = {row[0] for row in _tshark(merged, "frame.interface_description")}
    assert "podcap capture of shop/checkout-7d9f on node-1" in descriptions


def test_a_truncated_last_record_is_dropped_and_reported(tmp_path: Path) -> None:
    whole = _pcap(tmp_path / "whole.pcap", [(10, 1, _frame(1001)), (10, 4, _frame(1002))])
    cut_in_data = _pcap(tmp_path / "data.pcap", [(10, 2, _frame(2001)), (10, 3, _frame(2002))])
    cut_in_data.write_bytes(cut_in_data.read_bytes()[:-5])
    cut_in_header = _pcap(tmp_path / "header.pcap", [(10, 0, _frame(3001)), (10, 5, _frame(3002))])
    cut_in_header.write_bytes(cut_in_header.read_bytes()[: 24 + 16 + len(_frame(3001)) + 7])
    merged = tmp_path / "merged.pcapng"

    result = merge_pcaps([(whole, "a/w@n"), (cut_in_data, "a/d@n"), (cut_in_header, "a/h@n")], merged)

    assert result.packets == (2, 1, 1)
    assert result.notes == (
        "a/d@n: packet 2 truncated (38 of 43 bytes), dropped",
        "a/h@n: packet 2 truncated in its record header, dropped",
    )
    rows = _tshark(merged, "frame.interface_name", "udp.srcport")
    assert rows == [["a/h@n", "3001"], ["a/w@n", "1001"], ["a/d@n", "2001"], ["a/w@n", "1002"]]


def test_a_corrupt_record_length_stops_that_input_only(tmp_path: Path) -> None:
    good = _pcap(tmp_path / "good.pcap", [(10, 1, _frame(1001)), (10, 3, _frame(1002))])
    corrupt = _pcap(tmp_path / "corrupt.pcap", [(10, 2, _frame(2001))])
    corrupt.write_bytes(corrupt.read_bytes() + struct.pack("<IIII", 10, 4, 0xFFFFFFF0, 0xFFFFFFF0) + b"junk")
    merged = tmp_path / "merged.pcapng"

    result = merge_pcaps([(good, "a/g@n"), (corrupt, "a/c@n")], merged)

    assert result.packets == (2, 1)
    assert result.notes == ("a/c@n: packet 2 claims 4294967280 bytes (corrupt file), stopped reading there",)
    assert [row[0] for row in _tshark(merged, "udp.srcport")] == ["1001", "2001", "1002"]


@pytest.mark.parametrize("content", [b"", b"\xa1\xb2\xc3", b"\x0a\x0d\x0d\x0a" + bytes(28)])
def test_a_file_that_is_not_a_pcap_is_refused_and_leaves_no_output(tmp_path: Path, content: bytes) -> None:
    good = _pcap(tmp_path / "good.pcap", [(10, 1, _frame(1001))])
    bad = tmp_path / "bad.pcap"
    bad.write_bytes(content)
    merged = tmp_path / "merged.pcapng"

    with pytest.raises(PcapFormatError, match=r"bad\.pcap"):
        merge_pcaps([(good, "a/g@n"), (bad, "a/b@n")], merged)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pcap", "good.pcap"]


def _routed(frame: bytes, ttl: int) -> bytes:
    """The same IPv4 packet after routing: new MACs, a lower TTL and its header checksum changed with it."""
    ip = bytearray(frame[14:])
    ip[8], ip[10:12] = ttl, struct.pack("!H", 0xBEEF - ttl)
    return b"\x02\0\0\0\0\x09" + b"\x02\0\0\0\0\x08" + b"\x08\x00" + bytes(ip)


def _both_ends(tmp_path: Path) -> list[tuple[Path, str]]:
    """Client and server ends of one conversation: each packet seen on both, 50-300 µs apart; one packet seen
    only by the client; one identical packet 2 s later on the server (a new packet, not a copy)."""
    query, answer, lost = _frame(1000, b"query"), _frame(1001, b"answer"), _frame(1002, b"lost")
    client = _pcap(tmp_path / "client.pcap", [(1, 100, query), (1, 900, _routed(answer, 62)), (1, 950, lost)])
    server = _pcap(
        tmp_path / "server.pcap", [(1, 300, _routed(query, 62)), (1, 600, answer), (3, 300, query)]
    )
    return [(client, "shop/client@node-1"), (server, "shop/server@node-2")]


def test_a_merge_of_both_ends_says_which_packets_are_in_it_twice(tmp_path: Path) -> None:
    result = merge_pcaps(_both_ends(tmp_path), tmp_path / "merged.pcapng")
    assert result.packets == (3, 3) and result.copies == 2
    assert [name for (name,) in _tshark(tmp_path / "merged.pcapng", "frame.interface_name")] == [
        "shop/client@node-1",
        "shop/server@node-2",
        "shop/server@node-2",
        "shop/client@node-1",
        "shop/client@node-1",
        "shop/server@node-2",
    ]
    comment = subprocess.run(
        ["capinfos", "-k", str(tmp_path / "merged.pcapng")], capture_output=True, text=True, check=True
    ).stdout
    assert "once per pod" in comment and "retransmission" in comment and "--one-copy" in comment


def test_one_copy_keeps_the_first_sighting_of_each_packet(tmp_path: Path) -> None:
    result = merge_pcaps(_both_ends(tmp_path), tmp_path / "one.pcapng", one_copy=True)
    assert result.packets == (2, 2) and result.copies == 2
    rows = _tshark(tmp_path / "one.pcapng", "frame.interface_name", "udp.srcport", "ip.ttl")
    assert rows == [
        ["shop/client@node-1", "1000", "64"],  # the query, where it was sent
        ["shop/server@node-2", "1001", "64"],  # the answer, where it was sent
        ["shop/client@node-1", "1002", "64"],  # only the client saw it: the server never did
        ["shop/server@node-2", "1000", "64"],  # the same bytes 2 s later: a packet of its own
    ]
    assert (
        "once, on the interface of the pod where it was seen first"
        in subprocess.run(
            ["capinfos", "-k", str(tmp_path / "one.pcapng")], capture_output=True, text=True, check=True
        ).stdout
    )
