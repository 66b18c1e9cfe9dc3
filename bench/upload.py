"""Ready when capture ends: from tcpdump's exit to a stored, downloadable pcap, against boto3 (issue 9).

The agent uploads the spool file while tcpdump still writes it, so what is left to send when the capture ends
is the last part or so, whatever the capture's size. This benchmark runs the real ``GrowingFileUploader`` (with
the real S3 store, in a child process of its own: the agent) following a file that this process appends to at
a steady ``--rate`` in 64 KiB writes (tcpdump's part), then ends the "capture" and times capture end →
stored object. The baseline is what an engineer would do by hand: a plain boto3 ``upload_file`` (threaded
multipart, boto3's defaults) of the same finished file, timed from start to end in a child of its own. Both go
to a moto server (``moto[server]``, S3 over HTTP on 127.0.0.1), interleaved, ``--runs`` times (the order
alternates), and both children's CPU seconds are measured (``getrusage``, all threads).

    python -m bench.upload [--size 512] [--rate 64] [--runs 3] [--write-docs]

``--size`` and ``--rate`` are in MB (10^6 bytes) and MB/s. The default (512 MB at 64 MB/s, three times) takes
about a minute on a quiet 2-core machine; ``--size 1000`` takes two to three (moto alone needs 4-12 s to
complete each 1 GB upload, as it assembles the object in memory). ``--write-docs`` replaces the "Ready when capture ends"
section of docs/bench.md. Targets, for every run: podcap ready within 1 s plus what was not yet stored at
capture end divided by the store's bandwidth (measured by the baseline), and never slower than the baseline.
Exit status 1 if a target is missed, a stored object differs from the file, or a figure was not measured.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench._docs import DOCS, write_section
from podcap.agent._priority import BACKGROUND_NICE

_HEADING = "## Ready when capture ends"
_BUCKET = "podcap-bench-upload"
_WRITE = 64 << 10  # tcpdump's writes, about
_SLACK_S = 1.0  # the fixed part of the target


@dataclass(frozen=True)
class _Run:
    podcap_s: float  # capture end -> stored
    podcap_complete_s: float  # of which in Upload.complete(): the last parts, the store's completion
    backlog: int  # bytes not yet in stored parts when the capture ended
    podcap_cpu: float
    baseline_s: float  # boto3 upload_file of the finished file, start to end
    completion_s: float  # of which the store took to complete the multipart upload
    baseline_cpu: float

    def target_s(self, size: int) -> float:
        """1 s, plus the backlog at the store's bandwidth, plus the store's own completion of the object."""
        bandwidth = size / (self.baseline_s - self.completion_s)
        return _SLACK_S + self.backlog / bandwidth + self.completion_s


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.upload", description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=512, help="MB per capture (default 512)")
    parser.add_argument("--rate", type=float, default=64.0, help="MB/s the capture grows at (default 64)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--write-docs", action="store_true", help="update the section in docs/bench.md")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "PATH", "KEY"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        mode, path, key = args.child
        return _child(mode, Path(path), key)

    size = args.size * 1_000_000
    load_before = os.getloadavg()
    runs: list[_Run] = []
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="podcap-bench-upload-") as tmp, _MotoServer(Path(tmp)) as server:
        source = Path(tmp) / "source.pcap"
        digest = _write_source(source, size)
        print(f"moto server at {server.endpoint}; source file of {size / 1e6:.0f} MB", flush=True)
        for run in range(args.runs):
            order = ("podcap", "baseline") if run % 2 == 0 else ("baseline", "podcap")
            figures: dict[str, float] = {}
            for mode in order:
                spool = Path(tmp) / f"spool-{run}.pcap"
                try:
                    if mode == "podcap":
                        figures |= _podcap(server, source, spool, size, args.rate, digest, run)
                    else:
                        figures |= _baseline(server, source, size, digest, run)
                except _Failed as exc:
                    problems.append(f"run {run + 1} {mode}: {exc}")
                finally:
                    spool.unlink(missing_ok=True)
            if len(figures) < 7:
                continue
            r = _Run(
                podcap_s=figures["podcap_s"],
                podcap_complete_s=figures["podcap_complete_s"],
                backlog=int(figures["backlog"]),
                podcap_cpu=figures["podcap_cpu"],
                baseline_s=figures["baseline_s"],
                completion_s=figures["completion_s"],
                baseline_cpu=figures["baseline_cpu"],
            )
            runs.append(r)
            print(
                f"run {run + 1}: podcap {r.podcap_s:5.2f} s after capture end, {r.podcap_complete_s:4.2f} s of "
                f"it in complete() ({r.backlog / 1e6:.0f} MB not yet stored at the end; target "
                f"{r.target_s(size):4.2f} s), boto3 upload_file {r.baseline_s:5.2f} s "
                f"(the store's completion {r.completion_s:4.2f} s); ratio {r.podcap_s / r.baseline_s:4.2f}; "
                f"CPU {r.podcap_cpu:4.1f} s vs {r.baseline_cpu:4.1f} s",
                flush=True,
            )
    if len(runs) < args.runs and not problems:
        problems.append(f"only {len(runs)} of {args.runs} runs measured")
    load = (load_before[0], os.getloadavg()[0])
    section, met = _section(runs, args, size, load, problems)
    print(section)
    if args.write_docs:
        write_section(_HEADING, section)
        print(f"updated {DOCS}")
    return 0 if met else 1


class _Failed(Exception):
    """A run that produced no trustworthy figure."""


class _MotoServer:
    """moto in server mode on a free port of 127.0.0.1, with the bucket; ``env`` points boto3 at it."""

    def __init__(self, directory: Path) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{port}"
        self.env = {
            **os.environ,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        self._log = directory / "moto.log"
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> _MotoServer:
        with self._log.open("wb") as log:
            self._process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "moto.server",
                    "-H",
                    "127.0.0.1",
                    "-p",
                    self.endpoint.rsplit(":", 1)[1],
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline or self._process.poll() is not None:
                    self.__exit__()
                    raise RuntimeError(f"moto server did not start; see {self._log}") from None
                time.sleep(0.05)
        self.client().create_bucket(Bucket=_BUCKET)
        return self

    def __exit__(self, *_: object) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)

    def client(self) -> Any:
        import boto3

        return boto3.session.Session(
            aws_access_key_id="bench", aws_secret_access_key="bench", region_name="us-east-1"
        ).client("s3", endpoint_url=self.endpoint)


def _write_source(path: Path, size: int) -> str:
    """A file of ``size`` random-looking bytes (a 64 MiB random block, repeated); returns its sha256."""
    block = os.urandom(64 << 20)
    digest = hashlib.sha256()
    with path.open("wb") as out:
        for offset in range(0, size, len(block)):
            piece = block[: min(len(block), size - offset)]
            out.write(piece)
            digest.update(piece)
    return digest.hexdigest()


def _podcap(
    server: _MotoServer, source: Path, spool: Path, size: int, rate_mb: float, digest: str, run: int
) -> dict[str, float]:
    """Seconds from capture end to stored, the bytes not yet stored at the end, the agent's CPU seconds."""
    key = f"podcap/run-{run}.pcap"
    child = subprocess.Popen(
        [sys.executable, "-m", "bench.upload", "--child", "podcap", str(spool), key],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=server.env,
    )
    assert child.stdin is not None and child.stdout is not None
    if child.stdout.readline().strip() != "ready":  # the store is open, the uploader follows the spool
        child.kill()
        child.wait()
        raise _Failed("the agent child did not start")
    # What S3 holds is asked just before the last write, so that the question does not delay the end.
    ended, stored = _grow(source, spool, rate_mb * 1e6, lambda: _stored_part_bytes(server, f"bench/{key}"))
    child.stdin.write("end\n")
    child.stdin.flush()
    backlog = size - stored
    out, _ = child.communicate(timeout=600)
    report = _report(child.returncode, out)
    _check(server, f"bench/{key}", size, digest, report)
    return {
        "podcap_s": report["stored_at"] - ended,
        "podcap_complete_s": report["complete"],
        "backlog": backlog,
        "podcap_cpu": report["cpu"],
    }


def _grow(source: Path, spool: Path, rate: float, before_last: Callable[[], int]) -> tuple[float, int]:
    """Append ``source`` to ``spool`` at ``rate`` bytes/s in tcpdump-sized writes, calling ``before_last``
    before the last one; returns the time of the end and what ``before_last`` returned."""
    last = (source.stat().st_size - 1) // _WRITE * _WRITE
    with source.open("rb") as src, spool.open("wb") as out:
        started = time.monotonic()
        written = 0
        while chunk := src.read(_WRITE):
            if written == last:
                answer = before_last()
            out.write(chunk)
            out.flush()
            written += len(chunk)
            ahead = written / rate - (time.monotonic() - started)
            if ahead > 0 and written < last:
                time.sleep(ahead)
    return time.monotonic(), answer


def _stored_part_bytes(server: _MotoServer, s3_key: str) -> int:
    """The bytes in the parts S3 holds for the upload to ``s3_key`` now (0 if it has completed already)."""
    client = server.client()
    for upload in client.list_multipart_uploads(Bucket=_BUCKET).get("Uploads", []):
        if upload["Key"] == s3_key:
            parts = client.list_parts(Bucket=_BUCKET, Key=s3_key, UploadId=upload["UploadId"])
            return sum(part["Size"] for part in parts.get("Parts", []))
    return 0


def _baseline(server: _MotoServer, source: Path, size: int, digest: str, run: int) -> dict[str, float]:
    """boto3's seconds start to end, of which the store's completion of the upload, and its CPU seconds."""
    key = f"baseline/run-{run}.pcap"
    child = subprocess.run(
        [sys.executable, "-m", "bench.upload", "--child", "baseline", str(source), key],
        stdout=subprocess.PIPE,
        text=True,
        env=server.env,
        timeout=600,
        check=False,
    )
    report = _report(child.returncode, child.stdout)
    _check(server, key, size, digest, {**report, "sha256": digest})
    return {
        "baseline_s": report["seconds"],
        "completion_s": report["completion"],
        "baseline_cpu": report["cpu"],
    }


def _report(returncode: int, out: str) -> dict[str, Any]:
    lines = out.strip().splitlines()
    if returncode != 0 or not lines:
        raise _Failed(f"the child failed (exit {returncode})")
    report: dict[str, Any] = json.loads(lines[-1])
    return report


def _check(server: _MotoServer, s3_key: str, size: int, digest: str, report: dict[str, Any]) -> None:
    """The object is there with the file's size, the recorded sha256 is the file's; then it is deleted."""
    client = server.client()
    stored = client.head_object(Bucket=_BUCKET, Key=s3_key)["ContentLength"]
    client.delete_object(Bucket=_BUCKET, Key=s3_key)  # moto keeps objects in memory
    if stored != size:
        raise _Failed(f"the object holds {stored} bytes, the file {size}")
    if report["sha256"] != digest:
        raise _Failed("the recorded sha256 is not the file's")


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _child(mode: str, path: Path, key: str) -> int:
    if mode == "baseline":
        client = _boto3_client()
        # How long the store takes to complete the multipart upload: its own work on the whole object (moto
        # assembles it in memory then), which no client can do faster.
        calls: dict[str, float] = {}
        events = client.meta.events
        events.register(
            "before-call.s3.CompleteMultipartUpload", lambda **_: calls.update(start=time.monotonic())
        )
        events.register(
            "after-call.s3.CompleteMultipartUpload", lambda **_: calls.update(end=time.monotonic())
        )
        started, cpu = time.monotonic(), _cpu()
        client.upload_file(str(path), _BUCKET, key)
        seconds, cpu = time.monotonic() - started, _cpu() - cpu
        completion = calls["end"] - calls["start"]
        print(json.dumps({"seconds": seconds, "cpu": cpu, "completion": completion}))
        return 0
    print(json.dumps(asyncio.run(_follow(path, key))))
    return 0


def _boto3_client() -> Any:
    import boto3

    return boto3.session.Session().client("s3")


class _TimedStore:
    """The object store seam around the real store, timing how long its uploads' ``complete()`` takes."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.url = store.url
        self.complete_s = 0.0

    def open_upload(self, key: str) -> _TimedUpload:
        return _TimedUpload(self._store.open_upload(key), self)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


class _TimedUpload:
    def __init__(self, upload: Any, store: _TimedStore) -> None:
        self._upload = upload
        self._store = store

    def write(self, data: bytes) -> None:
        self._upload.write(data)

    def complete(self) -> Any:
        started = time.monotonic()
        try:
            return self._upload.complete()
        finally:
            self._store.complete_s = time.monotonic() - started

    def abort(self) -> None:
        self._upload.abort()


async def _follow(path: Path, key: str) -> dict[str, Any]:
    from podcap.agent._priority import CpuPacer
    from podcap.agent._upload import GrowingFileUploader
    from podcap.storage import open_store

    store = _TimedStore(open_store(f"s3://{_BUCKET}/bench"))
    loop = asyncio.get_running_loop()
    done = asyncio.Event()

    def wait_for_end() -> None:
        sys.stdin.readline()
        loop.call_soon_threadsafe(done.set)

    cpu = _cpu()
    threading.Thread(target=wait_for_end, daemon=True).start()
    uploader = GrowingFileUploader(store, key, path, pacer=CpuPacer())  # paced, as the agent runs it
    upload = asyncio.create_task(uploader.run(done))
    print("ready", flush=True)
    stored = await upload
    return {
        "stored_at": time.monotonic(),
        "cpu": _cpu() - cpu,
        "sha256": stored.sha256,
        "complete": store.complete_s,
    }


def _section(
    runs: list[_Run], args: argparse.Namespace, size: int, load: tuple[float, float], problems: list[str]
) -> tuple[str, bool]:
    def span(values: list[float], unit: str, digits: int = 2) -> str:
        return f"{min(values):.{digits}f}-{max(values):.{digits}f}{unit}" if values else "not measured"

    gb = size / 1e9
    ratios = [r.podcap_s / r.baseline_s for r in runs]
    missed = [
        f"run {i + 1}: {r.podcap_s:.2f} s, target {r.target_s(size):.2f} s"
        for i, r in enumerate(runs)
        if r.podcap_s > r.target_s(size)
    ]
    slower = [f"run {i + 1}: {ratio:.2f}x" for i, ratio in enumerate(ratios) if ratio > 1]
    met = bool(runs) and not problems and not missed and not slower
    if problems:
        verdict = "NOT MEASURED (a run failed; do not trust the figures): " + "; ".join(problems)
    elif met:
        verdict = "met in every run"
    else:
        verdict = "MISSED: " + "; ".join(missed + [f"slower than boto3 in {s}" for s in slower])
    rows = "\n".join(
        f"| {i + 1} | {r.podcap_s:.2f} s | {r.podcap_complete_s:.2f} s | {r.backlog / 1e6:.0f} MB | "
        f"{r.target_s(size):.2f} s | "
        f"{r.baseline_s:.2f} s | {r.completion_s:.2f} s | {r.podcap_s / r.baseline_s:.2f} | "
        f"{r.podcap_cpu / gb:.1f} s | {r.baseline_cpu / gb:.1f} s |"
        for i, r in enumerate(runs)
    )
    completions = [r.completion_s for r in runs]
    return (
        f"""{_HEADING}

`python -m bench.upload --write-docs` (also part of `make bench`): a {size / 1e6:.0f} MB capture growing at
{args.rate:.0f} MB/s in 64 KiB writes, followed by the agent's real `GrowingFileUploader` and S3 store (8 MiB parts,
four in flight, the uploader's threads at nice {BACKGROUND_NICE} and lowest best-effort IO, paced to a tenth of a core
while the CPU is contended and the file grows, as in the agent), against a plain boto3
`upload_file` of the finished file (threaded multipart, boto3's defaults, normal priority), each in a child
process, to a moto server over HTTP on 127.0.0.1; {args.runs} interleaved runs. podcap is timed from the
capture's end (the last write) to the stored object (`CompleteMultipartUpload` answered: downloadable), boto3
from start to end.

Machine: {os.cpu_count()} CPUs, Linux {platform.release()}, shared with other work; load average {load[0]:.1f} before, {load[1]:.1f} after.

| run | podcap: capture end → stored | of which `complete()` | not yet stored at end | target | boto3 `upload_file` | of which the store's completion | podcap / boto3 | podcap CPU/GB | boto3 CPU/GB |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |
{rows}

podcap / boto3: {span(ratios, "")}. Targets, for every run: ready within {_SLACK_S:.0f} s, plus what S3 did not hold in
parts at capture end divided by the store's bandwidth (the baseline's, without its completion), plus the
store's own completion of the object (boto3's `CompleteMultipartUpload`, {span(completions, " s")}: moto
assembles the whole object in memory then, so it grows with the size; no client can do it faster); and never
slower than boto3. {verdict}.

CPU is the child process's (all threads) per GB; podcap's includes following the file while it grows and one
SHA-256 pass more than boto3 (the object's digest, recorded in SQL), the bytes read once. podcap's uploader
runs at nice {BACKGROUND_NICE} by design (tcpdump first) and the baseline at nice 0, so on a machine busy with other work
podcap yields and the baseline does not: read the figures with the load average.
""",
        met,
    )


if __name__ == "__main__":
    sys.exit(main())
