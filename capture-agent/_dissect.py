"""The pyshark side of the exchanges pass: run as a script by `_exchanges`, in a child process, never imported.

It reads one chunk of a classic pcap on stdin, has pyshark run tshark over it with a display filter that keeps
only the packets a verdict needs, and prints one JSON array a line per packet kept:
``["tcp", time, src, dst, flags, retransmission]`` or
``["dns", time, src, dst, id, response, name, type, rcode]`` (addresses as "ip:port", "[ip6]:port"; time in
seconds since the epoch as tshark printed it; flags tshark's TCP flags number).

Why a child process: pyshark's sync API runs its own asyncio loop, which cannot run inside the agent's; and the
child is started under setpriv as the unprivileged tcpdump user without any capability, so the tshark pyshark
starts (which parses whatever the pods sent) inherits exactly that, with the child's minimal environment, its
private empty home and working directory, and its low priority. Why a script: it imports only the standard
library and pyshark (``python -I``: no environment variables, user site or script directory on sys.path), so
nothing of the agent is loaded as that user.

Why tshark's path is checked: pyshark 0.6 looks the binary up in ``get_process_path``, which first reads a
config.ini from the *current directory* (`pyshark.config.get_config`) and then tries ``dirname(tshark_path)`` +
"tshark". The agent starts this script in a directory it made empty, and this script refuses to run unless
pyshark resolves exactly the path it was given.
"""

import json
import sys

from pyshark.capture.pipe_capture import PipeCapture
from pyshark.tshark.tshark import get_process_path

# SYNs and SYN+ACKs, resets, retransmissions and DNS; and, to tell that a handshake completed, the first segment
# each way of a stream that shows no SYN (tshark numbers it seq 1 / ack 1, also at a chunk border where the SYN
# fell into the previous chunk): the client's ACK of the SYN+ACK or its first data.
DISPLAY_FILTER = (
    "tcp.flags.syn == 1 || tcp.flags.reset == 1 || tcp.analysis.retransmission || dns"
    " || (tcp.flags.syn == 0 && tcp.seq == 1 && tcp.ack == 1)"
)
# Only these layers are printed: the rest of each packet's JSON would be parsed for nothing.
_LAYERS = "frame ip ipv6 tcp udp dns"


def _fields(tree: object, into: dict[str, object]) -> dict[str, object]:
    """Every "proto.field" of pyshark's JSON layer dictionary, subtrees flattened, the first value of each kept."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            if isinstance(value, (dict, list)):
                _fields(value, into)
                if isinstance(value, list) and value and not isinstance(value[0], (dict, list)):
                    into.setdefault(key, value[0])
            else:
                into.setdefault(key, value)
    elif isinstance(tree, list):
        for item in tree:
            _fields(item, into)
    return into


def _event(packet: object) -> list[object] | None:
    fields: dict[str, object] = {}
    for layer in getattr(packet, "layers", ()):
        _fields(layer._all_fields, fields)  # the layer's JSON as tshark printed it (pyshark keeps it as is)
    src = fields.get("ip.src") or fields.get("ipv6.src")
    dst = fields.get("ip.dst") or fields.get("ipv6.dst")
    if not src or not dst:
        return None
    transport = "tcp" if "tcp.srcport" in fields else "udp"
    sport, dport = fields.get(f"{transport}.srcport"), fields.get(f"{transport}.dstport")

    def end(address: object, port: object) -> str:
        return f"[{address}]:{port}" if ":" in str(address) else f"{address}:{port}"

    time = str(packet.sniff_timestamp)  # type: ignore[attr-defined]
    if "dns.id" in fields:
        return [
            "dns",
            time,
            end(src, sport),
            end(dst, dport),
            int(str(fields["dns.id"]), 0),
            fields.get("dns.flags.response") == "1",
            str(fields.get("dns.qry.name", "")),
            int(str(fields.get("dns.qry.type", "0"))),
            int(str(fields.get("dns.flags.rcode", "0"))),
        ]
    if transport != "tcp":
        return None
    return [
        "tcp",
        time,
        end(src, sport),
        end(dst, dport),
        int(str(fields["tcp.flags"]), 16),
        "tcp.analysis.retransmission" in fields,
    ]


def main(tshark: str) -> int:
    found = get_process_path(tshark)
    if found != tshark:
        print(f"pyshark would run {found!r}, not the tshark given ({tshark!r})", file=sys.stderr)
        return 2
    # pyshark makes the main thread's event loop and gives it a SafeChildWatcher: with the default threaded
    # watcher tshark's exit status is sometimes lost ("Unknown child process"), which pyshark takes for a crash.
    capture = PipeCapture(
        0,  # stdin: the chunk the agent feeds
        display_filter=DISPLAY_FILTER,
        use_json=True,
        tshark_path=tshark,
        custom_parameters=["-J", _LAYERS],
        # What retransmissions need, whatever a global preference says; no reassembly (see `_summary`).
        override_prefs={"tcp.analyze_sequence_numbers": "TRUE", "tcp.desegment_tcp_streams": "FALSE"},
    )
    out = sys.stdout
    try:
        for packet in capture:
            event = _event(packet)
            if event is not None:
                out.write(json.dumps(event, separators=(",", ":")) + "\n")
    finally:
        # Not capture.close(): PipeCapture's closes the pipe (stdin) as well, which fails if asyncio already did.
        capture.eventloop.run_until_complete(capture.close_async())
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
