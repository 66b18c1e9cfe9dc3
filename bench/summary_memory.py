"""Node memory when many captures end together: the agent's summaries share one node-wide limit (issue 9).

Each capture's pcap is summarised by tshark processes of ~160 MB plus ~0.6 KB a packet of their chunk, so what
bounds a node's memory is how many of them run at once, not how many captures there are. This benchmark puts
``--captures`` stored pcaps (``--packets`` packets each, the traffic of bench/summary.py) in a fresh spool and
measures, in a child process, the peak resident memory of that process plus all its descendants (sampled from
/proc every 20 ms), and the time until every summary is made:

* podcap: the real ``CaptureManager`` recovers the spool (each entry is a stored capture waiting for its
  summary, as after a restart), so every summary is queued at the same moment, as when captures end together;
  the node's limit (``Limits.summary_tsharks``, default 2) applies.
* baseline: what the agent did before, one ``summarise()`` per capture, all at once (2 tsharks each).

For 1 capture and for ``--captures``, interleaved, ``--runs`` times. The figure to read is the ratio of the
peaks (many captures / one): bounded means about 1, whatever the number of captures.

    python -m bench.summary_memory [--captures 10] [--packets 300000] [--runs 3] [--write-docs]

``--write-docs`` replaces the "Node memory of summaries" section of docs/bench.md. Exit status 1 if podcap's peak
with many captures is above 1.5 times its peak with one, if a summary is not READY, or nothing was sampled.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from bench._docs import DOCS, write_section
from bench.summary import _write_capture

_HEADING = "## Node memory of summaries"
_BOUNDED = 1.5


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.summary_memory", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--captures", type=int, default=10)
    parser.add_argument("--packets", type=int, default=300_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "COUNT", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        mode, count, directory = args.child
        return _child(mode, int(count), Path(directory))

    load_before = os.getloadavg()
    results: dict[tuple[str, int], list[tuple[float, float]]] = {}
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="podcap-bench-memory-") as tmp:
        pcap = Path(tmp) / "source.pcap"
        _write_capture(pcap, args.packets)
        size = pcap.stat().st_size
        print(f"pcap of {args.packets:,} packets, {size / 1e6:.0f} MB", flush=True)
        for run in range(args.runs):
            for count in (1, args.captures):
                for mode in ("podcap", "baseline"):
                    peak_mb, seconds, problem = _measure(
                        mode, count, pcap, Path(tmp) / f"run-{run}-{mode}-{count}"
                    )
                    results.setdefault((mode, count), []).append((peak_mb, seconds))
                    print(
                        f"run {run + 1} {mode:8} {count:2} captures: peak {peak_mb:6.0f} MB, {seconds:5.1f} s",
                        flush=True,
                    )
                    if problem:
                        problems.append(f"{mode} with {count}: {problem}")
    load = (load_before[0], os.getloadavg()[0])
    section, bounded = _section(results, args, size, load, problems)
    print(section)
    if args.write_docs:
        write_section(_HEADING, section)
        print(f"updated {DOCS}")
    return 0 if bounded and not problems else 1


def _measure(mode: str, count: int, pcap: Path, directory: Path) -> tuple[float, float, str]:
    """Peak RSS (MB) of the child and its descendants, its summarising time, and what went wrong if anything."""
    spool = directory / "spool"
    for i in range(count):
        entry = spool / f"capture-{i}"
        entry.mkdir(parents=True)
        os.link(pcap, entry / "capture.pcap")  # the same bytes, no extra disk
    child = subprocess.Popen(
        [sys.executable, "-m", "bench.summary_memory", "--child", mode, str(count), str(directory)],
        stdout=subprocess.PIPE,
        text=True,
    )
    peak = _sample_peak(child)
    out, _ = child.communicate()
    if child.returncode != 0 or not out.strip():
        return peak / 1024, 0.0, f"the child failed (exit {child.returncode})"
    report = json.loads(out.strip().splitlines()[-1])
    problem = "" if report["ready"] == count else f"{count - report['ready']} summaries not READY"
    if peak == 0:
        problem = "no memory was sampled"
    return peak / 1024, report["seconds"], problem


def _sample_peak(child: subprocess.Popen[str]) -> int:
    """The largest sum of VmRSS (KiB) over the child and its descendants, sampled until it exits."""
    peak = 0
    while child.poll() is None:
        peak = max(peak, _tree_rss_kib(child.pid))
        time.sleep(0.02)
    return peak


def _tree_rss_kib(root: int) -> int:
    parents: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_text()
            except OSError:
                continue
            parents[int(name)] = int(stat.rpartition(")")[2].split()[1])
    tree, grew = {root}, True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= more
        grew = bool(more)
    total = 0
    for pid in tree:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def _child(mode: str, count: int, directory: Path) -> int:
    spool = directory / "spool"
    pcaps = sorted(spool.glob("*/capture.pcap"))
    started = time.monotonic()
    ready = asyncio.run(_podcap(spool, directory / "store", count)) if mode == "podcap" else _baseline(pcaps)
    print(json.dumps({"seconds": time.monotonic() - started, "ready": ready}))
    return 0


def _stored_entries(spool: Path) -> list[str]:
    """Makes each spool directory a stored capture waiting for its summary; returns their capture ids."""
    from podcap.agent._model import CaptureSpec
    from podcap.agent._resolve import Resolution

    now = datetime.now(UTC).isoformat()
    ids = []
    for entry in sorted(spool.iterdir()):
        spec = CaptureSpec(entry.name, ("10.0.0.1",), "", 10.0, f"{entry.name}.pcap")
        resolution = Resolution(
            interface="bench0",
            ifindex=2,
            strategy="bench",
            netns="",
            pod_interface="eth0",
            pod_ifindex=2,
            pod_mac="",
            pod_ip="10.0.0.1",
        )
        pcap_size = (entry / "capture.pcap").stat().st_size
        records = {
            "capture.json": {"spec": asdict(spec), "resolution": asdict(resolution), "started_at": now},
            "ended.json": {"packets": 0, "packets_received": 0, "kernel_drops": 0, "ended_at": now},
            "stored.json": {"key": spec.object_key, "size": pcap_size, "sha256": "0" * 64},
        }
        for name, record in records.items():
            (entry / name).write_text(json.dumps(record, default=list))
        ids.append(entry.name)
    return ids


async def _podcap(spool: Path, store: Path, count: int) -> int:
    from podcap.agent._captures import CaptureManager
    from podcap.agent._model import JobState
    from podcap.agent._resolve import Resolver
    from podcap.agent._spool import Spool
    from podcap.agent._summary import SummaryState
    from podcap.storage import open_store

    ids = _stored_entries(spool)
    assert len(ids) == count
    manager = CaptureManager(
        resolver=Resolver(node_name="bench"), store=open_store(f"file://{store}"), spool=Spool(spool)
    )
    await manager.recover()
    finals = []
    for capture_id in ids:
        async for snapshot in manager.watch(capture_id):
            final = snapshot
        finals.append(final)
    await manager.shutdown(5)
    return sum(
        f.state == JobState.COMPLETED and f.summary is not None and f.summary.state == SummaryState.READY
        for f in finals
    )


def _baseline(pcaps: list[Path]) -> int:
    from podcap.agent._summary import summarise

    results: list[bool] = []

    def one(pcap: Path) -> None:
        results.append(not summarise(pcap).error)

    threads = [threading.Thread(target=one, args=(pcap,)) for pcap in pcaps]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(results)


def _section(
    results: dict[tuple[str, int], list[tuple[float, float]]],
    args: argparse.Namespace,
    size: int,
    load: tuple[float, float],
    problems: list[str],
) -> tuple[str, bool]:
    def span(values: list[float], unit: str, digits: int = 0) -> str:
        return f"{min(values):.{digits}f}-{max(values):.{digits}f} {unit}"

    many = args.captures
    rows = []
    ratios: dict[str, list[float]] = {}
    for mode in ("podcap", "baseline"):
        one = [peak for peak, _ in results[(mode, 1)]]
        lots = [peak for peak, _ in results[(mode, many)]]
        ratios[mode] = [b / a for a, b in zip(one, lots, strict=True) if a]
        rows.append(
            f"| {mode} | {span(one, 'MB')} | {span(lots, 'MB')} | {span(ratios[mode], 'x', 2)} | "
            f"{span([s for _, s in results[(mode, 1)]], 's', 1)} | {span([s for _, s in results[(mode, many)]], 's', 1)} |"
        )
    bounded = bool(ratios["podcap"]) and max(ratios["podcap"]) <= _BOUNDED
    verdict = "bounded" if bounded else "NOT bounded"
    if problems:
        bounded, verdict = False, "NOT MEASURED (a run failed; the figures above are not to be trusted)"
    notes = "; ".join(problems) if problems else "every summary READY"
    table = "\n".join(rows)
    return (
        f"""{_HEADING}

`python -m bench.summary_memory --write-docs` (also part of `make bench`): peak resident memory of the agent
process and all its children (tshark) while the summaries of {many} captures that ended together are made,
against one capture, {args.runs} interleaved runs; each pcap {args.packets:,} packets ({size / 1e6:.0f} MB, the traffic
of bench/summary.py). podcap: the real `CaptureManager` with the node-wide limit (`--summary-tsharks`, default
2: one summary at a time, its chunks two tsharks at a time, in a low-priority thread). Baseline: one `summarise()`
per capture, all at once, as the agent did before.

Machine: {os.cpu_count()} CPUs, Linux {platform.release()}; load average {load[0]:.1f} before, {load[1]:.1f} after.

| | peak, 1 capture | peak, {many} captures | {many} / 1 | time, 1 | time, {many} |
| --- | --- | --- | --- | --- | --- |
{table}

podcap's peak is {verdict} (target: {many} captures at most {_BOUNDED}x one capture's peak); {notes}. The price
of the bound is that summaries wait their turn: they never delay the pcap, which is COMPLETED and downloadable
before its summary is made (its summary state is PENDING meanwhile).
""",
        bounded,
    )


if __name__ == "__main__":
    sys.exit(main())
