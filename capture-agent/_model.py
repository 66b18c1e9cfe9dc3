"""The agent's vocabulary: what a capture asks for, how it stands, and the node's bounds on it."""

from __future__ import annotations

import enum
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any

from ._context import NetworkContext
from ._resolve import Resolution
from ._summary import Summary
from ._tcpdump import TcpdumpStats


class JobState(enum.StrEnum):
    RUNNING = "RUNNING"
    UPLOADING = "UPLOADING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


TERMINAL = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED})


@dataclass(frozen=True)
class CaptureSpec:
    """What the controller asked for."""

    capture_id: str
    pod_ips: Sequence[str]
    filter: str
    duration_s: float
    object_key: str
    max_packets: int = 0
    max_bytes: int = 0
    snaplen: int = 0
    pod_interface: str = ""
    host_network: bool = False
    buffer_size: int = 0  # bytes of kernel capture buffer (tcpdump -B); 0 for the node's default

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> CaptureSpec:
        """Back from the spool's JSON record (unknown keys from a newer agent are ignored)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in record.items() if k in known}
        values["pod_ips"] = tuple(values.get("pod_ips", ()))
        return cls(**values)


@dataclass(frozen=True)
class CaptureSnapshot:
    """A job as it stands, for the API."""

    spec: CaptureSpec
    state: JobState
    resolution: Resolution
    stats: TcpdumpStats = field(default_factory=TcpdumpStats)
    size: int = 0
    sha256: str = ""
    error: str = ""
    started_at: datetime | None = None
    ended_at: datetime | None = None
    summary: Summary | None = None
    interruption: str = ""  # why it ended before its time (the agent died or shut down), for a person
    context: NetworkContext | None = None  # the network around the capture, once tcpdump ended

    @property
    def settled(self) -> bool:
        """Nothing more will change: the capture is over and its summary (if any) made."""
        return self.state in TERMINAL and not (self.summary is not None and self.summary.pending)


@dataclass(frozen=True)
class Limits:
    """This node's bounds on what captures may ask for and use."""

    max_duration_s: float = 3600.0
    default_snaplen: int = 262144
    max_snaplen: int = 262144
    # The kernel's capture buffer of each tcpdump (-B), and the most a request may ask for: memory the kernel
    # locks per capture. docs/capture-fidelity.md has the measurements behind the default.
    default_buffer_size: int = 32 << 20
    max_buffer_size: int = 256 << 20
    max_concurrent: int = 8
    max_spool_bytes: int = 8 << 30
    min_free_bytes: int = 1 << 30
    shutdown_grace_s: float = 20.0
    # tshark processes summarising pcaps at once on the whole node (one summary at a time uses them all): what
    # bounds the memory summaries take, ~300 MB each (see _summary.py), however many captures end together.
    summary_tsharks: int = 2


@dataclass(frozen=True)
class Programs:
    """Absolute paths of the programs the agent runs, found once at its start: no exec of the agent searches PATH,
    so nothing put on PATH later, or a relative PATH entry, decides what runs as root.

    setpriv, tcpdump and tshark are required. The tools a capture's network context reads with (_context.py) are
    optional: "" when missing, and the context then says so instead of reading that source."""

    setpriv: str
    tcpdump: str
    tshark: str
    iptables_save: str = ""
    ip6tables_save: str = ""
    conntrack: str = ""
    ipvsadm: str = ""

    @classmethod
    def find(
        cls,
        tcpdump: str = "tcpdump",
        tshark: str = "tshark",
        setpriv: str = "setpriv",
        optional: Mapping[str, str] | None = None,
    ) -> Programs:
        """Each program (a name looked up on PATH, or a path) as an absolute path; FileNotFoundError naming every
        required one that is missing or not executable. ``optional`` overrides the names of the optional ones
        (role -> name or path)."""
        wanted = {"setpriv": setpriv, "tcpdump": tcpdump, "tshark": tshark}
        found = {role: shutil.which(program) for role, program in wanted.items()}
        missing = [repr(wanted[role]) for role, path in found.items() if path is None]
        if missing:
            raise FileNotFoundError(
                f"{', '.join(missing)} not found on PATH (or not executable): the agent runs setpriv "
                "(util-linux), tcpdump and tshark, and cannot work without any of them"
            )
        names = {**_OPTIONAL, **(optional or {})}
        extra = {role: shutil.which(program) or "" for role, program in names.items()}
        paths = {role: os.path.abspath(path) for role, path in {**found, **extra}.items() if path}
        return cls(**paths)


# The optional programs and the names they are looked up by.
_OPTIONAL = {
    "iptables_save": "iptables-save",
    "ip6tables_save": "ip6tables-save",
    "conntrack": "conntrack",
    "ipvsadm": "ipvsadm",
}
