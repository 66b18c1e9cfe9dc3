"""Bad input on CreateCapture: the documented status code, a message a person understands, and nothing stored.

A real controller process (static inventory, SQLite, local directory store) answers real gRPC calls; no agent is
needed because every case here must be refused before any agent is asked.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf.duration_pb2 import Duration

from podcap.api.v1 import capture_pb2, capture_pb2_grpc, common_pb2
from tests.support.processes import cli, controller, free_port

INVENTORY = """
pods:
  - namespace: shop
    name: checkout-7d9f
    node: node-1
    ips: [10.251.1.10]
agents:
  node-1: 127.0.0.1:{agent_port}
"""


@pytest.fixture
def offline(tmp_path: Path) -> Iterator[tuple[capture_pb2_grpc.CaptureServiceStub, str, sa.Engine]]:
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(INVENTORY.format(agent_port=free_port()))
    db = f"sqlite:///{tmp_path / 'podcap.db'}"
    args = ["--db", db, "--store", f"file://{tmp_path / 'store'}", "--inventory", str(inventory)]
    with controller([*args, "--max-duration", "60s"], tmp_path) as address:
        engine = sa.create_engine(db)
        with grpc.insecure_channel(address) as channel:
            yield capture_pb2_grpc.CaptureServiceStub(channel), address, engine
        engine.dispose()


def _create(stub: capture_pb2_grpc.CaptureServiceStub, **fields: object) -> grpc.RpcError:
    body: dict[str, object] = {"namespace": "shop", "pod": "checkout-7d9f", "filter": "tcp port 443"}
    body.update(fields)
    if "duration" not in body:
        body["duration"] = Duration(seconds=5)
    with pytest.raises(grpc.RpcError) as failure:
        stub.CreateCapture(capture_pb2.CreateCaptureRequest(**body), timeout=10)  # type: ignore[arg-type]
    return failure.value


def _stored(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM captures")).scalar_one())


def _duration(delta: timedelta) -> Duration:
    d = Duration()
    d.FromTimedelta(delta)
    return d


def test_unknown_pod_is_not_found_and_named(
    offline: tuple[capture_pb2_grpc.CaptureServiceStub, str, sa.Engine],
) -> None:
    stub, _, engine = offline
    error = _create(stub, pod="nope-123")
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "shop/nope-123" in error.details()
    assert _stored(engine) == 0


@pytest.mark.parametrize(
    ("bad_filter", "says"),
    [
        ("tcp prot 443", "syntax error"),
        ("port 99999", "illegal port number"),
        ("host 10.0.0.1 and (", "syntax error"),
    ],
)
def test_filter_that_does_not_compile_is_refused_with_libpcaps_message(
    offline: tuple[capture_pb2_grpc.CaptureServiceStub, str, sa.Engine], bad_filter: str, says: str
) -> None:
    stub, _, engine = offline
    error = _create(stub, filter=bad_filter)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "does not compile" in error.details() and says in error.details()
    assert _stored(engine) == 0


@pytest.mark.parametrize("bad_filter", ["-z /tmp/evil.sh", "tcp port 80 -w /tmp/x.pcap", "--help"])
def test_option_like_text_is_refused_as_a_filter_that_does_not_compile(
    offline: tuple[capture_pb2_grpc.CaptureServiceStub, str, sa.Engine], bad_filter: str
) -> None:
    stub, _, engine = offline
    error = _create(stub, filter=bad_filter)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "does not compile" in error.details()
    assert _stored(engine) == 0


# The EXAMPLES of pcap-filter(7) and tcpdump(8), host and network names replaced by addresses (this machine
# resolves no names), and the expressions the review found refused for a token starting with '-'.
MAN_PAGE_FILTERS = [
    "host 10.0.0.1",
    "host 10.0.0.2 and ( 10.0.0.3 or 10.0.0.4 )",
    "ip host 10.0.0.4 and not 10.0.0.2",
    "net 128.32.0.0/16",
    # `gateway snup` needs a name for both the MAC and the address: spelled out as pcap-filter(7) defines it.
    "ether host 02:00:00:00:00:01 and not host 10.0.0.5 and (port ftp or ftp-data)",
    "ip and not net 10.0.0.0/8",
    "tcp[tcpflags] & (tcp-syn|tcp-fin) != 0 and not src and dst net 10.0.0.0/8",
    "tcp port 80 and (((ip[2:2] - ((ip[0]&0xf)<<2)) - ((tcp[12]&0xf0)>>2)) != 0)",
    "ether host 02:00:00:00:00:01 and ip[2:2] > 576",
    "ether[0] & 1 = 0 and ip[16] >= 224",
    "icmp[icmptype] != icmp-echo and icmp[icmptype] != icmp-echoreply",
    "len - 54 > 0",
    "ip[2:2] - 20 > 1000",
    "tcp[13] & 0x02 != 0 and ip[8] - 1 < 64",
]


@pytest.mark.parametrize("good_filter", MAN_PAGE_FILTERS)
def test_the_man_pages_examples_are_accepted(
    offline: tuple[capture_pb2_grpc.CaptureServiceStub, str, sa.Engine], good_filter: str
) -> None:
    """Offline there is no agent, so an accepted filter gets past validation to the pod lookup (NOT_FOUND)."""
    stub, _, _ = offline
    error = _create(stub, filter=good_filter)
    assert "filter" not in error.details(), error.details()
    assert error.code() != grpc.StatusCode.INVALID_ARGUMENT, error.details()


@pytest.mark.parametrize(
    ("duration", "says"),
    [
        (None, "duration must be above zero"),
        (timedelta(0), "duration must be above zero"),
        (timedelta(seconds=-5), "duration must be above zero"),
        (timedelta(seconds=61), "above this controller's cap of 60s"),
    ],
)
def test_duration_out_of_range_is_refused(
    offline: tuple[capture_pb2_grpc.CaptureServiceStub, str, sa.Engine], duration: timedelta | None, says: str
) -> None:
    stub, _, engine = offline
    request = capture_pb2.CreateCaptureRequest(namespace="shop", pod="checkout-7d9f")
    if duration is not None:
        request.duration.CopyFrom(_duration(duration))
    with pytest.raises(grpc.RpcError) as failure:
        stub.CreateCapture(request, timeout=10)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert says in failure.value.details()
    assert _stored(engine) == 0


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"namespace": "Shop_1"}, "not a valid DNS-1123 label"),
        ({"pod": "a" * 254}, "not a valid DNS-1123 subdomain"),
        ({"namespace": ""}, "namespace is required"),
    ],
)
def test_names_that_kubernetes_would_refuse_are_refused(
    offline: tuple[capture_pb2_grpc.CaptureServiceStub, str, sa.Engine], fields: dict[str, str], says: str
) -> None:
    stub, _, engine = offline
    error = _create(stub, **fields)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert says in error.details()
    assert _stored(engine) == 0


@pytest.mark.parametrize("capture_id", ["x" * 100_000, "../etc", "0" * 33, "abc", "ABCD", "é" * 32])
def test_malformed_capture_id_is_invalid_argument_and_not_echoed_in_full(
    offline: tuple[capture_pb2_grpc.CaptureServiceStub, str, sa.Engine], capture_id: str
) -> None:
    stub, _, _ = offline
    for call in (
        lambda: stub.GetCapture(capture_pb2.GetCaptureRequest(id=capture_id), timeout=10),
        lambda: stub.StopCapture(capture_pb2.StopCaptureRequest(id=capture_id), timeout=10),
        lambda: stub.GetDownloadUrl(capture_pb2.GetDownloadUrlRequest(id=capture_id), timeout=10),
    ):
        with pytest.raises(grpc.RpcError) as failure:
            call()
        assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "is not a capture id" in failure.value.details() and len(failure.value.details()) < 200


def test_unknown_capture_is_not_found(
    offline: tuple[capture_pb2_grpc.CaptureServiceStub, str, sa.Engine],
) -> None:
    stub, _, _ = offline
    with pytest.raises(grpc.RpcError) as failure:
        stub.GetCapture(capture_pb2.GetCaptureRequest(id="0" * 32), timeout=10)
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_capture_id_prefix_finds_its_capture_when_unique_and_is_refused_when_not(
    offline: tuple[capture_pb2_grpc.CaptureServiceStub, str, sa.Engine],
) -> None:
    stub, _, engine = offline
    ids = ["abcd" + "0" * 27 + "1", "abcd" + "0" * 27 + "2", "abce" + "0" * 28]
    with engine.begin() as conn:
        for capture_id in ids:
            conn.execute(
                sa.text(
                    "INSERT INTO captures (id, requester, namespace, duration_ms, state, created_at, updated_at) "
                    "VALUES (:id, 'alice', 'shop', 5000, 'COMPLETED', '2026-12-07 00:00:00', '2026-12-07 00:00:00')"
                ),
                {"id": capture_id},
            )
    for prefix, expected in (("abce", ids[2]), ("abcd" + "0" * 27 + "2", ids[1]), (ids[0], ids[0])):
        assert stub.GetCapture(capture_pb2.GetCaptureRequest(id=prefix), timeout=10).id == expected
    with pytest.raises(grpc.RpcError) as failure:
        stub.GetCapture(capture_pb2.GetCaptureRequest(id="abcd"), timeout=10)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "start of more than one capture id" in (failure.value.details() or "")
    with pytest.raises(grpc.RpcError) as failure:
        stub.GetCapture(capture_pb2.GetCaptureRequest(id="abcf"), timeout=10)
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND


def test_cli_exits_non_zero_with_the_servers_message(
    offline: tuple[capture_pb2_grpc.CaptureServiceStub, str, sa.Engine],
) -> None:
    _, address, engine = offline
    result = cli(["capture", "shop/nope-123", "--filter", "tcp port 443", "--duration", "5s"], server=address)
    assert result.returncode != 0
    assert "NOT_FOUND" in result.stderr and "shop/nope-123" in result.stderr
    result = cli(
        ["capture", "shop/checkout-7d9f", "--filter", "-z /tmp/evil.sh", "--duration", "5s"], server=address
    )
    assert result.returncode != 0
    assert "INVALID_ARGUMENT" in result.stderr
    assert _stored(engine) == 0


@pytest.mark.parametrize("buffer_size", [-1024, 1000, (32 << 20) + 1])
def test_a_capture_buffer_that_is_not_whole_kib_is_refused(
    offline: tuple[capture_pb2_grpc.CaptureServiceStub, str, sa.Engine], buffer_size: int
) -> None:
    stub, _, engine = offline
    refused = _create(stub, limits=common_pb2.CaptureLimits(buffer_size=buffer_size))
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "buffer_size must be a whole number of KiB" in (refused.details() or "")
    assert _stored(engine) == 0
