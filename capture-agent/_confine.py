"""The one setpriv command line that every program the agent starts runs under.

The agent is root on its node; what it starts is not. tcpdump gets CAP_NET_RAW (an AF_PACKET socket), the tools
that read the node's NAT rules and conntrack table get CAP_NET_ADMIN (and CAP_NET_RAW, which iptables' legacy
backend opens a raw socket with), tshark and the pyshark child that parse what pods sent get nothing. Each runs
as the unprivileged capture user when one is configured, with ``--no-new-privs`` and a bounding set of exactly
its capabilities, so neither a setuid binary nor file capabilities can give it more, and with a parent-death
signal, so nothing outlives its agent. Building this in one place keeps the three launches from drifting apart;
tests/agent/test_no_shell.py checks each exec against it.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["confined"]


def confined(setpriv: str, user: str, caps: Sequence[str] = (), *, pdeathsig: str = "KILL") -> list[str]:
    """``setpriv ... --``: what follows runs as ``user`` (root's uid if "") with only ``caps`` ("net_raw", ...).

    ``pdeathsig`` is the signal it gets when the agent dies: INT for tcpdump, which then flushes its pcap."""
    argv = [setpriv, f"--pdeathsig={pdeathsig}"]
    if user:
        argv += [f"--reuid={user}", f"--regid={user}", "--clear-groups"]
    kept = "".join(f",+{cap}" for cap in caps)
    # Root's capabilities too are recomputed at exec from the inheritable, ambient and bounding sets given here.
    argv += [
        f"--inh-caps=-all{kept}",
        f"--ambient-caps=-all{kept}",
        f"--bounding-set=-all{kept}",
        "--no-new-privs",
    ]
    return [*argv, "--"]
