"""`podcap open ID`: the capture's pcap into the user's cache, then Wireshark on it, detached from the terminal.

Without Wireshark on PATH (a jump host, a headless box) the path and the command to open it are printed instead,
so the file can be copied to where Wireshark is. The download is the verified one of `podcap download`.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

from podcap.api.v1 import capture_pb2

from ._client import Connection
from ._download import download

_CACHE_ENV = "XDG_CACHE_HOME"


def cache_dir() -> Path:
    base = os.environ.get(_CACHE_ENV) or str(Path.home() / ".cache")
    path = Path(base) / "podcap"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)  # pcaps are other people's traffic: the user's only
    return path


async def open_capture(conn: Connection, capture: capture_pb2.Capture, target: int | None) -> Path:
    """Downloads one target (or every target, merged) and starts Wireshark on it; returns the file's path."""
    merge = target is None and len(capture.targets) > 1
    suffix = ".pcapng" if merge else ".pcap"
    name = capture.id + (f"-{target}" if target is not None else "") + suffix
    path = cache_dir() / name
    await download(conn, capture, path, target, every=False, merge=merge, force=True)
    command = ["wireshark", "-r", str(path)]
    wireshark = shutil.which("wireshark")
    if wireshark is None:
        print(f"{path}")
        print(f"Wireshark is not on PATH; open the capture where it is installed with: {shlex.join(command)}")
        return path
    # Detached: its own session and no terminal, so it outlives this command and a Ctrl-C in the shell.
    # Popen returns at once (no waiting in the event loop); the child is not ours to reap: it outlives us.
    subprocess.Popen(  # noqa: ASYNC220
        [wireshark, *command[1:]],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    print(f"{path}")
    print(f"opened in Wireshark ({wireshark})")
    return path
