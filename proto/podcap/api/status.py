"""How a servicer turns domain errors into gRPC status codes: one table per server, applied in one place.

Both servers (controller and agent) keep their own exception tree and hand their table to `maps_errors`; a
servicer method then only raises. An exception that is not in the table is a bug: it is logged with its
traceback and reported as INTERNAL without leaking details.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from typing import Any, TypeVar

import grpc

log = logging.getLogger(__name__)

ErrorTable = Mapping[type[BaseException], grpc.StatusCode]
_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")
_Self = TypeVar("_Self")


def status_for(table: ErrorTable, exc: BaseException) -> grpc.StatusCode | None:
    """The code of the most specific class in `table` that `exc` is an instance of."""
    for cls in type(exc).__mro__:
        if cls in table:
            return table[cls]
    return None


async def _abort(table: ErrorTable, context: grpc.aio.ServicerContext[Any, Any], exc: Exception) -> None:
    code = status_for(table, exc)
    if code is None:
        log.exception("unexpected error in %s", type(exc).__name__)
        await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")
    else:
        await context.abort(code, str(exc))


def maps_errors(
    table: ErrorTable,
) -> Callable[
    [Callable[[_Self, _Req, grpc.aio.ServicerContext[Any, Any]], Coroutine[Any, Any, _Resp]]],
    Callable[[_Self, _Req, grpc.aio.ServicerContext[Any, Any]], Coroutine[Any, Any, _Resp]],
]:
    """Decorates an async unary servicer method."""

    def decorate(
        method: Callable[[_Self, _Req, grpc.aio.ServicerContext[Any, Any]], Coroutine[Any, Any, _Resp]],
    ) -> Callable[[_Self, _Req, grpc.aio.ServicerContext[Any, Any]], Coroutine[Any, Any, _Resp]]:
        @functools.wraps(method)
        async def wrapper(self: _Self, request: _Req, context: grpc.aio.ServicerContext[Any, Any]) -> _Resp:
            try:
                return await method(self, request, context)
            except Exception as exc:
                if isinstance(exc, grpc.aio.AbortError):
                    raise
                await _abort(table, context, exc)
                raise AssertionError("unreachable: context.abort raises") from exc

        return wrapper

    return decorate


def maps_stream_errors(
    table: ErrorTable,
) -> Callable[
    [Callable[[_Self, _Req, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[_Resp]]],
    Callable[[_Self, _Req, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[_Resp]],
]:
    """Decorates an async server-streaming servicer method (an async generator)."""

    def decorate(
        method: Callable[[_Self, _Req, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[_Resp]],
    ) -> Callable[[_Self, _Req, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[_Resp]]:
        @functools.wraps(method)
        async def wrapper(
            self: _Self, request: _Req, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[_Resp]:
            try:
                async for item in method(self, request, context):
                    yield item
            except Exception as exc:
                if isinstance(exc, grpc.aio.AbortError):
                    raise
                await _abort(table, context, exc)

        return wrapper

    return decorate
