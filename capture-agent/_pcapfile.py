"""Counting the packets in a classic pcap file without tshark, for spool files whose statistics were lost.

tcpdump prints how many packets it captured only when it exits cleanly. An agent that was killed mid-capture
finds the spool file at its next start with no statistics; walking the record headers gives the number of
packets the file really holds, which is what the user can open in Wireshark anyway. Only the 16-byte record
headers matter, so the file is read in bounded blocks and the packet data is skipped.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

__all__ = ["count_pcap_packets"]

_GLOBAL_HEADER = 24
_RECORD_HEADER = 16
_MAGICS = (0xA1B2C3D4, 0xA1B23C4D)  # microsecond and nanosecond timestamps; the record layout is the same
_PCAPNG_MAGIC = 0x0A0D0D0A
# libpcap's largest snapshot length; a record claiming more than this (and than the file's own snaplen) is
# garbage, not a packet, and counting on from it would report nonsense.
_MAX_SNAPLEN = 262144
_BLOCK = 256 * 1024


def count_pcap_packets(path: Path) -> int:
    """The number of complete packet records in the classic pcap file ``path``.

    Either byte order and both timestamp precisions are read. A last record cut short (tcpdump killed
    mid-write, or a file still growing) is not counted, and a file shorter than its global header holds no
    packets. A file that is not a classic pcap, or whose records make no sense, raises ValueError.
    """
    with path.open("rb", buffering=0) as source:
        size = os.fstat(source.fileno()).st_size
        header = source.read(_GLOBAL_HEADER)
        record, snaplen = _parse_global_header(path, header)
        if record is None:
            return 0
        limit = max(snaplen, _MAX_SNAPLEN)
        count = 0
        offset = _GLOBAL_HEADER  # of the next record header, in the file
        block_start, block = offset, b""
        while offset + _RECORD_HEADER <= size:
            at = offset - block_start
            if at + _RECORD_HEADER > len(block):
                # Only headers are read from a block; a header past its end starts the next block there.
                source.seek(offset)
                block_start, block, at = offset, source.read(_BLOCK), 0
                if len(block) < _RECORD_HEADER:
                    break  # the file shrank since we sized it
            captured_length = record.unpack_from(block, at)[2]
            if captured_length > limit:
                raise ValueError(
                    f"{path} is corrupt: the record at byte {offset} claims {captured_length} bytes of packet"
                )
            end = offset + _RECORD_HEADER + captured_length
            if end > size:
                break  # a truncated last record
            count += 1
            offset = end
        return count


def _parse_global_header(path: Path, header: bytes) -> tuple[struct.Struct | None, int]:
    """The record header layout (None if the header itself is incomplete) and the file's snaplen."""
    if len(header) >= 4:
        for order in ("<", ">"):
            (magic,) = struct.unpack_from(order + "I", header)
            if magic in _MAGICS:
                if len(header) < _GLOBAL_HEADER:
                    return None, 0
                (snaplen,) = struct.unpack_from(order + "I", header, 16)
                return struct.Struct(order + "IIII"), snaplen
        if struct.unpack_from("<I", header)[0] == _PCAPNG_MAGIC:
            raise ValueError(f"{path} is a pcapng file; only classic pcap (tcpdump -w) is supported")
        raise ValueError(f"{path} is not a pcap file (magic {header[:4].hex()})")
    return None, 0
