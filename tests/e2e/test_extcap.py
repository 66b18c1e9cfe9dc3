"""The Wireshark extcap, driven as Wireshark drives it, against a real controller, agents and lab pods.

`podcap-extcap` is run with Wireshark's own arguments (extcap(4)): `--extcap-interfaces --extcap-version=4.0`,
`--extcap-dlts`, `--extcap-config`, a capture-filter check, then `--capture --fifo` while a real `tshark -r FIFO`
reads, as dumpcap would. The controller takes bearer tokens: alice may capture in shop, bob may only read
payments, carol may do anything; a third pod lives in payments. Last, `podcap extcap install` into a fresh home,
and tshark itself (`tshark -D`) finds the interfaces there.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.e2e.conftest import Stack
from tests.support.lab import Lab, build_lab, require_netns
from tests.support.processes import PODCAP

pytestmark = pytest.mark.netns

EXTCAP = str(Path(PODCAP).with_name("podcap-extcap"))
HTTP_PORT = 8080
TOKENS = {"alice": "alice-" + "a" * 40, "bob": "bob-" + "b" * 40, "carol": "carol-" + "c" * 40}
PROBES = [f"/wireshark-{i}" for i in range(5)]


@pytest.fixture
def lab() -> Iterator[Lab]:
    """The default lab (shop/client on node-1, shop/server on node-2) and payments/ledger on node-1."""
    require_netns()
    with build_lab() as built:
        built.add_pod("node-1", "payments", "ledger", "10.251.1.20")
        yield built


@pytest.fixture
def controller_flags(tmp_path: Path) -> list[str]:
    grants = {
        "alice": [{"role": "support", "namespaces": ["shop"]}],
        "bob": [{"role": "viewer", "namespaces": ["payments"]}],
        "carol": [{"role": "admin", "namespaces": ["*"]}],
    }
    document = {
        "roles": {"support": ["capture", "read", "download", "stop"], "viewer": ["read"], "admin": ["*"]},
        "users": [
            {"name": name, "token_sha256": hashlib.sha256(token.encode()).hexdigest(), "grants": grants[name]}
            for name, token in TOKENS.items()
        ],
    }
    path = tmp_path / "tokens.yaml"
    path.write_text(yaml.safe_dump(document))
    return ["--auth-tokens", str(path)]


def _env(stack: Stack, user: str, home: Path) -> dict[str, str]:
    # A home of its own: no podcap config file or Wireshark folders of the machine's user leak in.
    return {**os.environ, "PODCAP_SERVER": stack.server, "PODCAP_TOKEN": TOKENS[user], "HOME": str(home)}


def _extcap(stack: Stack, user: str, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EXTCAP, *args], env=_env(stack, user, home), capture_output=True, text=True, timeout=60, check=False
    )


def _podcap(stack: Stack, user: str, home: Path, *args: str) -> str:
    result = subprocess.run(
        [PODCAP, *args], env=_env(stack, user, home), capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"podcap {' '.join(args)}: {result.stderr}"
    return result.stdout


def _interfaces(stdout: str) -> list[tuple[str, str]]:
    return re.findall(r"^interface \{value=([^}]*)\}\{display=([^}]*)\}$", stdout, re.MULTILINE)


def test_wireshark_sees_the_pods_each_user_may_capture(stack: Stack, tmp_path: Path) -> None:
    listed = {}
    for user in TOKENS:
        result = _extcap(stack, user, tmp_path, "--extcap-interfaces", "--extcap-version=4.0")
        assert (result.returncode, result.stderr) == (0, ""), result.stderr
        first, *_ = result.stdout.splitlines()
        assert re.fullmatch(r"extcap \{version=[0-9][^}]*\}\{help=https?://[^}]+\}\{display=[^}]+\}", first)
        listed[user] = _interfaces(result.stdout)
    assert listed["alice"] == [("podcap_shop_client", "shop/client"), ("podcap_shop_server", "shop/server")]
    assert listed["bob"] == []  # reading payments is not capturing there
    # In the Kubernetes flavour the agents are pods in the API too (podcap-system); carol may capture those as well.
    assert [i for i in listed["carol"] if not i[1].startswith("podcap-system/")] == [
        ("podcap_payments_ledger", "payments/ledger"),
        ("podcap_shop_client", "shop/client"),
        ("podcap_shop_server", "shop/server"),
    ]

    dlts = _extcap(stack, "alice", tmp_path, "--extcap-interface", "podcap_shop_server", "--extcap-dlts")
    assert (dlts.returncode, dlts.stdout) == (0, "dlt {number=1}{name=EN10MB}{display=Ethernet}\n")

    config = _extcap(stack, "alice", tmp_path, "--extcap-interface", "podcap_shop_server", "--extcap-config")
    assert config.returncode == 0, config.stderr
    args = re.findall(
        r"^arg \{number=(\d+)\}\{call=([^}]+)\}\{display=[^}]+\}.*\{type=(\w+)\}", config.stdout, re.M
    )
    assert args == [("0", "--duration", "string"), ("1", "--filter", "string"), ("2", "--reason", "string")]
    assert len(config.stdout.splitlines()) == 3

    # Wireshark's capture-filter check: silence for a filter, a reason for anything else.
    def check(expression: str) -> str:
        result = _extcap(
            stack,
            "alice",
            tmp_path,
            "--extcap-interface",
            "podcap_shop_server",
            "--extcap-capture-filter",
            expression,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert check(f"tcp port {HTTP_PORT}") == ""
    assert check("tcp port") != ""

    wrong = _extcap(stack, "alice", tmp_path, "--extcap-interface", "eth0", "--extcap-dlts")
    assert wrong.returncode == 1 and "'eth0' is not a podcap interface" in wrong.stderr


def _start_reader(fifo: Path) -> subprocess.Popen[str]:
    """tshark reading the FIFO as dumpcap would, printing one line per packet."""
    fields = ("ip.src", "ip.dst", "tcp.srcport", "tcp.dstport", "http.request.uri")
    return subprocess.Popen(
        ["tshark", "-r", str(fifo), "-T", "fields", "-E", "separator=|", *(f"-e{field}" for field in fields)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _running_capture(stack: Stack, home: Path, extcap: subprocess.Popen[str]) -> dict[str, object]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert extcap.poll() is None, extcap.communicate()
        captures = json.loads(_podcap(stack, "alice", home, "list", "-n", "shop", "-o", "json"))
        if captures and captures[0]["state"] == "RUNNING":
            return dict(captures[0])
        time.sleep(0.2)
    raise AssertionError("the extcap's capture never became RUNNING")


def test_capture_into_the_fifo_reaches_tshark_and_is_stored(stack: Stack, tmp_path: Path) -> None:
    lab = stack.lab
    client, server = lab.pods["client"], lab.pods["server"]
    lab.http_server(server.netns, HTTP_PORT)
    fifo = tmp_path / "wireshark_extcap_fifo"
    os.mkfifo(fifo)
    reader = _start_reader(fifo)
    extcap = subprocess.Popen(
        [
            *(EXTCAP, "--capture", "--extcap-interface", "podcap_shop_server", "--fifo", str(fifo)),
            *("--extcap-capture-filter", f"tcp port {HTTP_PORT}", "--duration", "5s", "--reason", "INC-42"),
        ],
        env=_env(stack, "alice", tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        capture = _running_capture(stack, tmp_path, extcap)
        for path in PROBES:
            assert lab.http_get(client.netns, f"http://{server.ip}:{HTTP_PORT}{path}", timeout=5) == 404
        out, err = extcap.communicate(timeout=60)
        packets, reader_err = reader.communicate(timeout=60)
    finally:
        for process in (extcap, reader):
            if process.poll() is None:
                process.kill()
                process.communicate()
    assert (extcap.returncode, out, err) == (0, "", "")
    assert reader.returncode == 0, reader_err
    rows = [line.split("|") for line in packets.splitlines()]
    assert {uri for *_, uri in rows if uri} == set(PROBES)
    for src, dst, sport, dport, _ in rows:
        assert {src, dst} == {client.ip, server.ip} and HTTP_PORT in (int(sport), int(dport))

    # Through the controller like any capture: alice's, with her reason and filter, and stored in full.
    stored = json.loads(_podcap(stack, "alice", tmp_path, "get", str(capture["id"]), "-o", "json"))
    assert (stored["state"], stored["requester"], stored["reason"]) == ("COMPLETED", "alice", "INC-42")
    assert stored["filter"] == f"tcp port {HTTP_PORT}" and stored["pod"] == "server"
    assert stored["packets"] == len(rows)


def test_a_refused_capture_says_why_and_releases_the_reader(stack: Stack, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = _start_reader(fifo)
    try:
        result = _extcap(
            stack,
            "bob",
            tmp_path,
            "--capture",
            "--extcap-interface",
            "podcap_payments_ledger",
            "--fifo",
            str(fifo),
        )
        reader.communicate(timeout=30)  # the FIFO was closed: a waiting Wireshark is not left hanging
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.communicate()
    assert result.returncode == 1
    assert "PERMISSION_DENIED: bob may not capture captures in namespace 'payments'" in result.stderr


def test_wireshark_stopping_the_extcap_stops_the_capture(stack: Stack, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = _start_reader(fifo)
    extcap = subprocess.Popen(
        [
            EXTCAP,
            "--capture",
            "--extcap-interface",
            "podcap_shop_server",
            "--fifo",
            str(fifo),
            "--duration",
            "5m",
        ],
        env=_env(stack, "alice", tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        capture = _running_capture(stack, tmp_path, extcap)
        extcap.send_signal(signal.SIGTERM)  # what Wireshark does on Stop
        _, err = extcap.communicate(timeout=30)
        reader.communicate(timeout=60)
    finally:
        for process in (extcap, reader):
            if process.poll() is None:
                process.kill()
                process.communicate()
    assert (extcap.returncode, err) == (0, "")
    stopped = json.loads(_podcap(stack, "alice", tmp_path, "get", str(capture["id"]), "-o", "json"))
    assert stopped["stopped_by"] == "alice"
    assert stopped["state"] != "FAILED", stopped["error"]


def test_install_puts_it_where_tshark_finds_it(stack: Stack, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    installed = subprocess.run(
        [PODCAP, "extcap", "install"],
        check=False,
        env=_env(stack, "alice", home),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert installed.returncode == 0, installed.stderr
    script = Path(installed.stdout.strip().removeprefix("installed "))
    assert script.parent in (home / ".config/wireshark/extcap", home / ".local/lib/wireshark/extcap")
    assert os.access(script, os.X_OK)
    # tshark (Wireshark's own extcap machinery) runs it and lists alice's pods among its interfaces.
    listing = subprocess.run(
        ["tshark", "-D"],
        env=_env(stack, "alice", home),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "podcap_shop_server (shop/server)" in listing.stdout
    assert "podcap_payments_ledger" not in listing.stdout
