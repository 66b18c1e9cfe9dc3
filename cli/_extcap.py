"""`podcap-extcap`: podcap as a Wireshark extcap, so every pod the user may capture is an interface in Wireshark.

Wireshark runs the extcap once per question (extcap(4), doc/extcap_example.py in Wireshark's sources):

    --extcap-interfaces [--extcap-version=4.0]   the extcap line and one `interface` per pod (ListPods)
    --extcap-version                             the extcap line alone
    --extcap-interface X --extcap-dlts           Ethernet: the agents' tcpdump writes EN10MB pcaps
    --extcap-interface X --extcap-config         the options: duration, filter, reason
    --extcap-interface X --extcap-capture-filter F          checks F: nothing on stdout when it is a filter
    --capture --extcap-interface X --fifo PATH [--extcap-capture-filter F] [--duration D] [--filter F]
                                                  creates the capture through the controller and copies its live
                                                  pcap (StreamPackets) into the FIFO until the pcap is complete

Everything goes through the controller with the same server, token and CA as the `podcap` command (flags never
given here, so environment over config file, `_config.py`), hence the same authentication, per-namespace
authorisation and audit; the capture is stored as any other. Errors go to stderr with a nonzero exit, which
Wireshark shows. Wireshark stops a capture with SIGTERM: the extcap then stops the capture on the controller
(what was captured stays stored) and exits 0; so it does when the FIFO's reader goes away.

An interface is `podcap_NAMESPACE_POD`: Kubernetes names never hold `_` (DNS-1123), so the value is a safe
identifier that decodes back to exactly one pod. hostNetwork pods are left out: capturing one sees the node's
traffic, which is a decision for `podcap capture --host-network`, not a click in an interface list.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from datetime import timedelta
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from ._client import ClientError, Connection

if TYPE_CHECKING:
    from podcap.api.v1 import capture_pb2

PREFIX = "podcap"
HELP_URL = "https://www.wireshark.org/docs/man-pages/extcap.html"
DEFAULT_DURATION = "60s"
_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
# Wireshark checks an option's text with this before it starts the extcap (podcap's own durations: 30s, 1m30s).
_DURATION_VALIDATION = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$|^[0-9]+$"


class ExtcapError(Exception):
    """What went wrong, for stderr (Wireshark shows it)."""


def interface_name(namespace: str, pod: str) -> str:
    return f"{PREFIX}_{namespace}_{pod}"


def parse_interface(value: str) -> tuple[str, str]:
    """The (namespace, pod) an interface value names; ExtcapError unless it is one `interface_name` made."""
    parts = value.split("_")
    if (
        len(parts) != 3
        or parts[0] != PREFIX
        or not (_DNS1123_LABEL.fullmatch(parts[1]) and len(parts[1]) <= 63)
        or not (_DNS1123_SUBDOMAIN.fullmatch(parts[2]) and len(parts[2]) <= 253)
    ):
        raise ExtcapError(f"{value!r} is not a podcap interface (podcap_NAMESPACE_POD)")
    return parts[1], parts[2]


def _version() -> str:
    try:
        return metadata.version("podcap")
    except metadata.PackageNotFoundError:
        return "0"


def _extcap_line() -> str:
    return f"extcap {{version={_version()}}}{{help={HELP_URL}}}{{display=podcap: Kubernetes pods}}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="podcap-extcap",
        description="Wireshark extcap for podcap: capture Kubernetes pods live through the podcap controller. "
        "Wireshark runs it; `podcap extcap install` puts it where Wireshark looks.",
    )
    parser.add_argument("--extcap-interfaces", action="store_true", help="list the pods you may capture")
    parser.add_argument("--extcap-version", nargs="?", const="", default=None, metavar="WIRESHARK_VERSION")
    parser.add_argument("--extcap-interface", metavar="INTERFACE", help="podcap_NAMESPACE_POD")
    parser.add_argument("--extcap-dlts", action="store_true", help="the link-layer types of INTERFACE")
    parser.add_argument("--extcap-config", action="store_true", help="the options of INTERFACE")
    parser.add_argument("--extcap-capture-filter", default="", metavar="FILTER")
    parser.add_argument("--capture", action="store_true", help="capture INTERFACE into --fifo")
    parser.add_argument("--fifo", metavar="PATH", help="where Wireshark reads the pcap")
    parser.add_argument(
        "--duration", default=DEFAULT_DURATION, help=f"e.g. 30s, 5m (default {DEFAULT_DURATION})"
    )
    parser.add_argument("--filter", default="", help="tcpdump capture filter, e.g. 'tcp port 443'")
    parser.add_argument("--reason", default="", help="why, for the audit trail")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Wireshark passes options this extcap has no use for (--extcap-control-in/out, --debug, ...): ignore them.
    args, _unknown = _parser().parse_known_args(argv)
    try:
        if args.extcap_interfaces:
            return _interfaces()
        if args.extcap_version is not None and not args.extcap_interface:
            print(_extcap_line())
            return 0
        if not args.extcap_interface:
            raise ExtcapError("give --extcap-interfaces, or --extcap-interface with what to do (see --help)")
        namespace, pod = parse_interface(args.extcap_interface)
        if args.extcap_dlts:
            print("dlt {number=1}{name=EN10MB}{display=Ethernet}")
            return 0
        if args.extcap_config:
            _config()
            return 0
        if args.capture:
            if not args.fifo:
                raise ExtcapError("--capture needs --fifo PATH")
            return _capture(args, namespace, pod)
        if args.extcap_capture_filter:
            _validate_filter(args.extcap_capture_filter)
            return 0
        raise ExtcapError("nothing to do: give --extcap-dlts, --extcap-config or --capture")
    except (ExtcapError, ClientError) as exc:
        print(f"podcap-extcap: {exc}", file=sys.stderr)
        if args.capture and args.fifo:
            _close_fifo(args.fifo)
        return 1
    except KeyboardInterrupt:
        return 130


def _interfaces() -> int:
    print(_extcap_line(), flush=True)
    pods = asyncio.run(_list_pods())
    for pod in pods:
        if pod.host_network:
            continue
        print(
            f"interface {{value={interface_name(pod.namespace, pod.name)}}}{{display={pod.namespace}/{pod.name}}}"
        )
    return 0


def _config() -> None:
    print(
        "arg {number=0}{call=--duration}{display=Duration}"
        "{tooltip=How long to capture, e.g. 30s, 5m, 1h (the controller caps it)}"
        f"{{type=string}}{{default={DEFAULT_DURATION}}}{{validation={_DURATION_VALIDATION}}}"
    )
    print(
        "arg {number=1}{call=--filter}{display=Filter on the node}"
        "{tooltip=tcpdump filter applied by the agent, e.g. tcp port 443 (with Wireshark's capture filter: both)}"
        "{type=string}"
    )
    print("arg {number=2}{call=--reason}{display=Reason}{tooltip=Why, for the audit trail}{type=string}")


def _validate_filter(expression: str) -> None:
    """Wireshark's filter check: a message on stdout when `expression` is not a filter, nothing when it is."""
    from podcap.api.bpf import FilterError, check_filter

    try:
        check_filter(expression)
    except FilterError as exc:
        print(str(exc))


def _connection() -> Connection:
    from ._config import ConfigError, resolve

    try:
        settings = resolve({})
    except ConfigError as exc:
        raise ExtcapError(str(exc)) from exc
    return Connection(settings.server, token=settings.token, tls=settings.tls, ca=settings.ca)


async def _list_pods() -> Sequence[capture_pb2.PodInfo]:
    async with _connection() as conn:
        return await conn.list_pods()


def _combined_filter(args: argparse.Namespace) -> str:
    filters = [f for f in (args.filter.strip(), args.extcap_capture_filter.strip()) if f]
    return " and ".join(f"({f})" for f in filters) if len(filters) > 1 else "".join(filters)


def _duration(text: str) -> timedelta:
    from ._main import parse_duration

    try:
        return parse_duration(text)
    except argparse.ArgumentTypeError as exc:
        raise ExtcapError(f"--duration: {exc}") from None


def _capture(args: argparse.Namespace, namespace: str, pod: str) -> int:
    duration = _duration(args.duration)
    return asyncio.run(_run_capture(args.fifo, namespace, pod, _combined_filter(args), duration, args.reason))


async def _run_capture(
    fifo_path: str, namespace: str, pod: str, filter_expr: str, duration: timedelta, reason: str
) -> int:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    async with _connection() as conn:
        capture = await conn.create(
            namespace=namespace,
            pod=pod,
            filter_expr=filter_expr,
            duration=duration,
            max_packets=0,
            max_bytes=0,
            snaplen=0,
            buffer_size=0,
            reason=reason or "Wireshark (podcap-extcap)",
            request_id=uuid.uuid4().hex,
        )
        # Nothing on stderr unless something fails: Wireshark shows whatever an extcap writes there as an error.
        opened: list[int] = []
        copy = asyncio.create_task(_copy(conn, capture.id, fifo_path, opened))
        stop = asyncio.create_task(stopping.wait())
        complete = False
        try:
            await asyncio.wait({copy, stop}, return_when=asyncio.FIRST_COMPLETED)
            if copy.done():
                complete = copy.result()  # raises the stream's own error
        finally:
            stop.cancel()
            copy.cancel()
            await asyncio.gather(copy, stop, return_exceptions=True)
            if not complete:
                # Wireshark stopped, its reader went away, or the stream failed: end the capture now rather
                # than at its duration (what was captured is stored all the same).
                with contextlib.suppress(ClientError):
                    await conn.stop(capture.id)
            if not opened:
                # Stopped before the copy opened the FIFO: a reader waiting on it must still see its end.
                await asyncio.to_thread(_close_fifo, fifo_path)
    return 0


async def _copy(conn: Connection, capture_id: str, fifo_path: str, opened: list[int]) -> bool:
    """Copies the live pcap into the FIFO until it is complete (True), or until the reader leaves (False).

    The FIFO is written non-blocking, waiting on the event loop: a slow reader holds the stream back (gRPC's
    flow control, not memory), and a stop (SIGTERM) never waits for a blocked write or open. `opened` gets the
    descriptor once the FIFO is open."""
    fd = await _open_for_writing(fifo_path)
    opened.append(fd)
    try:
        async for chunk in conn.stream_packets(capture_id):
            try:
                await _write(fd, chunk)
            except BrokenPipeError:
                return False
    finally:
        os.close(fd)
    return True


async def _open_for_writing(path: str) -> int:
    """Opens the FIFO once its reader has (opening a FIFO without a reader fails with ENXIO when non-blocking)."""
    while True:
        try:
            return os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise ExtcapError(f"cannot open the FIFO {path}: {exc.strerror}") from exc
        await asyncio.sleep(0.05)


async def _write(fd: int, data: bytes) -> None:
    loop = asyncio.get_running_loop()
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            writable = loop.create_future()
            loop.add_writer(fd, writable.set_result, None)
            try:
                await writable
            finally:
                loop.remove_writer(fd)


_CLOSE_WAIT_S = 10.0


def _close_fifo(path: str) -> None:
    """After a failure, open and close the FIFO once so a Wireshark waiting on it sees the end (and stderr).

    The reader may not have opened it yet (dumpcap starts it after the extcap, later still on a loaded machine):
    until it has, a non-blocking open fails with ENXIO, so that is retried for a while rather than leaving a
    reader that comes a moment later blocked for good."""
    deadline = time.monotonic() + _CLOSE_WAIT_S
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno == errno.ENXIO and time.monotonic() < deadline:  # nobody reads it yet
                time.sleep(0.05)
                continue
            if exc.errno not in (errno.ENXIO, errno.ENOENT):  # ENOENT: it is gone
                print(f"podcap-extcap: cannot close {path}: {exc}", file=sys.stderr)
            return
        os.close(fd)
        return


# -- `podcap extcap install` -------------------------------------------------------------------------------------


def personal_extcap_dir(tshark: str | None = None) -> Path:
    """Where this user's Wireshark looks for extcaps: `tshark -G folders` says so from Wireshark 4.2 on
    ("Personal Extcap path"); Wireshark 4.0 and older look in the personal configuration folder's `extcap`, 4.1 and
    later in ~/.local/lib/wireshark/extcap."""
    tshark = tshark or shutil.which("tshark")
    if tshark:
        try:
            folders = subprocess.run(
                [tshark, "-G", "folders"], capture_output=True, text=True, timeout=30, check=True
            ).stdout
            version = subprocess.run(
                [tshark, "--version"], capture_output=True, text=True, timeout=30, check=True
            ).stdout
        except (OSError, subprocess.SubprocessError):
            folders = version = ""
        found = dict(
            (key.strip(), value.strip())
            for key, sep, value in (line.partition(":") for line in folders.splitlines())
            if sep
        )
        if found.get("Personal Extcap path"):
            return Path(found["Personal Extcap path"])
        match = re.search(r"\(Wireshark\) (\d+)\.(\d+)", version)
        if match and (int(match[1]), int(match[2])) < (4, 1) and found.get("Personal configuration"):
            return Path(found["Personal configuration"]) / "extcap"
    return Path.home() / ".local" / "lib" / "wireshark" / "extcap"


def install(directory: Path | None = None) -> Path:
    """Writes a small wrapper script `podcap-extcap` into `directory` (default: the personal extcap folder) that
    runs this venv's podcap-extcap: Wireshark starts extcaps without a venv. Returns the script's path."""
    folder = directory or personal_extcap_dir()
    target = _installed_extcap()
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "podcap-extcap"
    temporary = script.with_name(f".{script.name}.{os.getpid()}")
    temporary.write_text(f'#!/bin/sh\n# Written by `podcap extcap install`.\nexec "{target}" "$@"\n')
    temporary.chmod(0o755)
    temporary.replace(script)
    return script


def _installed_extcap() -> Path:
    beside = Path(sys.executable).with_name("podcap-extcap")  # the venv's console script
    if beside.is_file():
        return beside
    found = shutil.which("podcap-extcap")
    if found is None:
        raise ExtcapError(
            "podcap-extcap is not installed beside podcap (run make setup, or pip install podcap)"
        )
    return Path(found)


def install_command(directory: Path | None) -> int:
    try:
        script = install(directory)
    except (ExtcapError, OSError) as exc:
        print(f"podcap extcap install: {exc}", file=sys.stderr)
        return 1
    print(f"installed {script}")
    print(
        "restart Wireshark (or run tshark -D): each pod you may capture appears as an interface namespace/pod; "
        "it connects with the settings `podcap config` shows",
        file=sys.stderr,
    )
    return 0
