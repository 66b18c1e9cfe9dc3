"""Running podcap's own processes (controller, agents, CLI) the way a person would: the installed `podcap` command.

Every process started here is stopped at the end of its test, also when the test fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

PODCAP = str(Path(sys.executable).with_name("podcap"))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_healthy(address: str, process: subprocess.Popen[bytes] | None = None, timeout: float = 20.0) -> None:
    """Waits until the gRPC health service at `address` says SERVING."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"process exited with {process.returncode} before serving on {address}")
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing healthy on {address} after {timeout}s")
            time.sleep(0.1)


def stop(process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM, then SIGKILL if it does not go; always reaped."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def controller(args: Sequence[str], log: Path, env: dict[str, str] | None = None) -> Iterator[str]:
    """Runs `podcap controller --listen 127.0.0.1:PORT ARGS...` and yields its address once healthy."""
    address = f"127.0.0.1:{free_port()}"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [PODCAP, "controller", "--listen", address, *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        try:
            wait_healthy(address, process)
            yield address
        finally:
            stop(process)


def cli(args: Sequence[str], server: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Runs one `podcap` client command against `server` (through PODCAP_SERVER, as a user would)."""
    return subprocess.run(
        [PODCAP, *args],
        env={**os.environ, "PODCAP_SERVER": server},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@contextlib.contextmanager
def spool_root() -> Iterator[Path]:
    """A spool directory that tcpdump can still reach after dropping root (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="podcap-spool-"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
