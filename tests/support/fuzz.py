"""Sending requests a real client library would never send, and judging the answers: what the fuzz tests of both
servers share.

Requests go out as raw bytes (`call`), so a test can send what protobuf itself refuses to build: a string field
holding bytes that are not UTF-8 (`with_raw_string`), truncated or garbage bytes, oversized messages.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import event
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

EXAMPLES = int(os.environ.get("PODCAP_FUZZ_EXAMPLES", "300"))
"""Examples per hypothesis test: modest in CI, raise it locally (PODCAP_FUZZ_EXAMPLES=3000) to search harder."""

MAX_DETAILS = 1024

# Invalid UTF-8 of several kinds: a stray byte, an overlong NUL, a UTF-16 surrogate, a cut sequence, a lone
# continuation byte.
_BAD_UTF8 = [b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xe2\x82", b"\x80", b"\xf8\x88\x80\x80\x80"]


def _not_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


non_utf8 = st.builds(
    lambda head, bad, tail: head + bad + tail,
    st.binary(max_size=40),
    st.sampled_from(_BAD_UTF8),
    st.binary(max_size=40),
).filter(_not_utf8)
"""Byte strings that are not UTF-8."""


def message_class(descriptor: Descriptor) -> type[Message]:
    return message_factory.GetMessageClass(descriptor)


def string_fields(descriptor: Descriptor, prefix: str = "") -> Iterator[str]:
    """Dotted paths of every string field of a message type, nested messages included ("pod.ips")."""
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_STRING:
            yield f"{prefix}{field.name}"
        elif field.message_type is not None and not field.message_type.full_name.startswith(
            "google.protobuf."
        ):
            yield from string_fields(field.message_type, f"{prefix}{field.name}.")


def set_string(message: Message, path: str, value: str) -> None:
    *parents, name = path.split(".")
    for parent in parents:
        message = getattr(message, parent)
        if not isinstance(message, Message):
            message = message[0] if len(message) else message.add()  # a repeated message: its first one
    if message.DESCRIPTOR.fields_by_name[name].is_repeated:
        getattr(message, name).append(value)
    else:
        setattr(message, name, value)


def with_raw_string(template: Message, path: str, raw: bytes) -> bytes:
    """`template` on the wire with the string field at `path` holding `raw`, which need not be UTF-8.

    The field is filled with two placeholders of `raw`'s length; where their encodings differ is exactly the
    field's content, so `raw` is spliced in there and every length prefix stays right.
    """
    encodings = []
    for fill in ("A", "B"):
        message = type(template)()
        message.CopyFrom(template)
        set_string(message, path, fill * len(raw))
        encodings.append(message.SerializeToString())
    a, b = encodings
    start = next(i for i in range(len(a)) if a[i] != b[i])
    return a[:start] + raw + a[start + len(raw) :]


def oversized(raw: bytes, size: int = 4 << 20) -> bytes:
    """`raw` with an unknown length-delimited field (number 1000) of `size` bytes appended: valid protobuf,
    whatever the message type, and over the servers' 4 MiB limit."""
    length, prefix = size, bytearray()
    while length >= 0x80:
        prefix.append(length & 0x7F | 0x80)
        length >>= 7
    prefix.append(length)
    return raw + bytes([0xC2, 0x3E]) + bytes(prefix) + b"x" * size


def call(
    channel: grpc.Channel, service: ServiceDescriptor, method: str, raw: bytes, timeout: float = 30
) -> tuple[grpc.StatusCode, str]:
    """Sends `raw` as the request of `method` and returns the status (OK, "" when it succeeded); a streaming
    answer is read to its end."""
    path = f"/{service.full_name}/{method}"
    try:
        if service.methods_by_name[method].server_streaming:
            for _ in channel.unary_stream(path, request_serializer=bytes)(raw, timeout=timeout):
                pass
        else:
            channel.unary_unary(path, request_serializer=bytes)(raw, timeout=timeout)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def assert_answer(
    code: grpc.StatusCode, details: str, allowed: set[grpc.StatusCode] | frozenset[grpc.StatusCode], what: str
) -> None:
    """`code` is one `allowed` for this input (never UNKNOWN or INTERNAL), and a refusal says why, briefly, in
    printable text."""
    if currently_in_test_context():  # --hypothesis-show-statistics then tells how often each answer came
        event(f"{what.split(maxsplit=1)[0]}: {code.name}")
    assert code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), f"{what}: {code.name} {details!r}"
    assert code in allowed, (
        f"{what}: {code.name} {details!r}, expected one of {sorted(c.name for c in allowed)}"
    )
    if code != grpc.StatusCode.OK:
        assert details, f"{what}: {code.name} without a message"
        assert details.isprintable(), f"{what}: unprintable message {details!r}"
        assert len(details.encode()) < MAX_DETAILS, f"{what}: {len(details.encode())}-byte message"


def _slow_filter() -> str:
    """A valid filter under 4 KiB that libpcap's optimiser takes seconds to compile."""
    ports = " or ".join(f"port {n}" for n in range(1, 600))
    return ports[: ports.rfind(" or ", 0, 4096)]


SLOW_FILTER = _slow_filter()


def assert_serving_while(pending: grpc.Future, channel: grpc.Channel) -> None:
    """While `pending` (a call compiling SLOW_FILTER) runs, the server still answers health checks at once;
    then waits for `pending`, whatever it answered."""
    try:
        time.sleep(0.3)
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    finally:
        with contextlib.suppress(grpc.RpcError):
            pending.result()
