"""Requests that are not a valid message of their method's type are INVALID_ARGUMENT, said plainly, on both servers.

grpc.aio parses a request before any servicer code runs, and a parse failure (a string field holding bytes that
are not UTF-8, truncated or garbage bytes) escaped as UNKNOWN "Unexpected <class DecodeError>: ...", with a
traceback in the server log. A Duration or Timestamp outside the range its well-known type defines parses, but
protobuf's converters (`ToTimedelta`, `ToDatetime`) raise on it, which reached callers as INTERNAL.

`RejectMalformed` is one server interceptor for both: the request deserializer of every unary-request method
returns a marker instead of raising, and the behaviour aborts on that marker with INVALID_ARGUMENT, naming the
message type and, when it can be told, the field. The request's bytes are never echoed.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeAlias, cast

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

__all__ = ["RejectMalformed"]

_MAX_REASON = 200
_DURATION = "google.protobuf.Duration"
_TIMESTAMP = "google.protobuf.Timestamp"
# The ranges google/protobuf/duration.proto and timestamp.proto define (timestamps: years 0001 to 9999).
_DURATION_MAX_S = 315_576_000_000
_TIMESTAMP_MIN_S = -62_135_596_800
_TIMESTAMP_MAX_S = 253_402_300_799
_NANOS_MAX = 999_999_999

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


@dataclass(frozen=True)
class _Malformed:
    """Stands in for a request that could not be parsed; the behaviour refuses it."""

    message: str


class RejectMalformed(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Answers INVALID_ARGUMENT, before any servicer code runs, to a request that is not a valid message."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler  # unknown method (UNIMPLEMENTED), or one our APIs do not have
        behaviour = handler.unary_stream if handler.response_streaming else handler.unary_unary
        if not (inspect.iscoroutinefunction(behaviour) or inspect.isasyncgenfunction(behaviour)):
            return handler  # a synchronous behaviour: not what our aio servicers are
        parse = _checked_parser(handler.request_deserializer, handler_call_details.method)
        if handler.response_streaming:
            return cast(Any, handler)._replace(request_deserializer=parse, unary_stream=_refusing(behaviour))  # type: ignore[no-any-return]
        return cast(Any, handler)._replace(request_deserializer=parse, unary_unary=_refusing(behaviour))  # type: ignore[no-any-return]


def _checked_parser(parse: Callable[[bytes], Any], method: str) -> Callable[[bytes], Any]:
    descriptor = _input_type(method)
    type_name = descriptor.full_name if descriptor is not None else f"request for {method}"

    def checked(raw: bytes) -> Any:
        try:
            request = parse(raw)
        except Exception as exc:  # whatever protobuf's parser raises, the bytes are not a valid message
            reason = _undecodable(raw, descriptor) if descriptor is not None else None
            return _Malformed(f"the request is not a valid {type_name}: {reason or _decode_reason(exc)}")
        if isinstance(request, Message) and (problem := _problem_in(request)):
            return _Malformed(f"the request is not a valid {type_name}: {problem}")
        return request

    return checked


def _refusing(behaviour: Any) -> Any:
    """`behaviour`, of the same kind (coroutine or async generator), aborting first on a `_Malformed` request."""
    if inspect.isasyncgenfunction(behaviour):

        @functools.wraps(behaviour)
        async def streaming(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            if isinstance(request, _Malformed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            async for item in behaviour(request, context):
                yield item

        return streaming

    @functools.wraps(behaviour)
    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if isinstance(request, _Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return await behaviour(request, context)

    return unary


@functools.cache
def _input_type(method: str) -> Descriptor | None:
    """The request type of "/package.Service/Method", from the descriptors the generated code registered."""
    service, _, name = method.lstrip("/").partition("/")
    try:
        found = descriptor_pool.Default().FindServiceByName(service).methods_by_name.get(name)
    except KeyError:
        return None
    return found.input_type if found is not None else None


def _decode_reason(exc: Exception) -> str:
    """protobuf's reason ("Wire format was corrupt"), without its preamble; it never quotes the bytes."""
    text = str(exc).rsplit("': ", 1)[-1].strip() or type(exc).__name__
    return f"its bytes do not parse ({text[:_MAX_REASON]})"


def _undecodable(raw: bytes, descriptor: Descriptor, prefix: str = "") -> str | None:
    """Names the string field that holds bytes that are not UTF-8, walking the wire format; None if none does
    (or the bytes are too broken to tell)."""
    pos = 0
    try:
        while pos < len(raw):
            tag, pos = _varint(raw, pos)
            number, wire_type = tag >> 3, tag & 7
            if wire_type == 0:
                _, pos = _varint(raw, pos)
            elif wire_type == 1:
                pos += 8
            elif wire_type == 5:
                pos += 4
            elif wire_type == 2:
                length, pos = _varint(raw, pos)
                value, pos = raw[pos : pos + length], pos + length
                if pos > len(raw):
                    return None
                field = descriptor.fields_by_number.get(number)
                if field is None:
                    continue
                name = f"{prefix}{field.name}"
                if field.type == FieldDescriptor.TYPE_STRING:
                    try:
                        value.decode("utf-8")
                    except UnicodeDecodeError:
                        return f"string field '{name}' is not UTF-8"
                elif field.message_type is not None and (
                    found := _undecodable(value, field.message_type, f"{name}.")
                ):
                    return found
            else:
                return None  # groups: none of our messages have them
    except IndexError:
        return None
    return None


def _varint(raw: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = raw[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift >= 70:
            raise IndexError("varint too long")


def _problem_in(message: Message, prefix: str = "") -> str | None:
    """What makes a parsed message invalid although it parsed: a Duration or Timestamp (at any depth) outside the
    range its well-known type defines. None when there is nothing wrong."""
    if not _holds_time(message.DESCRIPTOR):
        return None
    for field, value in message.ListFields():
        if field.message_type is None or field.message_type.GetOptions().map_entry:
            continue
        name = f"{prefix}{field.name}"
        items = value if field.is_repeated else [value]
        for item in items:
            if problem := _time_problem(item, name) or _problem_in(item, f"{name}."):
                return problem
    return None


def _time_problem(value: Message, name: str) -> str | None:
    kind = value.DESCRIPTOR.full_name
    if kind == _DURATION:
        seconds, nanos = cast(Any, value).seconds, cast(Any, value).nanos
        if (
            abs(seconds) > _DURATION_MAX_S
            or abs(nanos) > _NANOS_MAX
            or (seconds > 0 > nanos)
            or (seconds < 0 < nanos)
        ):
            return (
                f"field '{name}' is not a valid {_DURATION} (seconds within ±{_DURATION_MAX_S}, nanos within "
                f"±{_NANOS_MAX}, both of the same sign)"
            )
    elif kind == _TIMESTAMP:
        seconds, nanos = cast(Any, value).seconds, cast(Any, value).nanos
        if not _TIMESTAMP_MIN_S <= seconds <= _TIMESTAMP_MAX_S or not 0 <= nanos <= _NANOS_MAX:
            return (
                f"field '{name}' is not a valid {_TIMESTAMP} (a time from year 1 to year 9999, nanos within "
                f"0..{_NANOS_MAX})"
            )
    return None


@functools.cache
def _holds_time(descriptor: Descriptor, _seen: frozenset[str] = frozenset()) -> bool:
    """Whether a message of this type can hold a Duration or Timestamp anywhere (cached per type)."""
    if descriptor.full_name in (_DURATION, _TIMESTAMP):
        return True
    seen = _seen | {descriptor.full_name}
    return any(
        field.message_type is not None
        and field.message_type.full_name not in seen
        and _holds_time(field.message_type, seen)
        for field in descriptor.fields
    )
