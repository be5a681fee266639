"""gRPC servicer: translates between lmscore.v1 protobuf messages and the scoring engine.

It computes nothing itself. Bad input becomes INVALID_ARGUMENT with a
google.rpc.BadRequest field violation; an unknown model name NOT_FOUND.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from lmscore.server.engine import (
    CompletionScore,
    InvalidInput,
    ItemInput,
    ScoreOptions,
    ScoringEngine,
    ScoringPlan,
    Segment,
    TokenInput,
)
from lmscore.v1 import scoring_pb2 as pb
from lmscore.v1 import scoring_pb2_grpc

log = logging.getLogger(__name__)

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


async def _abort_invalid(context: grpc.aio.ServicerContext, field: str, description: str) -> None:
    violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    status = rpc_status.to_status(
        status_pb2.Status(
            code=code_pb2.INVALID_ARGUMENT, message=f"{field}: {description}", details=[detail]
        )
    )
    await context.abort(status.code, status.details, status.trailing_metadata)


class ScorerServicer(scoring_pb2_grpc.ScorerServicer):
    def __init__(self, engine: ScoringEngine, model_info: pb.ModelInfo) -> None:
        self._engine = engine
        self._model_info = model_info

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
        except InvalidInput as exc:
            await _abort_invalid(context, field_prefix + exc.field, exc.description)
            return
        except ModelNotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, field_prefix + str(exc))
            return
        async for result in self._engine.score(plan):
            yield _result_message(result, request, index)

    async def Score(
        self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ScoreResult]:
        try:
            async for message in self._score_one(request, 0, context):
                yield message
        except Exception as exc:
            await _abort_internal(context, exc)

    async def ScoreStream(
        self, request_iterator: AsyncIterator[pb.ScoreRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ScoreResult]:
        try:
            index = 0
            async for request in request_iterator:
                async for message in self._score_one(
                    request, index, context, f"requests[{index}]."
                ):
                    yield message
                index += 1
        except Exception as exc:
            await _abort_internal(context, exc)

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        return self._model_info


async def _abort_internal(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    # context.abort raises an exception of grpc's own to end the RPC: let it through.
    if isinstance(exc, grpc.aio.AbortError):
        raise exc
    request_id = uuid.uuid4().hex[:12]
    log.exception("internal error, request id %s", request_id)
    await context.abort(
        grpc.StatusCode.INTERNAL, f"internal error (request id {request_id}, see server log)"
    )
