"""Merge the classic pcaps of a multi-pod capture into one pcapng whose interfaces name the pods.

Each target of a label-selector capture is its own tcpdump, so the CLI downloads one classic pcap per pod.
Support staff want one file in Wireshark that still says which pod every packet came from. pcapng does that
with one Interface Description Block per pod (`if_name` = `namespace/pod@node`), but mergecap cannot name
interfaces (Wireshark 4.0's mergecap and editcap have no option that sets `if_name` or `if_description`;
merging classic pcaps gives unnamed interfaces). So we write the pcapng ourselves: a Section Header Block,
one IDB per input (also for an input without packets, so the interface list shows every pod), then Enhanced
Packet Blocks merged by timestamp.

Memory stays bounded whatever the capture size: every input is read as a stream and `heapq.merge` keeps one
pending packet per input. Equal timestamps keep input order (and file order within an input), so a merge is
reproducible. A truncated last record (a tcpdump killed mid-write, a short download) is dropped and reported
rather than failing the merge; a file that is not a classic pcap at all raises `PcapFormatError`.

One conversation between two captured pods crosses both pods' devices, so each of its packets is in the merge
twice, once per interface. Wireshark's TCP analysis, which ignores interfaces, then marks every second copy a
retransmission or a duplicate ACK. The merge says so in the file's comment (Statistics > Capture File
Properties), with the number of such packets, and `one_copy` keeps only the first copy of each: a packet is the
same packet on another pod when its IP header and payload match with the fields routing changes (TTL or hop
limit, header checksum) left out and the Ethernet header ignored, within one second.

Not supported: the "modified" (Kuznetzov) pcap magic, which tcpdump never writes, and pcapng inputs.
"""

from __future__ import annotations

import hashlib
import heapq
import os
import struct
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

__all__ = ["MergeResult", "PcapFormatError", "merge_pcaps"]

# Classic pcap magic numbers, read as little-endian: the value tells byte order and timestamp resolution.
_MAGICS = {
    0xA1B2C3D4: ("<", 6),
    0xD4C3B2A1: (">", 6),
    0xA1B23C4D: ("<", 9),
    0x4D3CB2A1: (">", 9),
}
_FILE_HEADER = 24
_RECORD_HEADER = 16
# Wireshark's own limit for ordinary link types; a record longer than this and the snaplen is a corrupt
# length, and reading it would allocate whatever the corrupt field claims.
_MAX_PACKET = 262_144
_MAX_SNAPLEN = 1 << 26
_READ_BUFFER = 1 << 16
# Link types whose packets are compared across pods: Ethernet (its 14-byte header skipped), raw IP, IPv4, IPv6.
_IP_OFFSET = {1: 14, 101: 0, 228: 0, 229: 0}
_SAME_PACKET_WINDOW_NS = 10**9

# pcapng block types and option codes (draft-ietf-opsawg-pcapng).
_SHB, _IDB, _EPB = 0x0A0D0D0A, 0x00000001, 0x00000006
_BYTE_ORDER_MAGIC = 0x1A2B3C4D
_OPT_END, _OPT_COMMENT, _SHB_USERAPPL = 0, 1, 4
_IF_NAME, _IF_DESCRIPTION, _IF_TSRESOL, _IF_FCSLEN = 2, 3, 9, 13


class PcapFormatError(ValueError):
    """An input is not a classic pcap file (too short for a header, or an unknown magic number)."""


@dataclass(frozen=True)
class MergeResult:
    """What went into the merged file; `packets` and `notes` follow the order of the inputs. `copies` counts the
    packets that were also captured on another pod (dropped with `one_copy`, else in the file once per pod)."""

    packets: tuple[int, ...]
    notes: tuple[str, ...]
    copies: int = 0

    @property
    def total(self) -> int:
        return sum(self.packets)


@dataclass(frozen=True)
class _Header:
    endian: str
    resolution: int  # decimal digits of the timestamp fraction: 6 (µs) or 9 (ns)
    snaplen: int
    linktype: int
    fcs_len: int | None  # FCS bytes at the end of each frame, when the file says so


def _read_header(path: Path, stream: BinaryIO) -> _Header:
    raw = stream.read(_FILE_HEADER)
    if len(raw) < _FILE_HEADER:
        raise PcapFormatError(f"{path}: {len(raw)} bytes, too short for a pcap header")
    (magic,) = struct.unpack_from("<I", raw)
    if magic not in _MAGICS:
        raise PcapFormatError(f"{path}: not a classic pcap file (magic {magic:#010x})")
    endian, resolution = _MAGICS[magic]
    snaplen, network = struct.unpack_from(endian + "II", raw, 16)
    # The link-type field carries FCS information in its upper bits (bit 26 says whether bits 28-31 hold
    # the FCS length in 16-bit units); pcapng moves it to the if_fcslen option.
    fcs_len = (network >> 28) * 2 if network & (1 << 26) else None
    return _Header(endian, resolution, snaplen, network & 0xFFFF, fcs_len)


def _option(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + value + b"\0" * (-len(value) % 4)


def _block(block_type: int, body: bytes) -> bytes:
    length = 12 + len(body)
    return struct.pack("<II", block_type, length) + body + struct.pack("<I", length)


def _section_header(comment: str) -> bytes:
    options = (
        _option(_SHB_USERAPPL, b"podcap") + _option(_OPT_COMMENT, comment.encode()) + _option(_OPT_END, b"")
    )
    # Section length -1: unknown, which is what a streaming writer must say.
    return _block(_SHB, struct.pack("<IHHq", _BYTE_ORDER_MAGIC, 1, 0, -1) + options)


def _comment(names: Sequence[str], one_copy: bool) -> str:
    pods = ", ".join(names)
    if one_copy:
        return (
            f"podcap merged the captures of {len(names)} pods ({pods}) by time. A packet captured on several of "
            "them is here once, on the interface of the pod where it was seen first."
        )
    return (
        f"podcap merged the captures of {len(names)} pods ({pods}) by time; each packet's interface names its pod. "
        "A packet that crossed two of these pods is here once per pod, and Wireshark's TCP analysis marks the "
        "later copy a retransmission or duplicate ACK: it is not one. Filter on one pod "
        '(frame.interface_name == "ns/pod@node"), or merge with `podcap download --merge --one-copy`.'
    )


class _SameOnAnotherPod:
    """Recognises a packet already written from another input within the window: the same IP packet, whatever
    routing changed on the way (TTL or hop limit, the IPv4 header checksum, the Ethernet header)."""

    def __init__(self) -> None:
        self._seen: dict[bytes, int] = {}  # key -> input that wrote it
        self._order: deque[tuple[int, bytes]] = deque()  # (timestamp, key), oldest first

    def __call__(self, stamp: int, index: int, linktype: int, data: bytes) -> bool:
        while self._order and self._order[0][0] < stamp - _SAME_PACKET_WINDOW_NS:
            _, old = self._order.popleft()
            self._seen.pop(old, None)
        key = _ip_key(data, linktype)
        if key is None:
            return False
        first = self._seen.get(key)
        if first is not None and first != index:
            return True
        if first is None:
            self._seen[key] = index
            self._order.append((stamp, key))
        return False


def _ip_key(data: bytes, linktype: int) -> bytes | None:
    offset = _IP_OFFSET.get(linktype)
    if offset is None or len(data) < offset + 20:
        return None
    if linktype == 1 and data[12:14] not in (b"\x08\x00", b"\x86\xdd"):
        return None
    packet = data[offset:]
    version = packet[0] >> 4
    if version == 4:
        masked = packet[:8] + packet[9:10] + packet[12:]  # without TTL (8) and header checksum (10-11)
    elif version == 6 and len(packet) >= 40:
        masked = packet[:7] + packet[8:]  # without the hop limit (7)
    else:
        return None
    return hashlib.blake2b(masked, digest_size=16).digest()


def _description(name: str) -> str:
    target, at, node = name.rpartition("@")
    return f"podcap capture of {target} on {node}" if at else f"podcap capture of {name}"


def _interface(name: str, header: _Header) -> bytes:
    options = [
        _option(_IF_NAME, name.encode()),
        _option(_IF_DESCRIPTION, _description(name).encode()),
        _option(_IF_TSRESOL, bytes([header.resolution])),
    ]
    if header.fcs_len is not None:
        options.append(_option(_IF_FCSLEN, bytes([header.fcs_len])))
    options.append(_option(_OPT_END, b""))
    return _block(_IDB, struct.pack("<HHI", header.linktype, 0, header.snaplen) + b"".join(options))


def _packets(
    index: int, name: str, header: _Header, stream: BinaryIO, notes: list[str]
) -> Iterator[tuple[int, int, bytes, bytes]]:
    """Yield (timestamp in ns, input index, finished EPB, packet bytes) for each whole record of one input.

    The index is the tie-breaker heapq.merge compares after the timestamp, so equal timestamps keep input
    order and the block bytes are never compared.
    """
    record = struct.Struct(header.endian + "IIII")
    scale = 1000 if header.resolution == 6 else 1
    units = 10**header.resolution
    limit = min(max(header.snaplen, _MAX_PACKET), _MAX_SNAPLEN)
    number = 0
    while True:
        raw = stream.read(_RECORD_HEADER)
        if not raw:
            return
        number += 1
        if len(raw) < _RECORD_HEADER:
            notes.append(f"{name}: packet {number} truncated in its record header, dropped")
            return
        seconds, fraction, caplen, length = record.unpack(raw)
        if caplen > limit:
            notes.append(
                f"{name}: packet {number} claims {caplen} bytes (corrupt file), stopped reading there"
            )
            return
        data = stream.read(caplen)
        if len(data) < caplen:
            notes.append(f"{name}: packet {number} truncated ({len(data)} of {caplen} bytes), dropped")
            return
        stamp = seconds * units + fraction
        body = struct.pack("<IIIII", index, stamp >> 32, stamp & 0xFFFFFFFF, caplen, length)
        block = _block(_EPB, body + data + b"\0" * (-caplen % 4))
        yield (seconds * 10**9 + fraction * scale, index, block, data)


def merge_pcaps(inputs: Sequence[tuple[Path, str]], output: Path, *, one_copy: bool = False) -> MergeResult:
    """Write one pcapng at `output` from (classic pcap, interface name) pairs, packets merged by time; with
    `one_copy`, a packet also captured on another pod is written only the first time.

    The file appears at `output` only once it is complete (written next to it, then renamed), so a failed
    merge never leaves something that looks like a whole capture.
    """
    notes: list[list[str]] = [[] for _ in inputs]  # per input, so the notes follow input order
    counts = [0] * len(inputs)
    copies = 0
    same = _SameOnAnotherPod()
    partial = output.with_name(output.name + ".partial")
    try:
        with ExitStack() as stack, open(partial, "wb") as out:
            out.write(_section_header(_comment([name for _, name in inputs], one_copy)))
            streams, linktypes = [], []
            for index, (path, name) in enumerate(inputs):
                stream = stack.enter_context(open(path, "rb", buffering=_READ_BUFFER))
                header = _read_header(path, stream)
                out.write(_interface(name, header))
                streams.append(_packets(index, name, header, stream, notes[index]))
                linktypes.append(header.linktype)
            for stamp, index, block, data in heapq.merge(*streams):
                if same(stamp, index, linktypes[index], data):
                    copies += 1
                    if one_copy:
                        continue
                out.write(block)
                counts[index] += 1
        os.replace(partial, output)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return MergeResult(
        packets=tuple(counts), notes=tuple(note for found in notes for note in found), copies=copies
    )
