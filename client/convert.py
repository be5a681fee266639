"""Between the client's dataclasses and lmscore.v1 protobuf messages (shared by both clients)."""

from __future__ import annotations

import json
from collections.abc import Sequence

from lmscore.client.types import (
    Item,
    ModelInfo,
    QuantizationInfo,
    RollingOptions,
    RollingResult,
    ScoreOptions,
    ScoreRequest,
    ScoreResult,
    Token,
    TokenInput,
    TopToken,
)
from lmscore.v1 import scoring_pb2 as pb

_SEGMENTS = {
    pb.SEGMENT_BOS: "bos",
    pb.SEGMENT_PROMPT: "prompt",
    pb.SEGMENT_COMPLETION: "completion",
}
_MARGINAL = {
    "same_pass": pb.MARGINAL_MODE_SAME_PASS,
    "separate_pass": pb.MARGINAL_MODE_SEPARATE_PASS,
}


def _set_prompt(message: pb.ScoreItem, prompt: TokenInput | None) -> None:
    if isinstance(prompt, str):
        message.prompt = prompt
    elif prompt is not None:
        message.prompt_token_ids.ids.extend(prompt)


def _completion(completion: TokenInput) -> pb.Completion:
    if isinstance(completion, str):
        return pb.Completion(text=completion)
    return pb.Completion(token_ids=pb.TokenIds(ids=list(completion)))


def request_to_pb(request: ScoreRequest) -> pb.ScoreRequest:
    options = request.options
    if options.marginal not in _MARGINAL:
        raise ValueError(f"marginal must be one of {sorted(_MARGINAL)}, got {options.marginal!r}")
    message = pb.ScoreRequest(
        model=options.model,
        request_id=request.request_id,
        options=pb.ScoreOptions(
            token_details=options.token_details,
            top_k=options.top_k,
            marginal_mode=_MARGINAL[options.marginal],
            truncate_prompt_left=options.truncate_prompt_left,
        ),
    )
    if options.add_bos is not None:
        message.options.add_bos = options.add_bos
    for item in request.items:
        item_message = message.items.add()
        _set_prompt(item_message, item.prompt)
        item_message.completions.extend(_completion(c) for c in item.completions)
    return message


def build_request(items: Sequence[Item], options: ScoreOptions | None) -> pb.ScoreRequest:
    return request_to_pb(ScoreRequest(items, options or ScoreOptions()))


def result_from_pb(message: pb.ScoreResult) -> ScoreResult:
    return ScoreResult(
        item_index=message.item_index,
        completion_index=message.completion_index,
        joint_logprob=message.joint_logprob,
        marginal_logprob=message.marginal_logprob,
        conditional_logprob=message.conditional_logprob,
        greedy=message.greedy,
        prompt_tokens=message.prompt_tokens,
        completion_tokens=message.completion_tokens,
        bos_added=message.bos_added,
        truncated_prompt_tokens=message.truncated_prompt_tokens,
        first_token_scored=message.first_token_scored,
        scored_prompt=message.scored_prompt,
        scored_completion=message.scored_completion,
        tokens=tuple(
            Token(
                id=t.id,
                text=t.text,
                segment=_SEGMENTS[t.segment],  # type: ignore[arg-type]
                logprob=t.logprob if t.HasField("logprob") else None,
                rank=t.rank,
                top=tuple(TopToken(x.id, x.text, x.logprob) for x in t.top),
            )
            for t in message.tokens
        ),
        request_id=message.request_id,
        request_index=message.request_index,
    )


def model_info_from_pb(message: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(
        name=message.name,
        architecture=message.architecture,
        vocab_size=message.vocab_size,
        bos_token_id=None if message.bos_token_id < 0 else message.bos_token_id,
        eos_token_id=None if message.eos_token_id < 0 else message.eos_token_id,
        max_context=message.max_context,
        dtype=message.dtype,
        providers=tuple(message.providers),
        onnxruntime_version=message.onnxruntime_version,
        export_validation_max_abs_diff=message.export_validation_max_abs_diff,
        source_sha256=message.source_sha256,
        max_top_k=message.max_top_k,
        manifest=json.loads(message.manifest_json) if message.manifest_json else {},
        quantization=QuantizationInfo(
            recipe=message.quantization.recipe,
            speedup=message.quantization.speedup,
            mean_abs_deviation=message.quantization.mean_abs_deviation,
            max_abs_deviation=message.quantization.max_abs_deviation,
            held_out_tokens=message.quantization.held_out_tokens,
        )
        if message.HasField("quantization")
        else None,
    )


def rolling_request_to_pb(
    texts: Sequence[TokenInput], options: RollingOptions | None, request_id: str = ""
) -> pb.RollingRequest:
    options = options or RollingOptions()
    return pb.RollingRequest(
        model=options.model,
        request_id=request_id,
        options=pb.RollingOptions(
            max_window_tokens=options.max_window_tokens,
            min_context_tokens=options.min_context_tokens,
            token_logprobs=options.token_logprobs,
        ),
        texts=[
            pb.RollingText(text=t)
            if isinstance(t, str)
            else pb.RollingText(token_ids=pb.TokenIds(ids=list(t)))
            for t in texts
        ],
    )


def rolling_result_from_pb(message: pb.RollingResult) -> RollingResult:
    return RollingResult(
        text_index=message.text_index,
        logprob=message.logprob,
        token_count=message.token_count,
        perplexity=message.perplexity,
        windows=message.windows,
        prefix_token_id=message.prefix_token_id,
        token_ids=tuple(message.token_ids),
        token_logprobs=tuple(message.token_logprobs),
        request_id=message.request_id,
    )


def in_input_order(results: list[ScoreResult]) -> list[ScoreResult]:
    return sorted(results, key=lambda r: (r.request_index, r.item_index, r.completion_index))
