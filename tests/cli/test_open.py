"""A completed capture, for real (an agent's tcpdump in a lab node, a controller on the embedded defaults), seen
through the CLI: `podcap open` with and without Wireshark on PATH, and `-o yaml` against `-o json` and the text.

The Wireshark here is a stand-in script on PATH that records its argv: Wireshark is not our component.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path

import pytest
import yaml

from tests.cli._run import run
from tests.e2e import conftest as e2e
from tests.e2e.conftest import Stack

# the e2e stack's fixtures, here on the embedded defaults only
stack, spool, controller_flags, services = e2e.stack, e2e.spool, e2e.controller_flags, e2e.services

pytestmark = [
    pytest.mark.netns,
    pytest.mark.parametrize("stack", ["localdir-sqlite-static"], indirect=True),  # the embedded defaults
]

PORT = 8080


def _completed_capture(stack: Stack, home: Path) -> dict:  # type: ignore[type-arg]
    lab = stack.lab
    server = lab.pods["server"]
    lab.http_server(server.netns, PORT)
    env = {"PODCAP_SERVER": stack.server}
    started = run(
        ["capture", "shop/server", "--filter", f"tcp port {PORT}", "--duration", "3s", "-o", "json"],
        home,
        env,
    )
    assert started.returncode == 0, started.stderr
    capture_id = json.loads(started.stdout)["id"]
    time.sleep(0.5)
    for _ in range(5):
        lab.http_get(lab.pods["client"].netns, f"http://{server.ip}:{PORT}/")
    stopped = run(["stop", capture_id, "--wait", "-o", "json"], home, env)
    assert stopped.returncode == 0, stopped.stderr
    shown = json.loads(stopped.stdout)
    assert shown["state"] == "COMPLETED" and shown["packets"] > 0, shown
    return shown  # type: ignore[no-any-return]


def _fake_wireshark(bin_dir: Path, record: Path) -> None:
    bin_dir.mkdir()
    script = bin_dir / "wireshark"
    script.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {record}.part && mv {record}.part {record}\n')
    script.chmod(0o755)


def test_open_starts_wireshark_on_the_downloaded_capture_else_says_how(stack: Stack, tmp_path: Path) -> None:
    capture = _completed_capture(stack, tmp_path)
    cache = tmp_path / "cache"
    record = tmp_path / "wireshark-argv"
    _fake_wireshark(tmp_path / "bin", record)
    env = {
        "PODCAP_SERVER": stack.server,
        "XDG_CACHE_HOME": str(cache),
        "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
    }
    done = run(["open", capture["id"][:8]], tmp_path, env)
    assert done.returncode == 0, done.stderr
    path = cache / "podcap" / f"{capture['id']}.pcap"
    assert done.stdout.splitlines()[0] == str(path)
    assert "opened in Wireshark" in done.stdout
    assert hashlib.sha256(path.read_bytes()).hexdigest() == capture["sha256"]
    deadline = time.monotonic() + 10
    while not record.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert record.read_text().splitlines() == ["-r", str(path)]

    # Without Wireshark: the path and the command to open it.
    path.unlink()
    env["PATH"] = str(tmp_path / "empty")
    done = run(["open", capture["id"], "--target", "0"], tmp_path, env)
    assert done.returncode == 0, done.stderr
    path = cache / "podcap" / f"{capture['id']}-0.pcap"
    assert done.stdout.splitlines() == [
        str(path),
        f"Wireshark is not on PATH; open the capture where it is installed with: wireshark -r {path}",
    ]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == capture["sha256"]


def test_yaml_is_the_json_structure_and_text_is_for_people(stack: Stack, tmp_path: Path) -> None:
    capture = _completed_capture(stack, tmp_path)
    env = {"PODCAP_SERVER": stack.server}
    for command in (["get", capture["id"]], ["list"]):
        as_json = run([*command, "-o", "json"], tmp_path, env)
        as_yaml = run([*command, "-o", "yaml"], tmp_path, env)
        assert as_json.returncode == as_yaml.returncode == 0, as_json.stderr + as_yaml.stderr
        assert yaml.safe_load(as_yaml.stdout) == json.loads(as_json.stdout)
        assert not as_yaml.stdout.lstrip().startswith(("{", "["))

    text = run(["get", capture["id"]], tmp_path, env).stdout
    # sizes in powers of 1024, times local with an age
    assert re.search(r"kernel drops \d+, \d+(\.\d)? (B|KiB|MiB)\n", text), text
    assert re.search(r"created: \d{4}-\d\d-\d\d \d\d:\d\d:\d\d \((\d+s|\d+m) ago\)", text), text
    listing = run(["list"], tmp_path, env).stdout
    assert re.search(rf"{capture['id']}.*COMPLETED.*(B|KiB|MiB)\s+\d{{4}}-\d\d-\d\d .* ago\)", listing), (
        listing
    )
