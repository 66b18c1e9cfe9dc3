"""The node's spool: where a pcap lives from tcpdump's first byte until the object store has confirmed it.

Each capture gets a directory `<spool>/<capture_id>/` holding `capture.pcap`, `capture.json` (what was asked and
where tcpdump runs, written before tcpdump starts), `ended.json` (tcpdump's statistics, written when it has
exited) and `stored.json` (the object store's confirmation of the upload). The directory is removed once the
stored pcap is also summarised. An agent that was killed finds these directories at its next start and finishes
what they record (upload, or only the summary), so no pcap is lost to a restart.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pwd
import shutil
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from podcap.storage import StoredObject

from ._errors import AgentError, MissingPrivilege

log = logging.getLogger(__name__)

PCAP = "capture.pcap"
_STARTED = "capture.json"
_ENDED = "ended.json"
_STORED = "stored.json"


@dataclass(frozen=True)
class Ended:
    """What tcpdump said when it exited, kept so a restarted agent still knows it."""

    packets: int
    packets_received: int
    kernel_drops: int
    ended_at: str
    error: str = ""
    drops_known: bool = True
    # Why the capture ended before its time, when it did (the agent died, or shut down), for a person.
    interruption: str = ""


class SpoolEntry:
    """One capture's spool directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @property
    def capture_id(self) -> str:
        return self.directory.name

    @property
    def pcap(self) -> Path:
        return self.directory / PCAP

    def size(self) -> int:
        with contextlib.suppress(FileNotFoundError):
            return self.pcap.stat().st_size
        return 0

    def record_started(self, record: dict[str, Any]) -> None:
        """MissingPrivilege when the agent may not write into the directory it gave to tcpdump's user."""
        try:
            _write_json(self.directory / _STARTED, record)
        except PermissionError as exc:
            raise MissingPrivilege(
                f"cannot write the capture's record into its spool directory {self.directory}, which belongs "
                f"to tcpdump's user: {exc.strerror}; the agent needs CAP_DAC_OVERRIDE"
            ) from exc

    def started(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.directory / _STARTED).read_text())
        return data

    def record_ended(self, ended: Ended) -> None:
        _write_json(self.directory / _ENDED, asdict(ended))

    def ended(self) -> Ended | None:
        try:
            return Ended(**json.loads((self.directory / _ENDED).read_text()))
        except FileNotFoundError:
            return None

    def record_stored(self, stored: StoredObject) -> None:
        _write_json(self.directory / _STORED, asdict(stored))

    def stored(self) -> StoredObject | None:
        """The confirmed upload, once there is one: the pcap then waits only for its summary."""
        try:
            return StoredObject(**json.loads((self.directory / _STORED).read_text()))
        except FileNotFoundError:
            return None

    def remove(self) -> None:
        """Removes the directory and what it holds. What cannot be removed stays and is logged, never raised: the
        caller is done with the capture, or is undoing a start because of another error, the one to report."""
        try:
            shutil.rmtree(self.directory)
        except FileNotFoundError:
            pass
        except OSError as exc:
            shutil.rmtree(self.directory, ignore_errors=True)  # whatever else can go
            log.warning("cannot remove the spool directory %s: %s", self.directory, exc)


class Spool:
    def __init__(self, root: Path, tcpdump_user: str = "") -> None:
        self.root = root
        self._user = tcpdump_user
        root.mkdir(parents=True, exist_ok=True, mode=0o711)
        if tcpdump_user:
            _check_reachable(root, tcpdump_user)

    def create(self, capture_id: str) -> SpoolEntry:
        """A fresh directory that tcpdump, after dropping to its user, can write its pcap into; nothing is left
        when it raises (MissingPrivilege when the agent may not give the directory to that user)."""
        directory = self.root / capture_id
        directory.mkdir(mode=0o700)
        try:
            if self._user:
                entry = pwd.getpwnam(self._user)
                os.chown(directory, entry.pw_uid, entry.pw_gid)
        except BaseException as exc:
            directory.rmdir()
            if isinstance(exc, PermissionError):
                raise MissingPrivilege(
                    f"cannot give the capture's spool directory to tcpdump's user {self._user!r}: "
                    f"{exc.strerror}; the agent needs CAP_CHOWN"
                ) from exc
            raise
        return SpoolEntry(directory)

    def entries(self) -> Iterator[SpoolEntry]:
        """Every capture directory in the spool, with or without a record (a crash can leave either)."""
        for directory in sorted(self.root.iterdir()):
            if directory.is_dir() and not directory.name.startswith("."):
                yield SpoolEntry(directory)

    def total_bytes(self) -> int:
        """Bytes of pcap not yet stored (a stored pcap waiting for its summary only takes disk space)."""
        return sum(entry.size() for entry in self.entries() if not (entry.directory / _STORED).exists())

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Written to a temporary file and renamed, so a crash leaves the old record or the new one, never half."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".tmp-", delete=False) as out:
        json.dump(data, out, default=_jsonable)
        out.flush()
        os.fsync(out.fileno())
    Path(out.name).replace(path)


def _jsonable(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot store {type(value).__name__} in a spool record")


def _check_reachable(directory: Path, user: str) -> None:
    """tcpdump drops to `user` before it creates its file: every parent of the spool must be searchable by it."""
    entry = pwd.getpwnam(user)
    for path in (directory.resolve(), *directory.resolve().parents):
        st = path.stat()
        if st.st_uid == entry.pw_uid:
            bit = stat.S_IXUSR
        elif st.st_gid == entry.pw_gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            raise AgentError(
                f"tcpdump runs as {user!r} but cannot reach the spool directory {directory}: {path} is not "
                f"searchable by it (chmod o+x {path}, or choose another --spool-dir)"
            )
