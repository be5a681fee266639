"""Between the client's dataclasses and lmscore.v1 protobuf messages (shared by both clients)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from lmscore.client.types import (
    Item,
    ModelInfo,
    QuantizationInfo,
    RollingOptions,
    ScoreOptions,
    ScoreRequest,
    TokenInput,
)
from lmscore.v1 import messages
from lmscore.v1 import scoring_pb2 as pb
from lmscore.v1.results import (
    Distribution,
    RollingResult,
    ScoreResult,
    Segment,
    Token,
    TopToken,
    Word,
)


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
    message = pb.ScoreRequest(
        model=options.model,
        request_id=request.request_id,
        options=messages.to_message(options, pb.ScoreOptions),
    )
    for item in request.items:
        item_message = message.items.add()
        _set_prompt(item_message, item.prompt)
        item_message.completions.extend(_completion(c) for c in item.completions)
    return message


def build_request(items: Sequence[Item], options: ScoreOptions | None) -> pb.ScoreRequest:
    return request_to_pb(ScoreRequest(items, options or ScoreOptions()))


def label_options(
    labels: Sequence[str] | Sequence[int], options: ScoreOptions | None
) -> ScoreOptions:
    """`options` asking for `labels`: as label_tokens (strings) or label_token_ids (ids)."""
    field = "label_tokens" if labels and isinstance(labels[0], str) else "label_token_ids"
    return dataclasses.replace(options or ScoreOptions(), **{field: tuple(labels)})


def _fields_of(result_type: Any, message: Any) -> dict[str, Any]:
    """The values of `message`'s fields that `result_type` (a dataclass) declares: the
    contract's messages and its Python results share their field names. An optional field
    left unset is None."""
    fields = message.DESCRIPTOR.fields_by_name
    return {
        f.name: None
        if fields[f.name].has_presence
        and fields[f.name].message_type is None
        and not message.HasField(f.name)
        else getattr(message, f.name)
        for f in dataclasses.fields(result_type)
    }


def _token_from_pb(message: pb.TokenDetail) -> Token:
    return Token(
        **{
            **_fields_of(Token, message),
            "segment": Segment[pb.Segment.Name(message.segment).removeprefix("SEGMENT_")],
            "top": tuple(TopToken(**_fields_of(TopToken, top)) for top in message.top),
        }
    )


def result_from_pb(message: pb.ScoreResult) -> ScoreResult:
    values = _fields_of(ScoreResult, message)
    values["tokens"] = tuple(_token_from_pb(t) for t in message.tokens)
    values["words"] = tuple(Word(**_fields_of(Word, w)) for w in message.words)
    values["prompt_words"] = tuple(Word(**_fields_of(Word, w)) for w in message.prompt_words)
    values["label_logprobs"] = tuple(message.label_logprobs)
    values["distributions"] = tuple(
        Distribution(d.position, d.logprobs) for d in message.distributions
    )
    return ScoreResult(**values)


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
        bos_by_default=message.bos_by_default,
        manifest=json.loads(message.manifest_json) if message.manifest_json else {},
        quantization=QuantizationInfo(
            recipe=message.quantization.recipe,
            speedup=message.quantization.speedup,
            mean_abs_deviation=message.quantization.mean_abs_deviation,
            max_abs_deviation=message.quantization.max_abs_deviation,
            held_out_tokens=message.quantization.held_out_tokens,
            kl_divergence=message.quantization.kl_divergence,
            top1_agreement=message.quantization.top1_agreement,
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
        options=messages.to_message(options, pb.RollingOptions),
        texts=[
            pb.RollingText(text=t)
            if isinstance(t, str)
            else pb.RollingText(token_ids=pb.TokenIds(ids=list(t)))
            for t in texts
        ],
    )


def rolling_result_from_pb(message: pb.RollingResult) -> RollingResult:
    values = _fields_of(RollingResult, message)
    values.update(token_ids=tuple(message.token_ids), token_logprobs=tuple(message.token_logprobs))
    return RollingResult(**values)


def in_input_order(results: list[ScoreResult]) -> list[ScoreResult]:
    return sorted(results, key=lambda r: (r.request_index, r.item_index, r.completion_index))
