"""No shell, ever, and no user text as a tcpdump option: every program the agent runs, as the kernel saw it.

A real `podcap agent` runs in a lab node under strace (`-f`, execve only), so every program it or any child of it
executes is recorded with its exact argv, whichever code path started it. Captures are asked for through
AgentService, as the controller does, with filters that compile, filters that look like shell, filters that try
to be tcpdump options, and shell in pod names, namespaces, pod interfaces and capture ids. The trace must show only
the programs the agent is meant to run (setpriv, tcpdump, tshark), never a shell, each run by its absolute path
at the first attempt (no PATH search) and tcpdump and tshark only through setpriv, with the exact options that
confine them; every tcpdump gets the user's filter as one argument after `--` and nothing of the user's text
before it, so a filter with tokens starting with `-` (`len - 54 > 0`) is filter text and captures, while text that
tries to be tcpdump options, like any other filter that does not compile, is refused with INVALID_ARGUMENT
before any program runs; and none of the files the hostile text would create ever exists.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

import podcap.agent
from podcap.api.v1 import agent_pb2, common_pb2
from tests.support.agents import NodeAgent, tcpdumps_writing_into, wait_for
from tests.support.lab import Lab
from tests.support.processes import spool_root

pytestmark = pytest.mark.netns

PORT = 8080
COMPLETED, FAILED = common_pb2.CAPTURE_STATE_COMPLETED, common_pb2.CAPTURE_STATE_FAILED
# What the agent runs: itself (the first execve, by strace), and setpriv, which starts tcpdump to capture and tshark
# to summarise. Nothing else: not ldconfig either (ctypes.util.find_library would run it to find libpcap, with which
# the agent checks filters; the agent loads libpcap by its soname). The network context of each capture reads the node's NAT rules, conntrack
# table and IPVS services with their own tools (capture-agent/_context.py), found at the start as the others are.
# The per-end exchanges (capture-agent/_exchanges.py) run pyshark in a child of the agent's own interpreter, the
# fixed script _dissect.py, under tshark's launcher; its tshark inherits that confinement.
CONTEXT_TOOLS = {"iptables-save", "ip6tables-save", "conntrack", "ipvsadm"}
DISSECT = Path(podcap.agent.__file__).resolve().parent / "_dissect.py"
ALLOWED = {"podcap", "setpriv", "tcpdump", "tshark", Path(sys.executable).name, *CONTEXT_TOOLS}
# setpriv's options for each program it starts, exactly: tcpdump as the tcpdump user with CAP_NET_RAW alone, ended
# with SIGINT (it flushes) if the agent dies; tshark, which parses what pods sent, as that user with no capability.
LAUNCHERS = {
    "tcpdump": [
        "--pdeathsig=INT",
        "--reuid=tcpdump",
        "--regid=tcpdump",
        "--clear-groups",
        "--inh-caps=-all,+net_raw",
        "--ambient-caps=-all,+net_raw",
        "--bounding-set=-all,+net_raw",
        "--no-new-privs",
    ],
    "tshark": [
        "--pdeathsig=KILL",
        "--reuid=tcpdump",
        "--regid=tcpdump",
        "--clear-groups",
        "--inh-caps=-all",
        "--ambient-caps=-all",
        "--bounding-set=-all",
        "--no-new-privs",
    ],
    # The node's NAT rules, conntrack table and IPVS services: CAP_NET_ADMIN (and NET_RAW for legacy iptables).
    **{
        tool: [
            "--pdeathsig=KILL",
            "--reuid=tcpdump",
            "--regid=tcpdump",
            "--clear-groups",
            "--inh-caps=-all,+net_admin,+net_raw",
            "--ambient-caps=-all,+net_admin,+net_raw",
            "--bounding-set=-all,+net_admin,+net_raw",
            "--no-new-privs",
        ]
        for tool in CONTEXT_TOOLS
    },
}
SHELLS = {"sh", "bash", "dash", "zsh", "ksh", "busybox", "env", "python", "python3"}
# tcpdump's own options as the agent builds them, each with whether it takes a value.
TCPDUMP_OPTIONS = {
    "-i": True,
    "-w": True,
    "-U": False,
    "-n": False,
    "-s": True,
    "-c": True,
    "-B": True,
}
# The options of a capture with the node's default limits, in order (docs/capture-fidelity.md says why: no
# --immediate-mode, packet-buffered output, a 32 MiB kernel buffer, whole packets).
DEFAULT_CAPTURE = ["-i", "-w", "-U", "-n", "-s", "262144", "-B", "32768"]
_EXECVE = re.compile(r'^(\d+) +execve\("((?:\\x[0-9a-f]{2})*)", \[(.*?)\](.*)$')
_STRING = re.compile(r'"((?:\\x[0-9a-f]{2})*)"')
# A fork's result: on its own line, or on the `<... clone3 resumed>` line when another syscall came in between.
_FORK = re.compile(r"^(\d+) +(?:<\.\.\. )?(?:clone3?|v?fork)(?: resumed>|\().* = (\d+)$")


@dataclass
class Exec:
    pid: int
    path: str
    argv: list[str]
    ok: bool  # the program ran (execvp also tries, and fails on, every PATH entry before the right one)


def _decode(hexed: str) -> str:
    return bytes.fromhex(hexed.replace("\\x", "")).decode("utf-8", "surrogateescape")


def parse_trace(text: str) -> tuple[list[Exec], dict[int, int]]:
    """Every execve strace recorded (with -xx every string is hex-escaped, so nothing is ambiguous), with whether
    it succeeded: on the same line, or on the `<... execve resumed>` line of its pid when another process's
    syscall came in between; and the parent of every process forked (child pid -> parent pid)."""
    execs: list[Exec] = []
    parents: dict[int, int] = {}
    unfinished: dict[int, Exec] = {}
    for line in text.splitlines():
        assert "execveat(" not in line, line
        if (fork := _FORK.match(line)) is not None:
            parents[int(fork[2])] = int(fork[1])
            continue
        if "execve resumed>" in line:
            pid = int(line.split()[0])
            unfinished.pop(pid).ok = line.rstrip().endswith("= 0")
            continue
        if "execve(" not in line:
            continue
        match = _EXECVE.match(line)
        assert match is not None, f"unparsed execve line: {line}"
        assert not match[4].startswith("..."), f"strace shortened an argv: {line}"
        argv = [_decode(s) for s in _STRING.findall(match[3])]
        execs.append(Exec(int(match[1]), _decode(match[2]), argv, line.rstrip().endswith("= 0")))
        if line.rstrip().endswith("<unfinished ...>"):
            unfinished[execs[-1].pid] = execs[-1]
    return execs, parents


def _is_dissect(e: Exec) -> bool:
    """The exchanges' pyshark child: this interpreter, isolated (-I), running the fixed script with tshark's path."""
    return (
        len(e.argv) == 4
        and Path(e.path).name == Path(sys.executable).name
        and e.argv[1] == "-I"
        and Path(e.argv[2]).resolve() == DISSECT
        and Path(e.argv[3]).name == "tshark"
    )


def _descends(pid: int, ancestors: set[int], parents: dict[int, int]) -> bool:
    while pid in parents:
        pid = parents[pid]
        if pid in ancestors:
            return True
    return False


def _strace_works() -> str | None:
    if shutil.which("strace") is None:
        return "needs strace (apt-get install strace)"
    done = subprocess.run(
        ["strace", "-f", "-qq", "-e", "trace=execve", "-o", "/dev/null", "true"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return None if done.returncode == 0 else f"strace cannot trace here: {done.stderr.strip()}"


@contextlib.contextmanager
def traced_agent(lab: Lab, spool: Path, tmp_path: Path) -> Iterator[tuple[NodeAgent, Path]]:
    """An agent in node-2 whose every execve, and its children's, strace writes to the returned file.

    Leaving the block stops the agent with SIGTERM (strace itself passes no signal on) and waits for strace to
    end with it, so the trace is complete when the block is left normally.
    """
    if (problem := _strace_works()) is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(problem, pytrace=False)
        pytest.skip(problem)
    trace = tmp_path / "execve.trace"
    prefix = ["strace", "-f", "-qq", "--seccomp-bpf", "-xx", "-s", "65536"]
    prefix += ["-e", "trace=execve,execveat,clone,clone3,fork,vfork", "-o", str(trace), "--"]
    agent = NodeAgent(
        lab, lab.nodes["node-2"], f"file://{tmp_path / 'store'}", spool, tmp_path, prefix=prefix
    )
    strace = None
    try:
        agent.start()
        strace = agent.process
        assert strace is not None
        yield agent, trace
    finally:
        tracees = []
        if strace is not None:
            with contextlib.suppress(OSError):
                tracees = Path(f"/proc/{strace.pid}/task/{strace.pid}/children").read_text().split()
        for pid in tracees:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGTERM)
        if strace is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                strace.wait(timeout=30)
        agent.close()
        for pid in tracees:  # strace killed by close() would have let its tracee run on
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


@pytest.fixture
def markers() -> Iterator[list[Path]]:
    """Files that hostile text would create if anything ran it; none may exist at the end."""
    made: list[Path] = []
    yield made
    for path in made:
        path.unlink(missing_ok=True)


def _marker(markers: list[Path], what: str) -> Path:
    path = Path(f"/tmp/podcap-pwned-{what}-{secrets.token_hex(4)}")
    markers.append(path)
    return path


def _request(
    capture_id: str, ip: str, filter_expr: str, seconds: float = 1, **pod: str
) -> agent_pb2.StartCaptureRequest:
    duration = Duration()
    duration.FromTimedelta(timedelta(seconds=seconds))
    interface = pod.pop("interface", "")
    return agent_pb2.StartCaptureRequest(
        capture_id=capture_id,
        pod=agent_pb2.PodRef(
            namespace=pod.get("namespace", "shop"), name=pod.get("name", "server"), ips=[ip]
        ),
        filter=filter_expr,
        duration=duration,
        object_key=f"{capture_id}.pcap".replace("/", "_"),
        pod_interface=interface,
    )


def _refused(agent: NodeAgent, request: agent_pb2.StartCaptureRequest) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as refused:
        agent.stub.StartCapture(request, timeout=15)
    return refused.value.code(), refused.value.details() or ""


def _check_tcpdump_argv(argv: list[str], interface: str, spool: Path, filters: set[str]) -> str:
    """tcpdump's argv is the agent's fixed options, `--`, then at most one argument: one of `filters`."""
    assert Path(argv[0]).is_absolute() and Path(argv[0]).name == "tcpdump", argv
    cut = argv.index("--")
    assert [a for a in argv[1:cut] if a.startswith("-") or a in DEFAULT_CAPTURE] == DEFAULT_CAPTURE, argv
    i = 1
    while i < cut:
        option = argv[i]
        assert option in TCPDUMP_OPTIONS, f"unexpected tcpdump option {option!r} in {argv}"
        if TCPDUMP_OPTIONS[option]:
            value = argv[i + 1]
            if option == "-i":
                assert value == interface, argv
            elif option == "-w":
                assert value.startswith(f"{spool}/") and value.endswith("/capture.pcap"), argv
            else:
                assert value.isdigit(), argv
            i += 1
        i += 1
    rest = argv[cut + 1 :]
    assert len(rest) <= 1, f"more than one argument after --: {argv}"
    assert not rest or rest[0] in filters, f"tcpdump got a filter nobody sent: {argv}"
    return rest[0] if rest else ""


def test_the_agent_never_runs_a_shell_and_never_hands_user_text_to_tcpdump_as_an_option(
    lab: Lab, tmp_path: Path, markers: list[Path]
) -> None:
    server = lab.pods["server"]
    lab.http_server(server.netns, PORT)
    evil = Path(f"/tmp/podcap-evil-{secrets.token_hex(4)}.sh")
    evil_ran = _marker(markers, "evil-script")
    markers.append(evil)
    evil.write_text(f"#!/bin/sh\ntouch {evil_ran}\n")
    evil.chmod(0o755)

    compiling = [
        f"tcp port {PORT}",
        "host 10.1.2.3 and not port 22",
        f"tcp\nport {PORT}",  # a newline is whitespace to libpcap
        "len - 54 > 0",  # arithmetic: a token starting with '-' that is filter text
        f"tcp port {PORT} and (((ip[2:2] - ((ip[0]&0xf)<<2)) - ((tcp[12]&0xf0)>>2)) != 0)",  # tcpdump(8)
    ]
    option_like = [
        f"-z {evil}",
        f"tcp -z {evil} -C 1",
        "port 80 -w /etc/cron.d/podcap",
        "-Z root tcp",
        "tcp --",
    ]
    shell_like = [
        f"$(touch {_marker(markers, 'subst')})",
        f"`touch {_marker(markers, 'backtick')}`",
        f"tcp; touch {_marker(markers, 'semicolon')}",
        f"tcp | touch {_marker(markers, 'pipe')}",
        f"tcp\ntouch {_marker(markers, 'newline')}",
        f"tcp && $(touch {_marker(markers, 'and')})",
    ]
    hostile_pod = {
        "name": f"$(touch {_marker(markers, 'pod')})",
        "namespace": f"`touch {_marker(markers, 'namespace')}`",
    }
    hostile_id = f"-z;`touch {_marker(markers, 'capture-id')}`"

    with spool_root() as spool, traced_agent(lab, spool, tmp_path) as (agent, trace):
        started = []
        for n, filter_expr in enumerate(compiling):
            agent.stub.StartCapture(_request(f"ok-{n}", server.ip, filter_expr, **hostile_pod), timeout=15)
            started.append(f"ok-{n}")
        assert lab.http_get(lab.pods["client"].netns, f"http://{server.ip}:{PORT}/hello.txt") == 200

        for n, filter_expr in enumerate(option_like):
            code, details = _refused(agent, _request(f"dash-{n}", server.ip, filter_expr))
            assert code == grpc.StatusCode.INVALID_ARGUMENT, details
            assert details.startswith("the filter does not compile: "), details
        for n, filter_expr in enumerate(shell_like):
            code, details = _refused(agent, _request(f"shell-{n}", server.ip, filter_expr))
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert details.startswith("the filter does not compile: "), details
        code, details = _refused(agent, _request(hostile_id, server.ip, "tcp"))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        for n, interface in enumerate(["$(id)", f"eth0;touch {_marker(markers, 'iface')}", "-i"]):
            code, details = _refused(agent, _request(f"iface-{n}", server.ip, "tcp", interface=interface))
            assert code == grpc.StatusCode.INVALID_ARGUMENT, details

        ended = [wait_for(agent, capture_id) for capture_id in started]
        assert [c.state for c in ended] == [COMPLETED] * len(started), [c.error for c in ended]
        assert ended[0].stats.packets > 0 and ended[0].summary.error == ""  # tshark summarised it
        assert tcpdumps_writing_into(spool) == []

    execs, parents = parse_trace(trace.read_text())
    programs = [Path(e.path).name for e in execs]  # tried or run
    assert programs[0] == "podcap"
    assert set(programs) <= ALLOWED, f"the agent ran {set(programs) - ALLOWED}"
    dissects = {e.pid for e in execs if _is_dissect(e)}
    assert dissects, "the trace covers the exchanges' pyshark child too"
    others = [e for e in execs if e.pid not in dissects]
    assert (
        not ({Path(e.path).name for e in others} | {Path(e.argv[0]).name for e in others if e.argv}) & SHELLS
    )
    assert "tshark" in programs  # the trace covers the summary's programs too
    # Absolute paths, found when the agent started: no exec searched PATH (execvp would try each entry in turn).
    assert all(e.ok and Path(e.path).is_absolute() and e.argv[0] == e.path for e in execs[1:]), [
        (e.path, e.ok) for e in execs if not e.ok or not Path(e.path).is_absolute()
    ]

    filters_seen = []
    launched: dict[int, Exec] = {}  # pid -> its setpriv, until setpriv execs the program it confines
    for e in execs[1:]:
        assert e.pid != execs[0].pid, e  # the agent itself never execs again: every program runs in a child
        if Path(e.path).name == "setpriv":
            assert e.pid not in launched, e  # setpriv execs its program before anything else happens in it
            launched[e.pid] = e
            continue
        setpriv = launched.pop(e.pid, None)  # the same process, so the confinement setpriv set up is in force
        if setpriv is None:  # only pyshark's tshark, a descendant of the confined child, which it inherits
            assert Path(e.path).name == "tshark" and _descends(e.pid, dissects, parents), e
            assert not any(text in arg for text in compiling for arg in e.argv), e.argv
            continue
        cut = setpriv.argv.index("--")
        assert setpriv.argv[cut + 1 :] == e.argv, (setpriv.argv, e.argv)
        name = "tshark" if e.pid in dissects else Path(e.path).name  # the child runs under tshark's launcher
        assert setpriv.argv[1:cut] == LAUNCHERS[name], setpriv.argv
        if e.pid in dissects:
            continue
        if Path(e.path).name == "tcpdump":
            filters_seen.append(_check_tcpdump_argv(e.argv, server.host_if, spool, set(compiling)))
        else:  # tshark: a fixed argv, the pcap on stdin
            assert not any(text in arg for text in compiling for arg in e.argv), e.argv
    assert launched == {}, launched  # every setpriv ran its program
    # Every compiling filter reached tcpdump, as its last argument; no other text of the caller reached anything.
    assert sorted(filters_seen) == sorted(compiling)
    everything = "\0".join(arg for e in execs for arg in e.argv)
    for text in [*option_like, *shell_like, *hostile_pod.values(), hostile_id]:
        assert text not in everything
    assert [path for path in markers if path.exists()] == [evil]  # only the script we wrote ourselves
