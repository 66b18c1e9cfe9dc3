"""The README's demo command, run the way a newcomer runs it, judged by what they would see and be left with.

`make demo` installs system packages and the venv first; this runs what it then runs, `deploy/local/demo.py`,
as a subprocess: it must end with status 0, leave a pcap in which tshark finds the frontend's HTTP requests to
the checkout pod, show the capture COMPLETED in `podcap list`, and leave no network namespace and no process
behind.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "deploy" / "local" / "demo.py"
HTTP_FIELDS = ("ip.src", "ip.dst", "tcp.dstport", "http.request.method", "http.request.uri")


def _fields(names: tuple[str, ...]) -> list[str]:
    return [arg for name in names for arg in ("-e", name)]


def _netns() -> set[str]:
    out = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry.name))
    return found


def _processes_of(lab_prefix: bytes, workdir: Path) -> list[str]:
    """Processes started by the demo: tagged with its lab's id, or naming its directory on their command line."""
    left = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(var.startswith(b"PODCAP_LAB=" + lab_prefix) for var in environ) or any(
            str(workdir).encode() in arg for arg in argv
        ):
            left.append(f"{entry.name}: {b' '.join(argv).decode(errors='replace')}")
    return left


def _section(output: str, command: str) -> str:
    """What the demo printed after `$ COMMAND`, up to the next command."""
    start = output.index(f"\n$ {command}\n") + len(command) + 4
    end = output.find("\n$ ", start)
    return output[start : end if end >= 0 else len(output)]


@pytest.mark.timeout(240)
def test_the_demo_captures_real_traffic_and_leaves_nothing_running(tmp_path: Path) -> None:
    workdir = tmp_path / "demo-output"
    netns_before, children_before = _netns(), _children(os.getpid())

    demo = subprocess.Popen(
        [sys.executable, str(DEMO), "--workdir", str(workdir)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = demo.communicate(timeout=200)
    finally:
        if demo.poll() is None:  # SIGTERM: the demo tears its cluster down, as it must on any signal
            demo.terminate()
            output, _ = demo.communicate(timeout=30)
    assert demo.returncode == 0, output

    # The capture the user asked for, downloaded where they said, holds the frontend's requests to checkout.
    pcap = workdir / "checkout.pcap"
    assert pcap.stat().st_size > 0, output
    requests = subprocess.run(
        ["tshark", "-r", str(pcap), "-Y", "http.request", "-T", "fields", *_fields(HTTP_FIELDS)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.splitlines()
    methods = {line.split("\t")[3] for line in requests}
    assert methods == {"GET", "POST"}, requests
    for line in requests:
        src, dst, port, method, uri = line.split("\t")
        assert (src, dst, port) == ("10.251.2.20", "10.251.1.10", "8080")
        assert (method, uri.split("?")[0]) in {("GET", "/api/cart"), ("POST", "/api/checkout")}

    # `podcap list` showed that capture COMPLETED; `podcap get` showed what is inside it.
    listed = _section(output, "podcap list")
    assert re.search(r"^\w{32}\s+COMPLETED\s+shop/checkout-7d9f\s", listed, re.MULTILINE), listed
    capture_id = listed.splitlines()[1].split()[0]
    shown = _section(output, f"podcap get {capture_id}")
    assert "shop/checkout-7d9f on node-1 via cali" in shown and "eth:ip:tcp:http" in shown, shown

    # The merged selector capture names each packet's pod.
    merged = subprocess.run(
        ["tshark", "-r", str(workdir / "shop.pcapng"), "-T", "fields", "-e", "frame.interface_name"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split()
    assert set(merged) == {"shop/checkout-7d9f@node-1", "shop/frontend-5c4b@node-2"}

    # Nothing of the cluster is left: its namespaces (as the demo listed them), its processes, our children.
    created = re.search(r"^\s*namespaces: (.+)$", output, re.MULTILINE)
    assert created is not None, output
    lab_namespaces = set(created[1].split())
    lab_ids = {re.sub(r"(f|n\d+|p\d+)$", "", name) for name in lab_namespaces}
    assert len(lab_ids) == 1 and lab_ids.pop().startswith(f"pc{demo.pid:x}x"), lab_namespaces
    lab_prefix = f"pc{demo.pid:x}x"
    netns_after = _netns()
    assert not lab_namespaces & netns_after
    assert not {n for n in netns_after - netns_before if n.startswith(f"pc{demo.pid:x}x")}
    assert _processes_of(lab_prefix.encode(), workdir) == []
    assert _children(os.getpid()) == children_before
