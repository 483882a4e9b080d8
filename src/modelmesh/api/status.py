"""The one table from domain errors to gRPC status codes, and the wrappers that apply it.

Every handler the pod serves is wrapped by ``guard_unary`` / ``guard_stream`` when the server is
built (``api/server.py``), so no servicer catches exceptions itself and none can be forgotten.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc

from modelmesh import errors

log = logging.getLogger(__name__)

# Most specific first: the first matching class wins.
STATUS_TABLE: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (errors.ModelNotFound, grpc.StatusCode.NOT_FOUND),
    (errors.InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.ModelExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.CapacityExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.RequestTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.ModelLoadFailed, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.PreconditionFailed, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Conflict, grpc.StatusCode.ABORTED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.NotImplementedYet, grpc.StatusCode.UNIMPLEMENTED),
    (asyncio.TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (asyncio.CancelledError, grpc.StatusCode.CANCELLED),
)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC code and message a caller sees for ``exc``."""
    if isinstance(exc, errors.UpstreamError):
        code = grpc.StatusCode.__members__.get(exc.code, grpc.StatusCode.INTERNAL)
        if code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.OK):
            code = grpc.StatusCode.INTERNAL
        return code, exc.message
    for cls, code in STATUS_TABLE:
        if isinstance(exc, cls):
            if isinstance(exc, errors.MeshError):
                return code, exc.message
            if isinstance(exc, asyncio.TimeoutError):
                return code, "deadline exceeded"
            return code, "request cancelled"
    return grpc.StatusCode.INTERNAL, "internal error; see the pod's log"


def reported_status(exc: BaseException, method: str) -> tuple[grpc.StatusCode, str]:
    """``status_for(exc)``, logging the traceback of an unexpected error (its caller sees only
    a generic message)."""
    code, message = status_for(exc)
    if code is grpc.StatusCode.INTERNAL and not isinstance(exc, errors.MeshError):
        log.error("unexpected error in %s", method, exc_info=exc)
    return code, message


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> NoReturn:
    code, message = reported_status(exc, method)
    await context.abort(code, message)
    raise AssertionError("unreachable: abort raises")  # pragma: no cover


Req = TypeVar("Req")
Resp = TypeVar("Resp")


def guard_unary(
    fn: Callable[[Req, grpc.aio.ServicerContext], Awaitable[Resp]], method: str
) -> Callable[[Req, grpc.aio.ServicerContext], Awaitable[Resp]]:
    async def guarded(request: Req, context: grpc.aio.ServicerContext) -> Resp:
        try:
            return await fn(request, context)
        except grpc.aio.AbortError:
            raise
        except (Exception, asyncio.CancelledError) as exc:  # mapped to a status, never swallowed
            if isinstance(exc, asyncio.CancelledError) and context.cancelled():
                raise
            await abort_with(context, exc, method)

    guarded.__name__ = getattr(fn, "__name__", "guarded")
    return guarded


def guard_stream(
    fn: Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Resp]], method: str
) -> Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Resp]]:
    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Resp]:
        try:
            async for item in fn(request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except (Exception, asyncio.CancelledError) as exc:
            if isinstance(exc, asyncio.CancelledError) and context.cancelled():
                raise
            await abort_with(context, exc, method)

    guarded.__name__ = getattr(fn, "__name__", "guarded")
    return guarded
