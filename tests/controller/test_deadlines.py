"""Nothing the controller waits on can hang it: a broken agent, a locked database, a SIGTERM mid-call.

The broken agent is a plain TCP listener that accepts connections and never says a word (not our component: a
peer that froze, a black-holed node). The controller must give up on it at `--agent-call-timeout` with a
documented code, and keep answering everyone else meanwhile. A table lock held by someone else in PostgreSQL
must fail requests with UNAVAILABLE after the lock timeout rather than pile them up, and the controller must
serve again once the lock goes. On SIGTERM, open streams and calls in flight end with a status, and the process
exits 0 within its grace period, without a traceback.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import psycopg
import pytest
from google.protobuf.duration_pb2 import Duration

from podcap.api.v1 import capture_pb2, capture_pb2_grpc, common_pb2
from tests.support.processes import ControllerProcess

INVENTORY = """
pods:
  - namespace: shop
    name: checkout-7d9f
    node: node-1
    ips: [10.251.1.10]
agents:
  node-1: {agent}
"""


class SilentPeer:
    """Accepts TCP connections on 127.0.0.1 and never reads or writes: an agent that hangs."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self.accepted: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="silent-peer", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                connection, _ = self._listener.accept()
                self.accepted.append(connection)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for connection in self.accepted:
            connection.close()
        self._listener.close()


@pytest.fixture
def silent_peer() -> Iterator[SilentPeer]:
    peer = SilentPeer()
    try:
        yield peer
    finally:
        peer.close()


@contextlib.contextmanager
def _running(process: ControllerProcess) -> Iterator[ControllerProcess]:
    try:
        process.start()
        yield process
    finally:
        process.stop()


def _controller(tmp_path: Path, agent: str, db_url: str, *extra: str) -> ControllerProcess:
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(INVENTORY.format(agent=agent))
    args = ["--db", db_url, "--store", f"file://{tmp_path / 'store'}", "--inventory", str(inventory), *extra]
    return ControllerProcess(args, tmp_path)


def _create_request(seconds: int = 30) -> capture_pb2.CreateCaptureRequest:
    return capture_pb2.CreateCaptureRequest(
        namespace="shop", pod="checkout-7d9f", filter="tcp port 443", duration=Duration(seconds=seconds)
    )


def _timed(call: Callable[[], object]) -> tuple[float, object]:
    """How long `call` took, and what it returned or the RpcError it raised."""
    started = time.monotonic()
    try:
        result = call()
    except grpc.RpcError as exc:
        result = exc
    return time.monotonic() - started, result


def _wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout}s")
        time.sleep(0.05)


def _assert_clean_log(process: ControllerProcess) -> None:
    log = process.log()
    assert "Traceback" not in log, log[-4000:]


def test_an_agent_that_hangs_does_not_hang_the_controller(tmp_path: Path, silent_peer: SilentPeer) -> None:
    db = f"sqlite:///{tmp_path / 'podcap.db'}"
    with (
        _running(_controller(tmp_path, silent_peer.address, db, "--agent-call-timeout", "2s")) as process,
        grpc.insecure_channel(process.address) as channel,
        ThreadPoolExecutor(max_workers=1) as pool,
    ):
        stub = capture_pb2_grpc.CaptureServiceStub(channel)
        create = pool.submit(_timed, lambda: stub.CreateCapture(_create_request(), timeout=60))
        _wait_until(lambda: silent_peer.accepted, 10, "the controller dialling the agent")

        # While the controller waits for the agent, it answers everyone else at once, and says where it is.
        listed_in, listed = _timed(lambda: stub.ListCaptures(capture_pb2.ListCapturesRequest(), timeout=10))
        assert isinstance(listed, capture_pb2.ListCapturesResponse), listed
        assert listed_in < 1.5
        assert not create.done(), "the agent answered? it was not supposed to"
        assert [c.state for c in listed.captures] == [common_pb2.CAPTURE_STATE_PENDING]
        capture_id = listed.captures[0].id
        got_in, got = _timed(
            lambda: stub.GetCapture(capture_pb2.GetCaptureRequest(id=capture_id), timeout=10)
        )
        assert isinstance(got, capture_pb2.Capture), got
        assert got_in < 1.5 and got.state == common_pb2.CAPTURE_STATE_PENDING

        took, failure = create.result(timeout=30)
        assert isinstance(failure, grpc.RpcError), failure
        assert failure.code() == grpc.StatusCode.UNAVAILABLE, failure.details()
        assert silent_peer.address in failure.details()
        assert 1.5 < took < 10, f"CreateCapture took {took:.1f}s with a 2s agent call timeout"

        # The capture says why it failed, and the controller is still fine.
        got = stub.GetCapture(capture_pb2.GetCaptureRequest(id=capture_id), timeout=10)
        assert got.state == common_pb2.CAPTURE_STATE_FAILED
        assert silent_peer.address in got.targets[0].error
    assert process.process is not None and process.process.returncode == 0
    _assert_clean_log(process)


def test_a_locked_table_fails_requests_with_unavailable_and_they_recover(
    tmp_path: Path, postgres_url: str
) -> None:
    with (
        _running(_controller(tmp_path, "127.0.0.1:9", postgres_url)) as process,
        grpc.insecure_channel(process.address) as channel,
    ):
        stub = capture_pb2_grpc.CaptureServiceStub(channel)
        assert list(stub.ListCaptures(capture_pb2.ListCapturesRequest(), timeout=10).captures) == []

        with psycopg.connect(postgres_url) as locker:
            locker.execute("LOCK TABLE captures IN ACCESS EXCLUSIVE MODE")  # held until the block ends
            took, failure = _timed(lambda: stub.ListCaptures(capture_pb2.ListCapturesRequest(), timeout=60))
            assert isinstance(failure, grpc.RpcError), failure
            assert failure.code() == grpc.StatusCode.UNAVAILABLE, failure.details()
            assert "lock timeout" in failure.details()
            assert took < 15, f"ListCaptures waited {took:.1f}s on the lock"
            locker.rollback()

        took, listed = _timed(lambda: stub.ListCaptures(capture_pb2.ListCapturesRequest(), timeout=10))
        assert isinstance(listed, capture_pb2.ListCapturesResponse), listed
        assert took < 2
        assert process.process is not None and process.process.poll() is None


def test_sigterm_ends_open_streams_and_calls_and_exits_cleanly(
    tmp_path: Path, silent_peer: SilentPeer
) -> None:
    """A watcher of a PENDING capture and the CreateCapture still waiting for its (hung) agent, at SIGTERM."""
    db = f"sqlite:///{tmp_path / 'podcap.db'}"
    process = _controller(tmp_path, silent_peer.address, db, "--agent-call-timeout", "60s")
    with (
        _running(process),
        grpc.insecure_channel(process.address) as channel,
        ThreadPoolExecutor(max_workers=2) as pool,
    ):
        stub = capture_pb2_grpc.CaptureServiceStub(channel)
        create = pool.submit(_timed, lambda: stub.CreateCapture(_create_request(), timeout=90))
        _wait_until(lambda: silent_peer.accepted, 10, "the controller dialling the agent")
        capture_id = stub.ListCaptures(capture_pb2.ListCapturesRequest(), timeout=10).captures[0].id
        watch = stub.WatchCapture(capture_pb2.WatchCaptureRequest(id=capture_id), timeout=90)
        first = next(watch)
        assert first.state == common_pb2.CAPTURE_STATE_PENDING

        def rest_of_watch() -> list[capture_pb2.Capture]:
            return list(watch)

        watched = pool.submit(_timed, rest_of_watch)
        assert process.process is not None
        signalled = time.monotonic()
        process.process.send_signal(signal.SIGTERM)
        code = process.process.wait(timeout=30)
        exited_in = time.monotonic() - signalled

        # Both get the grace period (5 s) to finish, then UNAVAILABLE: a client retries elsewhere.
        _, ended = watched.result(timeout=30)
        assert isinstance(ended, grpc.RpcError), f"the watch ended without a status: {ended}"
        assert ended.code() == grpc.StatusCode.UNAVAILABLE, ended.details()
        _, failure = create.result(timeout=30)
        assert isinstance(failure, grpc.RpcError), failure
        assert failure.code() == grpc.StatusCode.UNAVAILABLE, failure.details()
    assert code == 0
    assert exited_in < 12, f"the controller took {exited_in:.1f}s to stop (grace 5s)"
    _assert_clean_log(process)
