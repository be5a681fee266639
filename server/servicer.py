"""gRPC servicer: translates between lmscore.v1 protobuf messages and the scoring engines.

It computes nothing itself. Each served model has its own engine; a request
goes to the one its `model` field names (empty: the first). Bad input becomes
INVALID_ARGUMENT with a google.rpc.BadRequest field violation; an unknown model
name NOT_FOUND, with a violation of the field `model`.
Planning (tokenizing) and the conversion of results with token details run on
worker threads, so the event loop keeps answering other calls (health checks
too) while a large request is planned or refused.

Admission counts requests being scored, all models together, not open calls: a
ScoreStream takes a slot only while one of its requests is planned and scored,
and one that sends nothing for --stream-idle-timeout seconds is ended.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from lmscore.server import metrics
from lmscore.server.engine import ScoringEngine
from lmscore.server.planning import RollingPlan, ScoringPlan
from lmscore.server.requests import InvalidInput, ItemInput, Overloaded, RequestTooLarge, TokenInput
from lmscore.v1 import messages, scoring_pb2_grpc
from lmscore.v1 import scoring_pb2 as pb
from lmscore.v1.options import RollingOptions, ScoreOptions
from lmscore.v1.results import RollingResult, ScoreResult, Token, Word

Planned = TypeVar("Planned")
Options = TypeVar("Options")
# Requests up to this size are planned on the event loop: tokenizing a few kilobytes takes
# less than the hop to a worker thread and back (which, with ONNX Runtime's threads
# spinning after a run, can cost milliseconds on a small machine).
INLINE_PLAN_BYTES = 16 * 1024
# Results with more token details than this are converted to messages on a worker thread.
INLINE_TOKEN_DETAILS = 256
# An overloaded server asks clients to retry after this many milliseconds (the metadata key
# of gRPC's retry throttling, which its own retry policies honour too).
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"
# The pushback is the time the requests ahead take at the recent answer rate, within these
# bounds: clients that come back before a slot can be free cost a refusal each time.
MIN_RETRY_PUSHBACK_MS = 250
MAX_RETRY_PUSHBACK_MS = 30_000
# The answer rate is that of the last this many seconds.
ANSWER_RATE_WINDOW_S = 5.0
MIN_ANSWERS_FOR_RATE = 8
# Characters of an unknown model name echoed in the NOT_FOUND message.
ECHOED_NAME_CHARS = 64


class ModelNotFound(LookupError):
    pass


@dataclasses.dataclass(frozen=True)
class ServedModel:
    """One model of the server: its engine, and what GetModelInfo says of it (whose `name`
    requests select it by)."""

    engine: ScoringEngine
    info: pb.ModelInfo

    @property
    def name(self) -> str:
        return self.info.name


def _token_input(message: Any, oneof: str) -> TokenInput | None:
    """A text-or-token-ids oneof (ScoreItem.prompt_input, Completion.input, RollingText.input):
    the text, the ids, or None when unset."""
    which = message.WhichOneof(oneof)
    if which is None:
        return None
    value = getattr(message, which)
    return value if isinstance(value, str) else list(value.ids)


def _options(message: Any, options_type: type[Options]) -> Options:
    """A request's options message as the contract's options type, by field name."""
    try:
        return messages.from_message(message, options_type)
    except messages.UnknownEnumValue as exc:
        raise InvalidInput(f"options.{exc.field}", exc.description) from None


def _word_message(word: Word) -> pb.Word:
    """A Word as its message; None stays unset."""
    return pb.Word(**{k: v for k, v in dataclasses.asdict(word).items() if v is not None})


def _token_message(token: Token) -> pb.TokenDetail:
    """A Token as a TokenDetail, field by field under the same names."""
    message = pb.TokenDetail(
        id=token.id,
        text=token.text,
        segment=pb.Segment.Value(f"SEGMENT_{token.segment.name}"),
        rank=token.rank,
        top=[pb.TopToken(**dataclasses.asdict(top)) for top in token.top],
    )
    # Optional fields: None stays unset.
    for name in ("logprob", "start", "end", "entropy"):
        if (value := getattr(token, name)) is not None:
            setattr(message, name, value)
    return message


def _result_message(result: ScoreResult, request: pb.ScoreRequest, index: int) -> pb.ScoreResult:
    """A ScoreResult as its message, field by field under the same names; the transport's
    fields from the request."""
    values = {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}
    # Optional fields: None stays unset (the normalized scores without a divisor, PMI not asked).
    values = {name: value for name, value in values.items() if value is not None}
    values.update(
        tokens=[_token_message(t) for t in result.tokens],
        words=[_word_message(w) for w in result.words],
        prompt_words=[_word_message(w) for w in result.prompt_words],
        distributions=[
            pb.Distribution(position=d.position, logprobs=d.logprobs) for d in result.distributions
        ],
        request_id=request.request_id,
        request_index=index,
    )
    return pb.ScoreResult(**values)


def _rolling_message(result: RollingResult, request: pb.RollingRequest) -> pb.RollingResult:
    return pb.RollingResult(**{**dataclasses.asdict(result), "request_id": request.request_id})


class AnswerRate:
    """Calls answered per second over the last ANSWER_RATE_WINDOW_S, and how long the calls
    ahead of a newcomer will take at that rate: when an overloaded server asks it back."""

    def __init__(self) -> None:
        self._ends: collections.deque[float] = collections.deque()

    def answered(self) -> None:
        self._ends.append(time.monotonic())

    def pushback_ms(self, ahead: int) -> int:
        since = time.monotonic() - ANSWER_RATE_WINDOW_S
        while self._ends and self._ends[0] < since:
            self._ends.popleft()
        if len(self._ends) < MIN_ANSWERS_FOR_RATE:
            return MIN_RETRY_PUSHBACK_MS  # no rate to go by (a burst's start, long calls)
        wait_ms = 1000 * ahead * ANSWER_RATE_WINDOW_S / len(self._ends)
        return int(min(max(wait_ms, MIN_RETRY_PUSHBACK_MS), MAX_RETRY_PUSHBACK_MS))


async def _abort_with_pushback(
    context: grpc.aio.ServicerContext, message: str, pushback_ms: int
) -> None:
    """RESOURCE_EXHAUSTED for a server at its limit, telling the client when to come back
    (gRPC's retry pushback; the project's clients wait that long before retrying): clients
    that retry at once would spend the server's CPU on refusals."""
    await context.abort(
        grpc.StatusCode.RESOURCE_EXHAUSTED, message, ((RETRY_PUSHBACK_KEY, str(pushback_ms)),)
    )


async def _abort_with_field(
    context: grpc.aio.ServicerContext, field: str, description: str, code: int
) -> None:
    """Abort with a google.rpc.BadRequest field violation that clients can read."""
    violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    status = rpc_status.to_status(
        status_pb2.Status(code=code, message=f"{field}: {description}", details=[detail])
    )
    await context.abort(status.code, status.details, status.trailing_metadata)


class ScorerServicer(scoring_pb2_grpc.ScorerServicer):
    """`models`: in the order served; the first takes requests that name none."""

    def __init__(
        self,
        models: Sequence[ServedModel],
        max_concurrent_requests: int = 64,
        stream_idle_timeout: float = 0.0,
        max_waiting_requests: int = 0,
        max_waiting_bytes: int = 0,
    ) -> None:
        if not models:
            raise ValueError("a servicer needs at least one model")
        self._models = {model.name: model for model in models}
        self._first = models[0]
        self._model_list = pb.ListModelsResponse(models=[model.info for model in models])
        self._max_concurrent = max_concurrent_requests
        self._stream_idle_timeout = stream_idle_timeout or None
        self.active_requests = 0
        # Requests past the concurrency limit wait here (first come, first served) for a
        # slot, up to a count and their messages' bytes; past those they are refused.
        self._slots = asyncio.Semaphore(max_concurrent_requests)
        self._max_waiting = max_waiting_requests
        self._max_waiting_bytes = max_waiting_bytes
        self.waiting_requests = 0
        self._waiting_bytes = 0
        self._answer_rate = AnswerRate()

    def model(self, name: str) -> ServedModel:
        """The model a request's `model` field names (empty: the first); ModelNotFound."""
        if not name:
            return self._first
        model = self._models.get(name)
        if model is None:
            shown = name if len(name) <= ECHOED_NAME_CHARS else name[:ECHOED_NAME_CHARS] + "..."
            served = ", ".join(repr(n) for n in self._models)
            raise ModelNotFound(f"{shown!r} is not served here; served: {served}")
        return model

    async def _model_or_abort(
        self, context: grpc.aio.ServicerContext, name: str, field_prefix: str = ""
    ) -> ServedModel:
        try:
            return self.model(name)
        except ModelNotFound as exc:
            await _abort_with_field(context, field_prefix + "model", str(exc), code_pb2.NOT_FOUND)
        _unreachable()

    @staticmethod
    def _plan(model: ServedModel, request: pb.ScoreRequest) -> ScoringPlan:
        items = [
            ItemInput(
                _token_input(item, "prompt_input"),
                [_token_input(c, "input") for c in item.completions],
            )
            for item in request.items
        ]
        options = _options(request.options, ScoreOptions)
        return model.engine.plan(items, options, request_id=request.request_id)

    @staticmethod
    def _plan_rolling(model: ServedModel, request: pb.RollingRequest) -> RollingPlan:
        options = _options(request.options, RollingOptions)
        return model.engine.plan_rolling(
            [_token_input(t, "input") for t in request.texts],
            options,
            request_id=request.request_id,
        )

    async def _plan_or_abort(
        self,
        context: grpc.aio.ServicerContext,
        make_plan: Callable[[], Planned],
        request_bytes: int,
        field_prefix: str = "",
    ) -> Planned:
        """The plan (made on a worker thread unless the request is small), or the call
        aborted with the status its bad field deserves."""
        try:
            if request_bytes <= INLINE_PLAN_BYTES:
                return make_plan()
            return await asyncio.to_thread(make_plan)
        except RequestTooLarge as exc:
            await _abort_with_field(
                context, field_prefix + exc.field, exc.description, code_pb2.RESOURCE_EXHAUSTED
            )
        except InvalidInput as exc:
            await _abort_with_field(
                context, field_prefix + exc.field, exc.description, code_pb2.INVALID_ARGUMENT
            )
        _unreachable()

    async def _score_one(
        self,
        model: ServedModel,
        request: pb.ScoreRequest,
        index: int,
        context: grpc.aio.ServicerContext,
        field_prefix: str = "",
    ) -> AsyncIterator[pb.ScoreResult]:
        plan = await self._plan_or_abort(
            context, lambda: self._plan(model, request), request.ByteSize(), field_prefix
        )
        completions = metrics.COMPLETIONS.labels(model.name)
        tokens = metrics.TOKENS.labels(model.name)
        try:
            async for result in model.engine.score(plan):
                completions.inc()
                tokens.inc(int(result.bos_added) + result.prompt_tokens + result.completion_tokens)
                if len(result.tokens) > INLINE_TOKEN_DETAILS:  # convert off the event loop
                    yield await asyncio.to_thread(_result_message, result, request, index)
                else:
                    yield _result_message(result, request, index)
        except Overloaded as exc:
            await self._abort_overloaded(context, str(exc))

    @contextlib.asynccontextmanager
    async def _admitted(
        self, context: grpc.aio.ServicerContext, model: ServedModel, message_bytes: int
    ) -> AsyncIterator[None]:
        """Counts the call in flight (all models together): at once when a slot is free,
        else after waiting for one, or aborts it when the wait is full too. Waiting costs
        no CPU, where a refusal costs the server and a client that comes back the CPU of
        a call each time: under overload, queued requests keep the answered rate at
        capacity (docs/production.md, "Overload")."""
        if self._slots.locked():
            await self._wait_for_slot(context, message_bytes)
        else:
            await self._slots.acquire()
        in_flight = metrics.IN_FLIGHT.labels(model.name)
        self.active_requests += 1
        in_flight.inc()
        try:
            yield
        finally:
            self.active_requests -= 1
            in_flight.dec()
            self._slots.release()
            self._answer_rate.answered()

    async def _abort_overloaded(self, context: grpc.aio.ServicerContext, message: str) -> None:
        ahead = self.active_requests + self.waiting_requests
        await _abort_with_pushback(context, message, self._answer_rate.pushback_ms(ahead))

    async def _wait_for_slot(self, context: grpc.aio.ServicerContext, message_bytes: int) -> None:
        """Wait for a slot, or abort overloaded when --max-waiting-requests or
        --max-waiting-bytes are taken. A caller that leaves (cancelled, deadline) stops
        waiting: its message is dropped with it."""
        if self.waiting_requests >= self._max_waiting:
            await self._abort_overloaded(
                context,
                f"{self.active_requests} requests in flight (--max-concurrent-requests "
                f"{self._max_concurrent}) and {self.waiting_requests} waiting "
                f"(--max-waiting-requests {self._max_waiting}); retry later",
            )
        if self._waiting_bytes + message_bytes > self._max_waiting_bytes:
            await self._abort_overloaded(
                context,
                f"{self.active_requests} requests in flight and {self._waiting_bytes} bytes "
                f"of requests waiting, +{message_bytes} over --max-waiting-bytes "
                f"{self._max_waiting_bytes}; retry later",
            )
        self.waiting_requests += 1
        self._waiting_bytes += message_bytes
        metrics.WAITING.inc()
        try:
            await self._slots.acquire()
        finally:
            self.waiting_requests -= 1
            self._waiting_bytes -= message_bytes
            metrics.WAITING.dec()

    async def Score(
        self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ScoreResult]:
        model = await self._model_or_abort(context, request.model)
        async with self._admitted(context, model, request.ByteSize()):
            async for message in self._score_one(model, request, 0, context):
                yield message

    async def ScoreStream(
        self, request_iterator: AsyncIterator[pb.ScoreRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ScoreResult]:
        requests = aiter(request_iterator)
        index = 0
        while True:
            try:
                request = await asyncio.wait_for(anext(requests), self._stream_idle_timeout)
            except StopAsyncIteration:
                return
            except TimeoutError:
                await context.abort(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"no request on this stream for {self._stream_idle_timeout:g} s "
                    "(--stream-idle-timeout); open a new stream to send more",
                )
            prefix = f"requests[{index}]."
            model = await self._model_or_abort(context, request.model, prefix)
            async with self._admitted(context, model, request.ByteSize()):
                async for message in self._score_one(model, request, index, context, prefix):
                    yield message
            index += 1

    async def ScoreRolling(
        self, request: pb.RollingRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.RollingResult]:
        model = await self._model_or_abort(context, request.model)
        request_bytes = request.ByteSize()
        async with self._admitted(context, model, request_bytes):
            plan = await self._plan_or_abort(
                context, lambda: self._plan_rolling(model, request), request_bytes
            )
            texts = metrics.ROLLING_TEXTS.labels(model.name)
            tokens = metrics.TOKENS.labels(model.name)
            try:
                async for result in model.engine.score_rolling(plan):
                    texts.inc()
                    tokens.inc(result.token_count)
                    yield _rolling_message(result, request)
            except Overloaded as exc:
                await self._abort_overloaded(context, str(exc))

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        return (await self._model_or_abort(context, request.model)).info

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return self._model_list


def _unreachable() -> NoReturn:
    raise AssertionError("context.abort raises")
