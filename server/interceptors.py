"""Cross-cutting concerns of every RPC, in one place: bearer-token auth, unexpected errors
and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc

from lmscore.server.auth import BearerTokens

log = logging.getLogger("lmscore.server")

Behavior = Callable[..., Any]


class _Undecodable:
    """Stands for a request message whose bytes did not parse."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # protobuf's DecodeError and kin
            return _Undecodable(exc)

    return deserialize


async def _abort_undecodable(context: grpc.aio.ServicerContext, request: _Undecodable) -> None:
    await context.abort(
        grpc.StatusCode.INVALID_ARGUMENT, f"request: not a valid message ({request.error})"
    )


Guard = Callable[[grpc.aio.ServicerContext], contextlib.AbstractAsyncContextManager[None]]
Prepare = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
Inspect = Callable[[Any, grpc.aio.ServicerContext], Awaitable[None]]


def _each_message(request_streaming: bool, inspect: Inspect) -> Prepare:
    """A Prepare that hands the request to `inspect` (which may abort the call), or each
    message of a request stream as it arrives."""

    async def prepare(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if not request_streaming:
            await inspect(request, context)
            return request

        async def messages() -> AsyncIterator[Any]:
            async for message in request:
                await inspect(message, context)
                yield message

        return messages()

    return prepare


def _guarded(
    behavior: Behavior, streaming: bool, guard: Guard, prepare: Prepare | None
) -> Behavior:
    """`behavior` run inside `guard(context)`, for unary and streaming responses alike;
    `prepare` may check or replace the request first."""
    if streaming:

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if prepare is not None:
                request = await prepare(request, context)
            async with guard(context):
                async for response in behavior(request, context):
                    yield response

        return stream

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if prepare is not None:
            request = await prepare(request, context)
        async with guard(context):
            return await behavior(request, context)

    return unary


def _with_guard(
    handler: grpc.RpcMethodHandler,
    guard: Guard,
    prepare: Prepare | None = None,
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler:
    """The same handler with its behavior run inside `guard`."""
    kinds = [
        ("unary_unary", grpc.unary_unary_rpc_method_handler),
        ("unary_stream", grpc.unary_stream_rpc_method_handler),
        ("stream_unary", grpc.stream_unary_rpc_method_handler),
        ("stream_stream", grpc.stream_stream_rpc_method_handler),
    ]
    for attribute, make in kinds:
        behavior = getattr(handler, attribute)
        if behavior is not None:
            return make(
                _guarded(behavior, attribute.endswith("_stream"), guard, prepare),
                request_deserializer=request_deserializer or handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    raise ValueError("handler without behavior")


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Any unexpected exception becomes INTERNAL with a request id, logged with its trace;
    bytes that do not parse as the request message become INVALID_ARGUMENT (gRPC itself
    would answer UNKNOWN). The server keeps serving."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method

        @contextlib.asynccontextmanager
        async def guard(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
            try:
                yield
            except grpc.aio.AbortError:
                raise
            except Exception:
                request_id = uuid.uuid4().hex[:12]
                log.exception("internal error in %s, request id %s", method, request_id)
                await context.abort(
                    grpc.StatusCode.INTERNAL,
                    f"internal error (request id {request_id}, see server log)",
                )

        async def check(message: Any, context: grpc.aio.ServicerContext) -> None:
            if isinstance(message, _Undecodable):
                await _abort_undecodable(context, message)

        return _with_guard(
            handler,
            guard,
            _each_message(handler.request_streaming, check),
            _tolerant(handler.request_deserializer),
        )


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Every RPC needs `authorization: Bearer TOKEN` with one of `tokens` (compared in
    constant time), except the methods of `exempt_services`; else UNAUTHENTICATED."""

    def __init__(self, tokens: Sequence[str], exempt_services: Sequence[str] = ()) -> None:
        self._tokens = BearerTokens(tokens)
        self._exempt = tuple(f"/{service}/" for service in exempt_services)

    def _authorized(self, metadata: Sequence[tuple[str, Any]] | None) -> bool:
        header = next((v for k, v in metadata or () if k == "authorization"), "")
        return self._tokens.accepts(header)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(self._exempt):
            return handler
        if self._authorized(details.invocation_metadata):
            return handler

        @contextlib.asynccontextmanager
        async def deny(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or invalid bearer token (metadata 'authorization: Bearer TOKEN')",
            )
            yield  # not reached: abort raises

        return _with_guard(handler, deny)


def _code_name(context: grpc.aio.ServicerContext) -> str:
    code = context.code()
    return getattr(code, "name", str(code)) if code is not None else "UNKNOWN"


def _end_of(context: grpc.aio.ServicerContext, code: str) -> str:
    """How a call that raised no status ended: a client that cancelled or went away ends a
    streaming handler quietly, and a deadline that passed looks the same from here."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return "DEADLINE_EXCEEDED"
    return "CANCELLED" if context.cancelled() else code


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts every RPC by method, status code and model, and times it
    (lmscore.server.metrics). `model_names`: the served models, the first the default."""

    def __init__(self, model_names: Sequence[str]) -> None:
        self._served = frozenset(model_names)
        self._first = model_names[0]

    def _model_label(self, message: Any) -> str:
        """The served model a request message names: its `model` field, empty meaning the
        first; empty for messages without one and for names not served (bounded labels)."""
        if not hasattr(message, "model"):  # ListModels, health, an undecodable message
            return ""
        name = message.model or self._first
        return name if name in self._served else ""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        from lmscore.server import metrics

        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method
        model: str | None = None  # from the first request message

        async def label(message: Any, context: grpc.aio.ServicerContext) -> None:
            nonlocal model
            if model is None:
                model = self._model_label(message)

        @contextlib.asynccontextmanager
        async def measured(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
            began, code = time.perf_counter(), "OK"
            try:
                yield
            except grpc.aio.AbortError:
                code = _code_name(context)
                raise
            except (asyncio.CancelledError, GeneratorExit):
                code = "CANCELLED"
                raise
            finally:
                if code in ("OK", "CANCELLED"):
                    code = _end_of(context, code)
                metrics.REQUESTS.labels(method, code, model or "", "grpc").inc()
                elapsed = time.perf_counter() - began
                metrics.LATENCY.labels(method, model or "", "grpc").observe(elapsed)

        return _with_guard(handler, measured, _each_message(handler.request_streaming, label))
