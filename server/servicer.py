"""gRPC servicer: translates between lmscore.v1 protobuf messages and the scoring engine.

It computes nothing itself. Bad input becomes INVALID_ARGUMENT with a
google.rpc.BadRequest field violation; an unknown model name NOT_FOUND.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import NoReturn, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from lmscore.server import metrics
from lmscore.server.engine import (
    CompletionScore,
    InvalidInput,
    ItemInput,
    Overloaded,
    RequestTooLarge,
    RollingOptions,
    RollingPlan,
    RollingScore,
    ScoreOptions,
    ScoringEngine,
    ScoringPlan,
    Segment,
    TokenInput,
)
from lmscore.v1 import scoring_pb2 as pb
from lmscore.v1 import scoring_pb2_grpc

_SEGMENTS = {
    Segment.BOS: pb.SEGMENT_BOS,
    Segment.PROMPT: pb.SEGMENT_PROMPT,
    Segment.COMPLETION: pb.SEGMENT_COMPLETION,
}


Planned = TypeVar("Planned")


class ModelNotFound(LookupError):
    pass


def _prompt_of(item: pb.ScoreItem) -> TokenInput | None:
    which = item.WhichOneof("prompt_input")
    if which == "prompt":
        return item.prompt
    if which == "prompt_token_ids":
        return list(item.prompt_token_ids.ids)
    return None


def _input_of(message: pb.Completion | pb.RollingText) -> TokenInput | None:
    """The `input` oneof of a Completion or RollingText: text, token ids or unset."""
    which = message.WhichOneof("input")
    if which == "text":
        return message.text
    if which == "token_ids":
        return list(message.token_ids.ids)
    return None


def _options_of(options: pb.ScoreOptions) -> ScoreOptions:
    if options.marginal_mode not in pb.MarginalMode.values():
        raise InvalidInput(
            "options.marginal_mode",
            f"unknown value {options.marginal_mode}; known: "
            + ", ".join(f"{n} = {v}" for n, v in pb.MarginalMode.items()),
        )
    return ScoreOptions(
        token_details=options.token_details,
        top_k=options.top_k,
        separate_marginal_pass=options.marginal_mode == pb.MARGINAL_MODE_SEPARATE_PASS,
        truncate_prompt_left=options.truncate_prompt_left,
        add_bos=options.add_bos if options.HasField("add_bos") else None,
    )


def _rolling_message(result: RollingScore, request: pb.RollingRequest) -> pb.RollingResult:
    return pb.RollingResult(
        text_index=result.text_index,
        request_id=request.request_id,
        logprob=result.logprob,
        token_count=result.token_count,
        perplexity=result.perplexity,
        windows=result.windows,
        prefix_token_id=result.prefix_token_id,
        token_logprobs=result.token_logprobs,
        token_ids=result.token_ids,
    )


def _result_message(
    result: CompletionScore, request: pb.ScoreRequest, index: int
) -> pb.ScoreResult:
    message = pb.ScoreResult(
        item_index=result.item_index,
        completion_index=result.completion_index,
        request_id=request.request_id,
        request_index=index,
        joint_logprob=result.joint_logprob,
        marginal_logprob=result.marginal_logprob,
        conditional_logprob=result.conditional_logprob,
        greedy=result.greedy,
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        bos_added=result.bos_added,
        truncated_prompt_tokens=result.truncated_prompt_tokens,
        first_token_scored=result.first_token_scored,
        scored_prompt=result.scored_prompt,
        scored_completion=result.scored_completion,
    )
    for token in result.tokens:
        detail = message.tokens.add(
            id=token.id, text=token.text, segment=_SEGMENTS[token.segment], rank=token.rank
        )
        if token.logprob is not None:
            detail.logprob = token.logprob
        for top in token.top:
            detail.top.add(id=top.id, text=top.text, logprob=top.logprob)
    return message


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
    def __init__(
        self, engine: ScoringEngine, model_info: pb.ModelInfo, max_concurrent_requests: int = 64
    ) -> None:
        self._engine = engine
        self._model_info = model_info
        self._max_concurrent = max_concurrent_requests
        self.active_requests = 0

    def _check_model(self, model: str) -> None:
        if model and model != self._model_info.name:
            raise ModelNotFound(
                f"model: {model!r} is not served here; this server serves {self._model_info.name!r}"
            )

    def _plan(self, request: pb.ScoreRequest) -> ScoringPlan:
        self._check_model(request.model)
        items = [
            ItemInput(_prompt_of(item), [_input_of(c) for c in item.completions])
            for item in request.items
        ]
        return self._engine.plan(items, _options_of(request.options))

    def _plan_rolling(self, request: pb.RollingRequest) -> RollingPlan:
        self._check_model(request.model)
        options = RollingOptions(
            max_window_tokens=request.options.max_window_tokens,
            min_context_tokens=request.options.min_context_tokens,
            token_logprobs=request.options.token_logprobs,
        )
        return self._engine.plan_rolling([_input_of(t) for t in request.texts], options)

    async def _plan_or_abort(
        self,
        context: grpc.aio.ServicerContext,
        make_plan: Callable[[], Planned],
        field_prefix: str = "",
    ) -> Planned:
        """The plan, or the call aborted with the status its bad field deserves."""
        try:
            return make_plan()
        except RequestTooLarge as exc:
            await _abort_with_field(
                context, field_prefix + exc.field, exc.description, code_pb2.RESOURCE_EXHAUSTED
            )
        except InvalidInput as exc:
            await _abort_with_field(
                context, field_prefix + exc.field, exc.description, code_pb2.INVALID_ARGUMENT
            )
        except ModelNotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, field_prefix + str(exc))
        _unreachable()

    async def _score_one(
        self,
        request: pb.ScoreRequest,
        index: int,
        context: grpc.aio.ServicerContext,
        field_prefix: str = "",
    ) -> AsyncIterator[pb.ScoreResult]:
        plan = await self._plan_or_abort(context, lambda: self._plan(request), field_prefix)
        try:
            async for result in self._engine.score(plan):
                metrics.COMPLETIONS.inc()
                metrics.TOKENS.inc(
                    int(result.bos_added) + result.prompt_tokens + result.completion_tokens
                )
                yield _result_message(result, request, index)
        except Overloaded as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))

    @contextlib.asynccontextmanager
    async def _admitted(self, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        """Counts the call in flight, or aborts it when the server is at its limit."""
        if self.active_requests >= self._max_concurrent:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.active_requests} requests in flight, limit {self._max_concurrent} "
                "(--max-concurrent-requests); retry later",
            )
        self.active_requests += 1
        metrics.IN_FLIGHT.inc()
        try:
            yield
        finally:
            self.active_requests -= 1
            metrics.IN_FLIGHT.dec()

    async def Score(
        self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ScoreResult]:
        async with self._admitted(context):
            async for message in self._score_one(request, 0, context):
                yield message

    async def ScoreStream(
        self, request_iterator: AsyncIterator[pb.ScoreRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ScoreResult]:
        async with self._admitted(context):
            index = 0
            async for request in request_iterator:
                prefix = f"requests[{index}]."
                async for message in self._score_one(request, index, context, prefix):
                    yield message
                index += 1

    async def ScoreRolling(
        self, request: pb.RollingRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.RollingResult]:
        async with self._admitted(context):
            plan = await self._plan_or_abort(context, lambda: self._plan_rolling(request))
            try:
                async for result in self._engine.score_rolling(plan):
                    metrics.ROLLING_TEXTS.inc()
                    metrics.TOKENS.inc(result.token_count)
                    yield _rolling_message(result, request)
            except Overloaded as exc:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        return self._model_info


def _unreachable() -> NoReturn:
    raise AssertionError("context.abort raises")
