"""gRPC servicer: translates between lmscore.v1 protobuf messages and the scoring engine.

It computes nothing itself. Bad input becomes INVALID_ARGUMENT with a
google.rpc.BadRequest field violation; an unknown model name NOT_FOUND.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

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


class ModelNotFound(LookupError):
    pass


def _prompt_of(item: pb.ScoreItem) -> TokenInput | None:
    which = item.WhichOneof("prompt_input")
    if which == "prompt":
        return item.prompt
    if which == "prompt_token_ids":
        return list(item.prompt_token_ids.ids)
    return None


def _completion_of(completion: pb.Completion) -> TokenInput | None:
    which = completion.WhichOneof("input")
    if which == "text":
        return completion.text
    if which == "token_ids":
        return list(completion.token_ids.ids)
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

    def _plan(self, request: pb.ScoreRequest) -> ScoringPlan:
        if request.model and request.model != self._model_info.name:
            raise ModelNotFound(
                f"model: {request.model!r} is not served here; this server serves "
                f"{self._model_info.name!r}"
            )
        items = [
            ItemInput(_prompt_of(item), [_completion_of(c) for c in item.completions])
            for item in request.items
        ]
        return self._engine.plan(items, _options_of(request.options))

    async def _score_one(
        self,
        request: pb.ScoreRequest,
        index: int,
        context: grpc.aio.ServicerContext,
        field_prefix: str = "",
    ) -> AsyncIterator[pb.ScoreResult]:
        try:
            plan = self._plan(request)
        except RequestTooLarge as exc:
            await _abort_with_field(
                context, field_prefix + exc.field, exc.description, code_pb2.RESOURCE_EXHAUSTED
            )
            return
        except InvalidInput as exc:
            await _abort_with_field(
                context, field_prefix + exc.field, exc.description, code_pb2.INVALID_ARGUMENT
            )
            return
        except ModelNotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, field_prefix + str(exc))
            return
        try:
            async for result in self._engine.score(plan):
                metrics.COMPLETIONS.inc()
                metrics.TOKENS.inc(
                    int(result.bos_added) + result.prompt_tokens + result.completion_tokens
                )
                yield _result_message(result, request, index)
        except Overloaded as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))

    async def _admit(self, context: grpc.aio.ServicerContext) -> None:
        if self.active_requests >= self._max_concurrent:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.active_requests} requests in flight, limit {self._max_concurrent} "
                "(--max-concurrent-requests); retry later",
            )

    async def Score(
        self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ScoreResult]:
        await self._admit(context)
        self.active_requests += 1
        metrics.IN_FLIGHT.inc()
        try:
            async for message in self._score_one(request, 0, context):
                yield message
        finally:
            self.active_requests -= 1
            metrics.IN_FLIGHT.dec()

    async def ScoreStream(
        self, request_iterator: AsyncIterator[pb.ScoreRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ScoreResult]:
        await self._admit(context)
        self.active_requests += 1
        metrics.IN_FLIGHT.inc()
        try:
            index = 0
            async for request in request_iterator:
                prefix = f"requests[{index}]."
                async for message in self._score_one(request, index, context, prefix):
                    yield message
                index += 1
        finally:
            self.active_requests -= 1
            metrics.IN_FLIGHT.dec()

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        return self._model_info
