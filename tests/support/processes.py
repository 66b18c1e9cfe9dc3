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


def channel(
    address: str, credentials: grpc.ChannelCredentials | None = None, server_name: str = ""
) -> grpc.Channel:
    """A blocking channel to one of our servers: plaintext, or TLS checking the server's name `server_name`."""
    if credentials is None:
        return grpc.insecure_channel(address)
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.secure_channel(address, credentials, options=options)


def wait_healthy(
    address: str,
    process: subprocess.Popen[bytes] | None = None,
    timeout: float = 20.0,
    credentials: grpc.ChannelCredentials | None = None,
    server_name: str = "",
) -> None:
    """Waits until the gRPC health service at `address` says SERVING (over TLS when given `credentials`)."""
    deadline = time.monotonic() + timeout
    with channel(address, credentials, server_name) as health_channel:
        stub = health_pb2_grpc.HealthStub(health_channel)
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


class ControllerProcess:
    """`podcap controller --listen 127.0.0.1:PORT ARGS...`, which a test may kill and start again on one port."""

    def __init__(self, args: Sequence[str], log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.address = f"127.0.0.1:{free_port()}"
        self._args, self._log_dir, self._env = list(args), log_dir, env or {}
        if not {"--auth-tokens", "--auth-kubernetes", "--no-auth"} & set(self._args):
            self._args.append("--no-auth")  # tests about other things run the loopback-only open mode
        self.process: subprocess.Popen[bytes] | None = None
        self._starts = 0

    def start(self) -> None:
        self._starts += 1
        with (self._log_dir / f"controller-{self._starts}.log").open("wb") as out:
            self.process = subprocess.Popen(
                [PODCAP, "controller", "--listen", self.address, *self._args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self._env},
            )
        wait_healthy(self.address, self.process)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def log(self) -> str:
        return "\n".join(
            p.read_text(errors="replace") for p in sorted(self._log_dir.glob("controller-*.log"))
        )

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)


@contextlib.contextmanager
def controller(args: Sequence[str], log_dir: Path, env: dict[str, str] | None = None) -> Iterator[str]:
    """Runs a controller for the duration of the block and yields its address once healthy."""
    process = ControllerProcess(args, log_dir, env)
    try:
        process.start()
        yield process.address
    finally:
        process.stop()


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
