"""Bursts: many CreateCapture at once across many nodes, request -> RUNNING, against the same calls made serially.

Issue 9: ``--captures`` (200) concurrent CreateCaptures across ``--nodes`` (20) nodes must all end COMPLETED, with a
p99 from request to RUNNING of at most 1 s. A real ``podcap controller`` process (embedded SQLite, or PostgreSQL
with ``--db postgresql``; a static inventory) and ``--nodes`` lab nodes (tests/support/lab.py), each its own netns
with one Calico-style pod and a real ``podcap agent`` process, reached from the root namespace through a
TCP_NODELAY relay (bench.start_latency's ``LabAgent``). Every agent runs with ``--max-concurrent`` equal to what
the burst sends its node (captures / nodes, rounded up): the default of 8 running captures a node would refuse
the 9th and 10th of a node's share with RESOURCE_EXHAUSTED, by design, and the issue asks for all to complete.

After a warm-up (a capture per node), each of ``--runs`` runs, interleaved:

1. serial (the baseline): ``--captures`` CreateCaptures one after another, spread over the nodes in turn;
2. burst: the same number of CreateCaptures fired at once (grpc.aio, one channel, all in flight together).

Each call is timed from sending the request to its answer, which the controller sends once the agent has tcpdump
listening and the capture is RUNNING in SQL (the answer's state is checked). Every capture runs ``--duration``
seconds with a filter, and the bench follows all of them to a terminal state before the next phase: all must be
COMPLETED, with their pcap in the store. The CPU that podcap's processes used from the first request to the last
answer (controller, agents with their reaped tcpdumps, this process with the relays) is reported beside the wall
time: on a machine of 2 CPUs it says how close a phase came to being bound by CPU rather than by waiting.

    python -m bench.burst [--nodes 20] [--captures 200] [--runs 3] [--db sqlite|postgresql] [--write-docs]

``--write-docs`` replaces the "Burst" section of docs/bench.md. Needs root (the lab). Everything it starts
(namespaces, agents, the controller, py-spy with ``--profile``) is torn down at the end, also on failure or
SIGTERM. Exit status 1 if a capture is not COMPLETED, a call failed or answered other than RUNNING, a phase was
not measured, or a burst's p99 is above 1 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import yaml
from google.protobuf.duration_pb2 import Duration

from bench._docs import DOCS, write_section
from bench.start_latency import PORT, LabAgent, machine, pct
from podcap.api.v1 import capture_pb2, capture_pb2_grpc, common_pb2

if TYPE_CHECKING:
    from tests.support.lab import Lab

_HEADING = "## Burst"
_TARGET_P99_S = 1.0
_NAMESPACE = "burst"
_STARTED = {
    common_pb2.CAPTURE_STATE_RUNNING,
    common_pb2.CAPTURE_STATE_UPLOADING,
    common_pb2.CAPTURE_STATE_COMPLETED,
}
_TERMINAL = {
    common_pb2.CAPTURE_STATE_COMPLETED,
    common_pb2.CAPTURE_STATE_FAILED,
    common_pb2.CAPTURE_STATE_CANCELLED,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.burst", description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=20, help="lab nodes, each with one pod and an agent")
    parser.add_argument("--captures", type=int, default=200, help="CreateCaptures per phase")
    parser.add_argument("--runs", type=int, default=3, help="serial + burst pairs, interleaved")
    parser.add_argument("--duration", type=float, default=2.0, help="seconds each capture runs")
    parser.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument(
        "--server", default="postgresql://postgres@127.0.0.1:5432", help="with --db postgresql"
    )
    parser.add_argument("--keep-logs", type=Path, help="copy the controller's and agents' logs here")
    parser.add_argument("--profile", type=Path, help="py-spy binary: record the controller during each burst")
    parser.add_argument("--write-docs", action="store_true", help="update the section in docs/bench.md")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.burst needs root (it builds network namespaces)", file=sys.stderr)
        return 1
    # SIGTERM unwinds like Ctrl-C, so the context managers below tear the lab down.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    load_before = os.getloadavg()
    try:
        result = _run(args)
    except Exception:
        traceback.print_exc()
        print("bench.burst: FAILED, nothing measured (see the traceback above)", file=sys.stderr)
        return 1
    result.load = (load_before, os.getloadavg())
    section = _section(result, args)
    print(section)
    if args.write_docs:
        write_section(_HEADING, section)
        print(f"updated {DOCS}")
    if result.problems:
        print("bench.burst: FAILED: " + "; ".join(result.problems), file=sys.stderr)
    return 0 if not result.problems else 1


# --- the cluster ----------------------------------------------------------------------------------------------


@dataclass
class _Cluster:
    lab: Lab
    controller: str  # address
    controller_pid: int
    pods: list[tuple[str, str]]  # (pod name, node), one per node
    store: Path
    logs: Path
    agent_pids: list[int]


@contextlib.contextmanager
def _cluster(nodes: int, per_node: int, db: str, server: str) -> Iterator[_Cluster]:
    """``nodes`` lab nodes, one pod and one agent each, and a controller; all torn down afterwards."""
    from tests.support.lab import build_lab
    from tests.support.processes import ControllerProcess, spool_root

    with (
        build_lab(nodes=nodes, default_pods=False) as lab,
        spool_root() as spool,
        tempfile.TemporaryDirectory(prefix="podcap-burst-") as scratch,
        _database(db, server, Path(scratch)) as db_url,
    ):
        store, logs = Path(scratch) / "store", Path(scratch) / "logs"
        store.mkdir()
        logs.mkdir()
        pods = []
        for i, node in enumerate(lab.nodes.values(), start=1):
            pod = lab.add_pod(node.name, _NAMESPACE, f"web-{i}", f"10.251.{i}.10")
            pods.append((pod.name, node.name))
        agents: list[LabAgent] = []
        controller: ControllerProcess | None = None
        try:
            for node in lab.nodes.values():
                node_spool = spool / node.name
                node_spool.mkdir()
                node_spool.chmod(0o711)
                node_logs = logs / node.name
                node_logs.mkdir()
                # The node limit admits exactly what the burst sends it (the default is 8 running captures).
                args = ["--max-concurrent", str(per_node)]
                agents.append(LabAgent(lab, node, store, node_spool, node_logs, args))
            with ThreadPoolExecutor(max_workers=8) as pool:  # 20 agents start in ~the time of a few
                list(pool.map(LabAgent.start, agents))
            inventory = {
                "pods": [
                    {"namespace": _NAMESPACE, "name": name, "node": node, "ips": [lab.pods[name].ip]}
                    for name, node in pods
                ],
                "agents": {agent.node.name: agent.address for agent in agents},
            }
            (Path(scratch) / "inventory.yaml").write_text(yaml.safe_dump(inventory))
            controller = ControllerProcess(
                [
                    "--db",
                    db_url,
                    "--store",
                    store.as_uri(),
                    "--inventory",
                    str(Path(scratch) / "inventory.yaml"),
                ],
                logs,
            )
            controller.start()
            assert controller.process is not None
            yield _Cluster(
                lab,
                controller.address,
                controller.process.pid,
                pods,
                store,
                logs,
                [a.process.pid for a in agents if a.process is not None],
            )
        except BaseException:
            if controller is not None:
                print(f"controller log (tail):\n{controller.log()[-3000:]}", file=sys.stderr)
            for agent in agents[:3]:
                print(f"{agent.node.name} agent log (tail):\n{agent.log()[-1500:]}", file=sys.stderr)
            raise
        finally:
            if controller is not None:
                controller.stop()
            with ThreadPoolExecutor(max_workers=8) as pool:
                list(pool.map(LabAgent.close, agents))


@contextlib.contextmanager
def _database(db: str, server: str, scratch: Path) -> Iterator[str]:
    if db == "sqlite":
        yield f"sqlite:///{scratch / 'podcap.db'}"
        return
    from bench.create_capture import _database as fresh_postgres

    with fresh_postgres(server.rstrip("/")) as url:
        yield url


# --- measuring ------------------------------------------------------------------------------------------------


@dataclass
class _Phase:
    kind: str  # "warm-up", "serial" or "burst"
    run: int
    load: float  # 1-minute load average when the phase began
    latencies_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0  # first request sent -> last answer
    ids: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # failed calls, answers not RUNNING
    states: dict[str, int] = field(default_factory=dict)  # final states
    not_completed: list[str] = field(default_factory=list)
    missing_pcaps: int = 0
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds from first request to last answer

    @property
    def name(self) -> str:
        return f"{self.kind} {self.run}"

    def pct(self, q: float) -> float:
        return max(self.latencies_s) if q >= 1 else pct(self.latencies_s, q)


@dataclass
class _Result:
    phases: list[_Phase] = field(default_factory=list)
    machine: str = ""
    problems: list[str] = field(default_factory=list)
    profiles: list[str] = field(default_factory=list)
    load: tuple[tuple[float, float, float], tuple[float, float, float]] = ((0, 0, 0), (0, 0, 0))

    def of(self, kind: str) -> list[_Phase]:
        return [p for p in self.phases if p.kind == kind and p.latencies_s]


def _request(
    i: int, pods: Sequence[tuple[str, str]], duration_s: float, tag: str
) -> capture_pb2.CreateCaptureRequest:
    duration = Duration()
    duration.FromNanoseconds(int(duration_s * 1e9))
    return capture_pb2.CreateCaptureRequest(
        namespace=_NAMESPACE,
        pod=pods[i % len(pods)][0],
        filter=f"udp port {PORT}",
        duration=duration,
        reason=f"bench.burst {tag} {i}",
    )


async def _call(
    stub: capture_pb2_grpc.CaptureServiceStub, request: capture_pb2.CreateCaptureRequest, phase: _Phase
) -> None:
    began = time.perf_counter()
    try:
        capture = await stub.CreateCapture(request, timeout=120)
    except grpc.aio.AioRpcError as exc:
        phase.errors.append(f"{exc.code().name}: {exc.details()}")
        return
    phase.latencies_s.append(time.perf_counter() - began)
    phase.ids.append(capture.id)
    if capture.state not in _STARTED:  # later states only say the answer came late: the p99 shows it
        phase.errors.append(f"{capture.id} answered {common_pb2.CaptureState.Name(capture.state)}")


async def _settle(stub: capture_pb2_grpc.CaptureServiceStub, phase: _Phase, deadline_s: float) -> None:
    """Polls every capture of the phase until all are terminal (or the deadline passes)."""
    pending = set(phase.ids)
    final: dict[str, int] = {}
    loop = asyncio.get_running_loop()
    give_up = loop.time() + deadline_s
    while pending and loop.time() < give_up:
        await asyncio.sleep(0.5)
        for capture_id in list(pending):
            capture = await stub.GetCapture(capture_pb2.GetCaptureRequest(id=capture_id), timeout=30)
            if capture.state in _TERMINAL:
                final[capture_id] = capture.state
                pending.discard(capture_id)
    for capture_id in pending:
        final[capture_id] = common_pb2.CAPTURE_STATE_UNSPECIFIED
    for capture_id, state in final.items():
        name = common_pb2.CaptureState.Name(state).removeprefix("CAPTURE_STATE_")
        phase.states[name] = phase.states.get(name, 0) + 1
        if state != common_pb2.CAPTURE_STATE_COMPLETED:
            phase.not_completed.append(f"{capture_id} {name}")


async def _phase(
    cluster: _Cluster, kind: str, run: int, n: int, duration_s: float, profile: Path | None
) -> _Phase:
    phase = _Phase(kind=kind, run=run, load=os.getloadavg()[0])
    requests = [_request(i, cluster.pods, duration_s, f"{kind}-{run}") for i in range(n)]
    async with grpc.aio.insecure_channel(cluster.controller) as channel:
        stub = capture_pb2_grpc.CaptureServiceStub(channel)
        await channel.channel_ready()
        with _spies(profile, cluster, f"{kind}-{run}"):
            cpu = _cpu(cluster)
            began = time.perf_counter()
            if kind == "burst":
                await asyncio.gather(*(_call(stub, request, phase) for request in requests))
            else:
                for request in requests:
                    await _call(stub, request, phase)
            phase.wall_s = time.perf_counter() - began
            phase.cpu_s = {k: v - cpu[k] for k, v in _cpu(cluster).items()}
        await _settle(stub, phase, deadline_s=duration_s + 120)
    stored = {
        path.parent.name for path in cluster.store.glob("*/*.pcap")
    }  # object key: <capture id>/<pod>.pcap
    phase.missing_pcaps = sum(1 for capture_id in phase.ids if capture_id not in stored)
    return phase


def _cpu(cluster: _Cluster) -> dict[str, float]:
    """CPU seconds so far of the controller, the agents (with their reaped children: setpriv, tcpdump) and
    this process (the client and the relays)."""

    def of(pid: int) -> float:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")

    me = os.times()
    return {
        "controller": of(cluster.controller_pid),
        "agents": sum(of(pid) for pid in cluster.agent_pids),
        "bench": me.user + me.system,
    }


@contextlib.contextmanager
def _spies(py_spy: Path | None, cluster: _Cluster, tag: str) -> Iterator[None]:
    """With a py-spy binary: samples the controller and node-1's agent (every thread, idle ones too) for the
    first 5 s of the block, into the logs directory; they are waited for, or killed, on the way out."""
    if py_spy is None:
        yield
        return
    spies = [
        subprocess.Popen(
            [
                *(str(py_spy), "record", "--pid", str(pid), "--duration", "5", "--format", "raw", "--idle"),
                *("--threads", "--nonblocking", "--output", str(cluster.logs / f"{name}-{tag}.txt")),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, pid in (("controller", cluster.controller_pid), ("agent-1", cluster.agent_pids[0]))
    ]
    try:
        yield
        for spy in spies:
            spy.wait(timeout=60)
    finally:
        for spy in spies:
            if spy.poll() is None:
                spy.kill()
                spy.wait()


def _run(args: argparse.Namespace) -> _Result:
    result = _Result(machine=machine())
    per_node = math.ceil(args.captures / args.nodes)
    with _cluster(args.nodes, per_node, args.db, args.server) as cluster:

        async def measure() -> None:
            # Warm-up: a capture per node, so channels are connected and every agent has resolved its pod once.
            warm = await _phase(cluster, "warm-up", 0, args.nodes, 0.5, None)
            if warm.errors or warm.not_completed:
                raise RuntimeError(f"warm-up failed: {warm.errors[:3]} {warm.not_completed[:3]}")
            for run in range(1, args.runs + 1):
                for kind in ("serial", "burst"):
                    profile = args.profile if kind == "burst" else None
                    phase = await _phase(cluster, kind, run, args.captures, args.duration, profile)
                    result.phases.append(phase)
                    print(_progress(phase), flush=True)

        try:
            asyncio.run(measure())
        finally:
            if args.keep_logs is not None:
                shutil.copytree(cluster.logs, args.keep_logs, dirs_exist_ok=True)
    _judge(result, args)
    return result


def _progress(phase: _Phase) -> str:
    if not phase.latencies_s:
        return f"{phase.name}: no call succeeded ({phase.errors[:3]})"
    cpu = ", ".join(f"{k} {v:.2f}" for k, v in phase.cpu_s.items())
    return (
        f"{phase.name}: p50 {phase.pct(0.5) * 1000:.0f} ms, p99 {phase.pct(0.99) * 1000:.0f} ms, "
        f"errors {len(phase.errors)}, states {phase.states}, load {phase.load:.2f}, wall {phase.wall_s:.2f} s, "
        f"CPU s {cpu}"
    )


def _judge(result: _Result, args: argparse.Namespace) -> None:
    n = args.captures
    for phase in result.phases:
        if len(phase.latencies_s) != n:
            result.problems.append(f"{phase.name}: {len(phase.latencies_s)} of {n} calls answered")
        if phase.errors:
            result.problems.append(f"{phase.name}: {len(phase.errors)} calls failed, e.g. {phase.errors[0]}")
        if phase.not_completed:
            result.problems.append(
                f"{phase.name}: {len(phase.not_completed)} captures not COMPLETED, e.g. {phase.not_completed[0]}"
            )
        if phase.missing_pcaps:
            result.problems.append(f"{phase.name}: {phase.missing_pcaps} pcaps missing from the store")
        if phase.kind == "burst" and phase.latencies_s and phase.pct(0.99) > _TARGET_P99_S:
            result.problems.append(
                f"{phase.name}: p99 {phase.pct(0.99):.2f} s, above the {_TARGET_P99_S:g} s target"
            )
    if len(result.of("burst")) != args.runs or len(result.of("serial")) != args.runs:
        result.problems.append("a phase was not measured")


# --- the report -----------------------------------------------------------------------------------------------


def _spread(values: Sequence[float], scale: float = 1000.0, fmt: str = ".0f") -> str:
    """median (min-max) over the runs."""
    if not values:
        return "not measured"
    v = [x * scale for x in values]
    return f"{statistics.median(v):{fmt}} ({min(v):{fmt}}-{max(v):{fmt}})"


def _section(r: _Result, args: argparse.Namespace) -> str:
    command = "sudo .venv/bin/python -m bench.burst"
    if (args.nodes, args.captures, args.runs, args.duration) != (20, 200, 3, 2.0):
        command += f" --nodes {args.nodes} --captures {args.captures} --runs {args.runs} --duration {args.duration:g}"
    if args.db != "sqlite":
        command += f" --db {args.db}"
    serial, burst = r.of("serial"), r.of("burst")
    pairs = [(s, b) for s in serial for b in burst if s.run == b.run]

    def at(phases: list[_Phase], q: float) -> list[float]:
        return [p.pct(q) for p in phases]

    def ratio(q: float) -> list[float]:
        return [b.pct(q) / s.pct(q) for s, b in pairs]

    def cpu_share(p: _Phase) -> float:
        return sum(p.cpu_s.values()) / (p.wall_s * (os.cpu_count() or 1)) if p.wall_s else 0.0

    rows = [
        ("serial (the baseline): p50", at(serial, 0.5), 1000.0, ".1f"),
        ("serial: p99", at(serial, 0.99), 1000.0, ".1f"),
        ("serial: max", at(serial, 1.0), 1000.0, ".1f"),
        (f"**burst, {args.captures} at once: p50**", at(burst, 0.5), 1000.0, ".0f"),
        ("**burst: p99**", at(burst, 0.99), 1000.0, ".0f"),
        ("burst: max", at(burst, 1.0), 1000.0, ".0f"),
        ("burst: first request → last answer", [p.wall_s for p in burst], 1000.0, ".0f"),
    ]
    lines = ["| request → RUNNING | ms, median (min-max) over the runs |", "| --- | ---: |"]
    lines += [f"| {label} | {_spread(values, scale, fmt)} |" for label, values, scale, fmt in rows]
    lines += [
        f"| ratio burst / serial, p50 | {_spread(ratio(0.5), 1.0, '.0f')}x |",
        f"| ratio burst / serial, p99 | {_spread(ratio(0.99), 1.0, '.0f')}x |",
    ]
    per_run = [
        f"| {p.name} | {p.load:.2f} | {p.pct(0.5) * 1000:.1f} | {p.pct(0.99) * 1000:.1f} | "
        f"{p.pct(1.0) * 1000:.1f} | {p.wall_s:.2f} | {p.cpu_s.get('controller', 0):.1f} / "
        f"{p.cpu_s.get('agents', 0):.1f} / {p.cpu_s.get('bench', 0):.1f} ({cpu_share(p):.0%}) | "
        f"{', '.join(f'{k} {v}' for k, v in sorted(p.states.items()))} | {len(p.errors)} |"
        for p in r.phases
        if p.latencies_s
    ]
    worst = max(at(burst, 0.99)) if burst else float("nan")
    verdict = "met" if burst and worst <= _TARGET_P99_S and not r.problems else "**missed**"
    if len(burst) != args.runs:
        verdict = "**not measured**"
    problems = "\n\n**Problems:** " + "; ".join(r.problems) + "." if r.problems else ""
    db = "embedded SQLite" if args.db == "sqlite" else "PostgreSQL on the same host"
    (before, after) = r.load
    per_node = math.ceil(args.captures / args.nodes)
    machine_only = r.machine.split("; load average")[0]  # the load is given below, before and after
    return f"""{_HEADING}

{args.captures} concurrent `CreateCapture` across {args.nodes} nodes (issue 9; target: all COMPLETED, p99 request →
RUNNING at most {_TARGET_P99_S:g} s). A real `podcap controller` process ({db}, a static inventory) and {args.nodes}
lab nodes, each its own netns with one Calico-style pod and a real `podcap agent` process (`--max-concurrent
{per_node}`, what the burst sends a node: past the default of 8 a node refuses with RESOURCE_EXHAUSTED), reached
through TCP_NODELAY relays. Each of {args.runs} runs makes, interleaved, {args.captures} calls one after another (the
baseline), then the same {args.captures} all at once from one grpc.aio channel; every capture (filter `udp port
{PORT}`, {args.duration:g} s) is followed to a terminal state before the next phase. Latency: request sent → answer
(RUNNING: tcpdump listening on the node and the state in SQL).

Machine: {machine_only}; load average (1/5/15 min) {before[0]:.1f}/{before[1]:.1f}/{before[2]:.1f} before,
{after[0]:.1f}/{after[1]:.1f}/{after[2]:.1f} after (other work shares these CPUs).

{chr(10).join(lines)}

Target: worst burst p99 {worst * 1000:.0f} ms: {verdict}.{problems}

| phase | load (1 min) at start | p50 ms | p99 ms | max ms | first request → last answer, s | CPU s: controller / agents / bench (share of {os.cpu_count()} CPUs) | final states | failed calls |
| --- | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: |
{chr(10).join(per_run)}

What the burst waits for (py-spy on the controller and node-1's agent, `--profile`): the agents are mostly idle,
and so is a good part of the controller's event loop; the controller's SQL is not. Embedded SQLite takes one
writer at a time (BEGIN IMMEDIATE), so the controller uses one connection and every transaction of every call
queues for it: each CreateCapture makes four (the audit row, the capture, the agent's answer, the read that
builds the reply) and the follower of each capture more. While calls run serially a transaction holds the
connection for about a millisecond; in a burst, with the agents' tcpdumps, fsyncs and Python on the same
{os.cpu_count()} CPUs, it holds it several times longer (the committing fsync and the thread's wait for a CPU and
for the GIL), and the last answer comes when every transaction of the burst has had its turn. Before this
benchmark, the extra connections of the pool slept in SQLite's busy handler instead (polls of up to 100 ms), and
each node started its captures one at a time.

Reproduce: `{command}` (add `--write-docs` to rewrite this section; `--db postgresql` for PostgreSQL at
`--server`; `--profile PATH_TO_PY_SPY` records the controller and node-1's agent during each burst, with
`--keep-logs DIR` to keep what it wrote).
"""


if __name__ == "__main__":
    raise SystemExit(main())
