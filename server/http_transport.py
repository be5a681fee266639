"""The HTTP transport (`lmscore serve --http-port`): the gRPC API as JSON, OpenAI's legacy
completions for scoring, and the tokenizer routes lm-eval's remote tokenizer calls.

It runs on uvicorn in the gRPC server's process and event loop (lmscore.server.asgi_server),
and computes nothing: every scoring route builds the request message of the contract
(lmscore.v1) and calls the same ScorerServicer a gRPC call reaches, through
`HttpCallContext`, which stands for the gRPC call context. So HTTP and gRPC requests batch
together, share the prefix cache, the admission limit, the model routing and the errors,
and a JSON route answers exactly what its RPC answers.

Routes:
- `POST /lmscore.v1.Scorer/{Method}`, one per RPC of the service descriptor, with the
  proto3 JSON mapping of its messages (field names as in scoring.proto); server-streaming
  answers and ScoreStream's requests are newline-delimited JSON.
- `POST /v1/completions` (lmscore.server.openai_api), `GET /v1/models`.
- `GET /tokenizer_info`, `POST /tokenize`, `POST /detokenize` (vLLM's shapes).
- `GET /health`: 200 while serving, 503 once shutting down.

Errors carry the HTTP status of their gRPC code and an OpenAI-style body
`{"error": {"message", "type", "param", "code"}}`, `param` naming the field as the gRPC
status's field violation does. Bodies are bounded by --max-message-bytes before parsing.
A call's deadline is its `lmscore-timeout` header (seconds); a client that disconnects
cancels its call, as a cancelled RPC does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import re
import ssl
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from lmscore.server import metrics
from lmscore.server.auth import BearerTokens
from lmscore.server.config import ServerConfig
from lmscore.server.openai_api import (
    ApiError,
    CompletionCall,
    completion_response,
    param_of,
    parse_completion_request,
)
from lmscore.server.servicer import RETRY_PUSHBACK_KEY, ModelNotFound, ScorerServicer
from lmscore.v1 import scoring_pb2 as pb

log = logging.getLogger("lmscore.server")

T = TypeVar("T")

SCORER = pb.DESCRIPTOR.services_by_name["Scorer"]
# A call's deadline in seconds, as grpc-timeout gives a gRPC call one.
TIMEOUT_HEADER = "lmscore-timeout"
NDJSON = "application/x-ndjson"
# Texts up to this size are tokenized on the event loop (less than the hop to a thread).
INLINE_TOKENIZE_CHARS = 16 * 1024
# JSON up to this size (a body's bytes, a message's protobuf bytes) is parsed or written on
# the event loop; larger on a worker thread. The loop is every gRPC and HTTP call's and
# /metrics': one answer of 8,000 tokens with top_k 20 is ~1 s of MessageToDict and
# json.dumps, which would stall them all.
INLINE_JSON_BYTES = 16 * 1024

# The HTTP status of each gRPC code (what Google's HTTP/JSON transcoding uses).
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
# OpenAI's error types by HTTP status.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


class CallError(Exception):
    """A call ended with a status: the gRPC code, its message, and the field at fault."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        field: str | None = None,
        retry_after_ms: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        # When an overloaded server asks the client to come back (gRPC's retry pushback).
        self.retry_after_ms = retry_after_ms

    @property
    def http_status(self) -> int:
        # A size limit (a field named) is the request's own size; without one, the server's
        # queue or admission limit: come back later.
        if self.code is grpc.StatusCode.RESOURCE_EXHAUSTED and self.field:
            return 413
        return HTTP_STATUS.get(self.code, 500)

    def body(self, param: str | None = None) -> dict[str, Any]:
        status = self.http_status
        return {
            "error": {
                "message": self.message,
                "type": ERROR_TYPES.get(status, "server_error"),
                "param": param if param is not None else self.field,
                "code": self.code.name.lower(),
            }
        }


def _violated_field(trailing_metadata: Any) -> str | None:
    """The field of the google.rpc.BadRequest detail the servicer attaches, if any."""
    for key, value in trailing_metadata or ():
        if key != "grpc-status-details-bin":
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            bad_request = error_details_pb2.BadRequest()
            if detail.Unpack(bad_request) and bad_request.field_violations:
                return bad_request.field_violations[0].field
    return None


class HttpCallContext:
    """Stands for grpc.aio.ServicerContext when the servicer answers an HTTP call: abort
    raises CallError with the status the servicer chose."""

    def __init__(self, peer: str, deadline: float | None) -> None:
        self._peer = peer
        self._deadline = deadline

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()
    ) -> NoReturn:
        field = _violated_field(trailing_metadata)
        if field is not None:
            details = details.removeprefix(f"{field}: ")
        pushback = dict(trailing_metadata or ()).get(RETRY_PUSHBACK_KEY)
        raise CallError(code, details, field, int(pushback) if pushback else None)

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else self._deadline - time.monotonic()

    def cancelled(self) -> bool:
        return False

    def invocation_metadata(self) -> tuple[()]:
        return ()

    def peer(self) -> str:
        return self._peer


def _error_response(error: CallError, param: str | None = None) -> JSONResponse:
    headers = {}
    if error.retry_after_ms is not None:
        # HTTP's Retry-After is in whole seconds; OpenAI's SDKs read retry-after-ms first.
        headers["retry-after-ms"] = str(error.retry_after_ms)
        headers["retry-after"] = str(math.ceil(error.retry_after_ms / 1000))
    return JSONResponse(error.body(param), status_code=error.http_status, headers=headers)


def _api_error(error: ApiError) -> CallError:
    code = {
        404: grpc.StatusCode.NOT_FOUND,
        413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    }.get(error.status, grpc.StatusCode.INVALID_ARGUMENT)
    return CallError(code, error.message, error.param)


# json.dumps's options for NDJSON lines, and Starlette's JSONResponse's for whole answers.
LINE_JSON = {"separators": (",", ":"), "allow_nan": True}
RESPONSE_JSON = {"separators": (",", ":"), "allow_nan": False, "ensure_ascii": False}
# Lists longer than this are written one member per json.dumps call (see json_text).
PIECEWISE_LIST = 64


def json_text(value: Any, options: dict[str, Any]) -> str:
    """json.dumps(value, **options), the same text, in pieces: a dict's and a short list's
    members one by one, down to long lists, whose members are written one call each.
    json.dumps holds the GIL for its whole call (~0.2 s for an 8 MB answer), so a worker
    thread writing a large answer in one call stalls the event loop as much as writing it
    on the loop would."""
    if isinstance(value, dict):
        members = (f"{json.dumps(k, **options)}:{json_text(v, options)}" for k, v in value.items())
        return "{" + ",".join(members) + "}"
    if isinstance(value, list) and len(value) > PIECEWISE_LIST:
        return "[" + ",".join(json.dumps(v, **options) for v in value) + "]"
    if isinstance(value, list):
        return "[" + ",".join(json_text(v, options) for v in value) + "]"
    return json.dumps(value, **options)


def _json_line(value: Any) -> bytes:
    return json_text(value, LINE_JSON).encode() + b"\n"


def _json_response(value: Any) -> Response:
    """JSONResponse's body, written by json_text."""
    return Response(json_text(value, RESPONSE_JSON).encode(), media_type="application/json")


async def _converted(size: int, convert: Callable[..., T], *args: Any) -> T:
    """convert(*args), on a worker thread when `size` (its JSON's or message's bytes) is
    past INLINE_JSON_BYTES."""
    if size <= INLINE_JSON_BYTES:
        return convert(*args)
    return await asyncio.to_thread(convert, *args)


def _message_line(message: Message) -> bytes:
    return _json_line(message_json(message))


def _message_response(message: Message) -> Response:
    return _json_response(message_json(message))


def message_json(message: Message) -> dict[str, Any]:
    """A message in the proto3 JSON mapping: scoring.proto's field names, every field."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _parse_json(data: bytes, ndjson: bool) -> Any:
    """A body's JSON value (NDJSON: the list of its lines' values)."""
    if ndjson:
        return [json.loads(line) for line in data.splitlines() if line.strip()]
    return json.loads(data) if data.strip() else {}


def _parse_messages(values: list[Any], message_type: type[Message]) -> list[Message]:
    """A client-streaming call's requests, each named by its index where it does not fit."""
    return [_parse_message(v, message_type, f"requests[{i}]: ") for i, v in enumerate(values)]


def _completion_response(
    call: CompletionCall, results: list[pb.ScoreResult], model_name: str
) -> Response:
    return _json_response(completion_response(call, results, model_name))


def _parse_message(data: Any, message_type: type[Message], where: str = "") -> Message:
    """A JSON value as `message_type`; CallError names the field that does not fit."""
    message = message_type()
    try:
        json_format.ParseDict(data, message)
    except json_format.ParseError as exc:
        text = str(exc)
        named = re.search(r'no field named "([^"]+)"|Failed to parse (\w+) field', text)
        field = next((g for g in named.groups() if g), None) if named else None
        raise CallError(grpc.StatusCode.INVALID_ARGUMENT, f"{where}{text}", field) from None
    return message


class HttpTransport:
    """The routes over one servicer; `config`: limits, tokens, model names."""

    def __init__(self, servicer: ScorerServicer, config: ServerConfig) -> None:
        self._servicer = servicer
        self._config = config
        self._tokens = BearerTokens(config.auth_tokens) if config.auth_tokens else None
        self._served = [model.name for model in config.models]
        self.serving = True
        routes = [
            Route("/v1/completions", self._endpoint(self.completions, "model"), methods=["POST"]),
            Route("/v1/models", self._endpoint(self.list_models), methods=["GET"]),
            Route("/tokenizer_info", self._endpoint(self.tokenizer_info), methods=["GET"]),
            Route("/tokenize", self._endpoint(self.tokenize, "model"), methods=["POST"]),
            Route("/detokenize", self._endpoint(self.detokenize, "model"), methods=["POST"]),
            Route("/health", self.health, methods=["GET"]),
        ]
        for method in SCORER.methods:
            path = f"/{SCORER.full_name}/{method.name}"
            routes.append(Route(path, self._endpoint(self._rpc(method), "model"), methods=["POST"]))
        self.app = Starlette(
            routes=routes,
            exception_handlers={404: _no_route, 405: _no_route},
        )

    # The frame of every route: auth, the body within its bound, the deadline, metrics,
    # cancellation when the client leaves, errors as statuses.

    def _endpoint(
        self,
        handler: Callable[[Request, Any, HttpCallContext], Awaitable[Response]],
        model_field: str | None = None,
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            began, code, model = time.perf_counter(), grpc.StatusCode.OK, ""
            try:
                self._authorize(request)
                body = await self._body(request) if request.method == "POST" else None
                model = self._model_label(body, model_field, request)
                request.state.model = model
                context = HttpCallContext(_peer(request), _deadline(request))
                response = await _until_disconnect_or_deadline(
                    request, context, handler(request, body, context)
                )
                if isinstance(response, StreamingResponse):
                    return response  # counted by _stream when its last line is sent
                if response.status_code >= 400:
                    code = _code_of(response)
                return response
            except CallError as error:
                code = error.code
                return _error_response(error)
            except ClientDisconnect:
                code = grpc.StatusCode.CANCELLED
                return Response(status_code=499)
            except Exception:
                request_id = uuid.uuid4().hex[:12]
                log.exception("internal error in %s, request id %s", request.url.path, request_id)
                code = grpc.StatusCode.INTERNAL
                return _error_response(
                    CallError(code, f"internal error (request id {request_id}, see server log)")
                )
            finally:
                if not getattr(request.state, "streaming", False):
                    _count(request.url.path, code, model, began)

        return endpoint

    def _authorize(self, request: Request) -> None:
        if self._tokens is None:
            return
        if not self._tokens.accepts(request.headers.get("authorization")):
            raise CallError(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or invalid bearer token (header 'Authorization: Bearer TOKEN')",
            )

    async def _body(self, request: Request) -> Any:
        """The JSON body, refused past --max-message-bytes before it is parsed (NDJSON
        bodies come back as a list of values)."""
        limit = self._config.max_message_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _too_large(int(declared), limit)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(size, limit)
            chunks.append(chunk)
        data = b"".join(chunks)
        request.state.body_bytes = size
        ndjson = request.headers.get("content-type", "").startswith(NDJSON)
        try:
            return await _converted(size, _parse_json, data, ndjson)
        except (ValueError, UnicodeDecodeError) as exc:
            raise CallError(grpc.StatusCode.INVALID_ARGUMENT, f"body: not JSON ({exc})") from None

    def _model_label(self, body: Any, model_field: str | None, request: Request) -> str:
        """The served model a call names (bounded labels, as the gRPC metrics)."""
        name = ""
        if isinstance(body, dict) and model_field:
            name = body.get(model_field) or ""
        elif isinstance(body, list) and body and isinstance(body[0], dict):
            name = body[0].get(model_field or "") or ""
        name = name or request.query_params.get("model", "")
        if not isinstance(name, str):
            return ""
        name = name or self._served[0]
        return name if name in self._served else ""

    # The JSON routes of the RPCs.

    def _rpc(self, method: Any) -> Callable[[Request, Any, HttpCallContext], Awaitable[Response]]:
        behavior = getattr(self._servicer, method.name)
        request_type = pb.DESCRIPTOR.message_types_by_name[method.input_type.name]
        request_class: type[Message] = getattr(pb, request_type.name)
        path = f"/{SCORER.full_name}/{method.name}"

        async def call(request: Request, body: Any, context: HttpCallContext) -> Response:
            body_bytes = request.state.body_bytes
            if method.client_streaming:
                values = body if isinstance(body, list) else [body]
                messages = await _converted(body_bytes, _parse_messages, values, request_class)

                async def requests() -> AsyncIterator[Message]:
                    for message in messages:
                        yield message

                answer: Any = behavior(requests(), context)
            else:
                message = await _converted(body_bytes, _parse_message, body, request_class)
                answer = behavior(message, context)
            if not method.server_streaming:
                result = await answer
                return await _converted(result.ByteSize(), _message_response, result)
            return await self._stream(request, context, answer, path)

        return call

    async def _stream(
        self,
        request: Request,
        context: HttpCallContext,
        answers: AsyncIterator[Message],
        path: str,
    ) -> Response:
        """NDJSON of a server-streaming answer. Its first message is awaited here, so a call
        refused before any result gets its HTTP status; a later error ends the stream with
        an error line."""
        began = time.perf_counter()
        try:
            first = await anext(answers)
        except StopAsyncIteration:
            first = None
        request.state.streaming = True
        model = request.state.model
        remaining = context.time_remaining()

        async def lines() -> AsyncIterator[bytes]:
            code = grpc.StatusCode.OK
            try:
                async with asyncio.timeout(remaining):
                    if first is not None:
                        yield await _converted(first.ByteSize(), _message_line, first)
                    async for message in answers:
                        yield await _converted(message.ByteSize(), _message_line, message)
            except CallError as error:
                code = error.code
                yield _json_line(error.body())
            except TimeoutError:
                code = grpc.StatusCode.DEADLINE_EXCEEDED
                error = CallError(code, f"deadline exceeded ({TIMEOUT_HEADER})")
                yield _json_line(error.body())
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            finally:
                await answers.aclose()  # type: ignore[attr-defined]
                _count(path, code, model, began)

        return StreamingResponse(lines(), media_type=NDJSON)

    # OpenAI's completions and models.

    async def completions(self, request: Request, body: Any, context: HttpCallContext) -> Response:
        try:
            call = parse_completion_request(body, self._config.engine.max_top_k)
        except ApiError as error:
            raise _api_error(error) from None
        results = []
        try:
            async for result in self._servicer.Score(call.request, context):  # type: ignore[arg-type]
                results.append(result)
        except CallError as error:
            return _error_response(error, param_of(error.field) if error.field else None)
        name = call.model or self._served[0]
        size = sum(result.ByteSize() for result in results)
        return await _converted(size, _completion_response, call, results, name)

    async def list_models(self, request: Request, body: Any, context: HttpCallContext) -> Response:
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": "lmscore"}
            for name in self._served
        ]
        return JSONResponse({"object": "list", "data": data})

    # The tokenizer routes (vLLM's shapes, as lm-eval's RemoteTokenizer calls them).

    def _engine(self, name: Any) -> Any:
        if not isinstance(name, str | None):
            raise CallError(grpc.StatusCode.INVALID_ARGUMENT, "must be a string", "model")
        try:
            return self._servicer.model(name or "").engine
        except ModelNotFound as exc:
            raise CallError(grpc.StatusCode.NOT_FOUND, str(exc), "model") from None

    async def tokenizer_info(
        self, request: Request, body: Any, context: HttpCallContext
    ) -> Response:
        engine = self._engine(request.query_params.get("model"))
        facts, decode = engine.facts, engine.tokenizer.decode_token
        text = lambda token_id: None if token_id is None else decode(token_id)  # noqa: E731
        return JSONResponse(
            {
                "eos_token": text(facts.eos_token_id),
                "bos_token": text(facts.bos_token_id),
                # No padding: sequences are right-padded inside the server, never by callers.
                "pad_token": None,
                "add_bos_token": facts.bos_by_default,
                "model_max_length": facts.max_context,
                "vocab_size": facts.vocab_size,
            }
        )

    async def tokenize(self, request: Request, body: Any, context: HttpCallContext) -> Response:
        body = _object(body)
        engine = self._engine(body.get("model"))
        text = body.get("prompt")
        if not isinstance(text, str):
            raise CallError(grpc.StatusCode.INVALID_ARGUMENT, "must be a string", "prompt")
        special = body.get("add_special_tokens", True)
        if not isinstance(special, bool):
            raise CallError(
                grpc.StatusCode.INVALID_ARGUMENT, "must be true or false", "add_special_tokens"
            )
        encode = engine.tokenizer.encode
        ids = (
            encode(text)
            if len(text) <= INLINE_TOKENIZE_CHARS
            else await asyncio.to_thread(encode, text)
        )
        facts = engine.facts
        if special and facts.bos_by_default and facts.bos_token_id is not None:
            ids = [facts.bos_token_id, *ids]
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": facts.max_context})

    async def detokenize(self, request: Request, body: Any, context: HttpCallContext) -> Response:
        body = _object(body)
        engine = self._engine(body.get("model"))
        ids = body.get("tokens")
        vocab = engine.facts.vocab_size
        if not isinstance(ids, list):
            raise CallError(
                grpc.StatusCode.INVALID_ARGUMENT, "must be a list of token ids", "tokens"
            )
        for i, token in enumerate(ids):
            if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < vocab:
                raise CallError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"token id {token!r} is outside the vocabulary [0, {vocab})",
                    f"tokens[{i}]",
                )
        return JSONResponse({"prompt": engine.tokenizer.decode(ids)})

    async def health(self, request: Request) -> Response:
        if self._tokens is not None and not self._config.health_without_auth:
            try:
                self._authorize(request)
            except CallError as error:
                return _error_response(error)
        if self.serving:
            return JSONResponse({"status": "SERVING"})
        return JSONResponse({"status": "NOT_SERVING"}, status_code=503)


async def _no_route(request: Request, exc: Exception) -> Response:
    """Unknown paths and methods, in the same error body as every other refusal."""
    status = getattr(exc, "status_code", 404)
    code = grpc.StatusCode.UNIMPLEMENTED if status == 405 else grpc.StatusCode.NOT_FOUND
    message = f"{request.method} {request.url.path}: no such route (docs/clients.md, HTTP)"
    body = CallError(code, message).body()
    body["error"]["type"] = ERROR_TYPES.get(status, "invalid_request_error")
    return JSONResponse(body, status_code=status)


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise CallError(grpc.StatusCode.INVALID_ARGUMENT, "the body must be a JSON object")
    return body


def _too_large(size: int, limit: int) -> CallError:
    return CallError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"{size} bytes exceed the limit of {limit} bytes (--max-message-bytes)",
        "body",
    )


def _code_of(response: Response) -> grpc.StatusCode:
    try:
        code = json.loads(bytes(response.body))["error"]["code"]
        return grpc.StatusCode[code.upper()]
    except (ValueError, KeyError, TypeError):
        return grpc.StatusCode.UNKNOWN


def _count(path: str, code: grpc.StatusCode, model: str, began: float) -> None:
    metrics.REQUESTS.labels(path, code.name, model, "http").inc()
    metrics.LATENCY.labels(path, model, "http").observe(time.perf_counter() - began)


def _peer(request: Request) -> str:
    client = request.client
    return f"ipv4:{client.host}:{client.port}" if client else "unknown"


def _deadline(request: Request) -> float | None:
    value = request.headers.get(TIMEOUT_HEADER)
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not seconds > 0:
        raise CallError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"must be a positive number of seconds, got {value!r}",
            TIMEOUT_HEADER,
        )
    return time.monotonic() + seconds


async def _until_disconnect_or_deadline(
    request: Request, context: HttpCallContext, work: Awaitable[Response]
) -> Response:
    """`work`, cancelled when the client disconnects (its queued model runs dropped, as for
    a cancelled RPC) or its deadline passes (DEADLINE_EXCEEDED)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    remaining = context.time_remaining()
    try:
        done, _ = await asyncio.wait(
            {task, watch}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        watch.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    if watch in done:
        raise ClientDisconnect()
    raise CallError(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        f"deadline of {request.headers.get(TIMEOUT_HEADER)} s ({TIMEOUT_HEADER}) exceeded",
    )


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body is read by then, so the next message
    the server gets is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def ssl_context(config: ServerConfig) -> ssl.SSLContext | None:
    """The gRPC port's certificate, key and client CA for the HTTP port too."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    # load_cert_chain reads files only: the PEM bytes go through a private temporary dir.
    with tempfile.TemporaryDirectory() as directory:
        cert, key = Path(directory, "cert.pem"), Path(directory, "key.pem")
        for path, data in ((cert, config.tls_cert), (key, config.tls_key)):
            path.write_bytes(data)
            os.chmod(path, 0o600)
        context.load_cert_chain(cert, key)
    if config.tls_client_ca is not None:
        context.load_verify_locations(cadata=config.tls_client_ca.decode())
        context.verify_mode = ssl.CERT_REQUIRED
    return context
