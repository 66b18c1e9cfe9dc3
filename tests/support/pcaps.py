"""Reading what a pcap holds, the way an engineer checks it: tshark's fields, one tuple per packet."""

from __future__ import annotations

import subprocess
from pathlib import Path


def tshark_fields(pcap: Path, *fields: str) -> list[tuple[str, ...]]:
    """`tshark -r PCAP -T fields -e FIELD ...`: one tuple of field values per packet (empty when absent)."""
    args = [arg for field in fields for arg in ("-e", field)]
    out = subprocess.run(
        ["tshark", "-r", str(pcap), "-T", "fields", "-E", "separator=\t", *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return [tuple(line.split("\t")) for line in out.splitlines()]


def http_uris(pcap: Path) -> list[str]:
    """The URIs of the HTTP requests in the pcap, in order."""
    return [uri for (uri,) in tshark_fields(pcap, "http.request.uri") if uri]
