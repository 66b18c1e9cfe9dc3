"""The tcpdump command line and its closing statistics: no user text ever becomes an option."""

from __future__ import annotations

from pathlib import Path

import pytest

from podcap.agent._errors import InvalidCaptureRequest
from podcap.agent._tcpdump import TcpdumpStats, parse_stats, tcpdump_argv

SETPRIV, TCPDUMP = "/usr/bin/setpriv", "/usr/bin/tcpdump"


def test_filter_is_one_argument_after_double_dash_and_last() -> None:
    argv = tcpdump_argv(
        TCPDUMP,
        "cali0123456789a",
        Path("/spool/x.pcap"),
        262144,
        "tcp port 443 and host 10.0.0.1",
        "tcpdump",
        5,
        setpriv=SETPRIV,
    )
    assert argv[-2:] == ["--", "tcp port 443 and host 10.0.0.1"]
    tcpdump = argv[argv.index("--") + 1 :]
    assert tcpdump[:3] == [TCPDUMP, "-i", "cali0123456789a"]
    assert tcpdump[tcpdump.index("-c") + 1] == "5"


def test_packets_reach_the_file_a_block_at_a_time_through_a_large_buffer() -> None:
    """No --immediate-mode (its ring lost 9-38% of a 200k packet/s flood), -U (each block is on
    disk at once, not held in stdio's buffer until tcpdump exits), the kernel buffer asked for, whole packets."""
    argv = tcpdump_argv(TCPDUMP, "eth0", Path("/x.pcap"), 262144, "", "", setpriv=SETPRIV, buffer_kib=32768)
    tcpdump = argv[argv.index(TCPDUMP) : argv.index("--", argv.index(TCPDUMP))]
    assert tcpdump == [TCPDUMP, "-i", "eth0", "-w", "/x.pcap", "-U", "-n", "-s", "262144", "-B", "32768"]


def test_tcpdump_never_runs_as_root_and_dies_with_its_agent() -> None:
    argv = tcpdump_argv(TCPDUMP, "eth0", Path("/x.pcap"), 96, "", "tcpdump", setpriv=SETPRIV)
    launcher = argv[: argv.index("--")]
    assert launcher[0] == SETPRIV
    assert {"--reuid=tcpdump", "--regid=tcpdump", "--pdeathsig=INT", "--no-new-privs"} <= set(launcher)
    caps = {"--inh-caps=-all,+net_raw", "--ambient-caps=-all,+net_raw", "--bounding-set=-all,+net_raw"}
    assert caps <= set(launcher)


def test_empty_filter_captures_everything() -> None:
    argv = tcpdump_argv(TCPDUMP, "eth0", Path("/x.pcap"), 96, "  ", "", setpriv=SETPRIV)
    assert argv[-1] == "--"
    assert not any(arg.startswith("--reuid") for arg in argv)
    assert "--pdeathsig=INT" in argv


def test_a_nul_is_refused() -> None:
    with pytest.raises(InvalidCaptureRequest):
        tcpdump_argv(TCPDUMP, "eth0", Path("/x.pcap"), 0, "port 80\x00", "", setpriv=SETPRIV)


@pytest.mark.parametrize("text", ["-z /evil.sh", "port 80 -w /etc/passwd", "len - 54 > 0"])
def test_the_filter_is_one_argument_after_the_end_of_options_whatever_it_holds(text: str) -> None:
    """tcpdump reads nothing after `--` as an option; whether the text is a filter is libpcap's compiler's call
    (podcap.api.bpf, before any tcpdump runs)."""
    argv = tcpdump_argv(TCPDUMP, "eth0", Path("/x.pcap"), 0, text, "", setpriv=SETPRIV)
    assert argv[-2:] == ["--", text] and argv.count(text) == 1


def test_closing_statistics_are_parsed() -> None:
    stderr = (
        b"tcpdump: listening on cali1, link-type EN10MB (Ethernet), snapshot length 262144 bytes\n"
        b"1532 packets captured\n1540 packets received by filter\n8 packets dropped by kernel\n"
    )
    assert parse_stats(stderr) == TcpdumpStats(packets=1532, packets_received=1540, kernel_drops=8)


def test_singular_and_missing_statistics() -> None:
    assert parse_stats(b"1 packet captured\n") == TcpdumpStats(packets=1)
    assert parse_stats(b"") == TcpdumpStats()
