"""OpenAI's legacy completions API, for scoring: a `/v1/completions` body -> a ScoreRequest
message, and its results -> the completions response. Pure translation: the scores are
the Score RPC's own (lmscore.server.http_transport runs the request through the same
servicer and engine as a gRPC call).

The rules, as lm-evaluation-harness's `local-completions` model, HELM and the `openai`
SDKs use them:

* `prompt`: a string, a list of strings, a list of token ids, or a list of token-id
  lists; each prompt is one item of one Score request (batched together), answered by
  the choice of the same `index`.
* Token-id prompts are scored as given (no BOS added). Text prompts follow the model's
  BOS rule, as a gRPC request that leaves `add_bos` unset; a BOS the server adds is not
  echoed: the echoed tokens are the prompt's own, so indices into them (lm-eval's
  `ctxlen`) mean the same whether the server adds BOS or not. The first echoed token's
  log-prob is therefore null only when nothing precedes it (no BOS).
* `echo: true` returns every prompt token in `logprobs`: `tokens`, `token_logprobs`,
  `top_logprobs` (`logprobs` entries each, null where the log-prob is), `text_offset`
  (code points into `text`).
* `max_tokens`: 0 (pure scoring; also when absent) or 1: the greedy next token after
  the prompt (the top entry of the distribution there, ties to the lower id), appended
  with its log-prob and top alternatives, as lm-eval reads it.
* What a scoring server does not do is refused naming the field: `max_tokens` > 1,
  `n` or `best_of` > 1, `stream`, `suffix`, `logit_bias`, penalties, and sampling
  (`temperature` > 0 or `top_p` < 1 with `max_tokens` 1). `seed`, `stop` and `user` are
  accepted and change nothing (scores are deterministic). Unknown fields are refused.
"""

from __future__ import annotations

import dataclasses
import re
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from lmscore.v1 import scoring_pb2 as pb

# Placeholder target for max_tokens 1: the result of its position is what the model
# predicts after the prompt; the placeholder's own score is not returned.
_NEXT_TOKEN_PLACEHOLDER = 0
# Fields accepted and ignored, with why in the module docstring.
_IGNORED = ("seed", "stop", "user")
_KNOWN = {
    "model",
    "prompt",
    "echo",
    "logprobs",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "best_of",
    "stream",
    "stream_options",
    "suffix",
    "logit_bias",
    "presence_penalty",
    "frequency_penalty",
    *_IGNORED,
}


class ApiError(ValueError):
    """A request the API refuses: HTTP `status`, and `param`, the field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param)


@dataclasses.dataclass(frozen=True)
class CompletionCall:
    """A checked /v1/completions request and the Score request that answers it."""

    model: str
    prompts: tuple[str | tuple[int, ...], ...]
    echo: bool
    # Alternatives per token in top_logprobs; None: no logprobs object at all.
    logprobs: int | None
    max_tokens: int
    request: pb.ScoreRequest


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _prompts(value: Any) -> list[str | tuple[int, ...]]:
    """The prompts of `prompt`, in the four shapes OpenAI takes."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        raise _bad(
            "prompt",
            "must be a string, a list of strings, a list of token ids, "
            "or a list of token-id lists, and not empty",
        )
    if all(isinstance(p, str) for p in value):
        return list(value)
    if all(_is_int(t) for t in value):
        return [tuple(value)]
    if all(isinstance(p, list) for p in value):
        for i, ids in enumerate(value):
            for j, token in enumerate(ids):
                if not _is_int(token):
                    raise _bad(f"prompt[{i}][{j}]", f"a token id must be an integer, got {token!r}")
        return [tuple(ids) for ids in value]
    raise _bad("prompt", "mixes strings, token ids and lists; send one shape")


def _check_int(body: dict[str, Any], name: str, low: int, high: int, default: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value) or not low <= value <= high:
        raise _bad(name, f"must be an integer in [{low}, {high}], got {value!r}")
    return int(value)


def _check_number(body: dict[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise _bad(name, f"must be a number, got {value!r}")
    return float(value)


def _refuse_generation_options(body: dict[str, Any], max_tokens: int) -> None:
    """What only text generation would use: refused unless it asks for nothing."""
    for name in ("n", "best_of"):
        _check_int(body, name, 1, 1, 1)
    if body.get("stream") not in (None, False):
        raise _bad("stream", "streaming is not supported: scores come in one response")
    if body.get("stream_options") is not None:
        raise _bad("stream_options", "streaming is not supported")
    if body.get("suffix") not in (None, ""):
        raise _bad("suffix", "is not supported: a suffix is for insertion, which is generation")
    if body.get("logit_bias") not in (None, {}):
        raise _bad("logit_bias", "is not supported: scores are the model's own")
    for name in ("presence_penalty", "frequency_penalty"):
        if _check_number(body, name) not in (None, 0.0):
            raise _bad(name, "is not supported: scores are the model's own")
    temperature, top_p = _check_number(body, "temperature"), _check_number(body, "top_p")
    if max_tokens and temperature not in (None, 0.0):
        raise _bad("temperature", "must be 0: the next token is the greedy one, no sampling")
    if max_tokens and top_p not in (None, 1.0):
        raise _bad("top_p", "must be 1: the next token is the greedy one, no sampling")


def parse_completion_request(body: Any, max_top_k: int) -> CompletionCall:
    """Check a /v1/completions body; ApiError names the first field at fault."""
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", None)
    unknown = sorted(set(body) - _KNOWN)
    if unknown:
        raise _bad(unknown[0], "unknown field (lmscore's /v1/completions scores; see its docs)")
    model = body.get("model") or ""
    if not isinstance(model, str):
        raise _bad("model", f"must be a string, got {model!r}")
    if "prompt" not in body:
        raise _bad("prompt", "is required")
    prompts = _prompts(body["prompt"])
    echo = body.get("echo", False)
    if not isinstance(echo, bool):
        raise _bad("echo", f"must be true or false, got {echo!r}")
    asked = body.get("max_tokens")
    if _is_int(asked) and asked > 1:
        raise _bad(
            "max_tokens",
            f"must be 0 (score the prompt) or 1 (also its greedy next token), got {asked}: "
            "lmscore scores text, it does not generate it",
        )
    max_tokens = _check_int(body, "max_tokens", 0, 1, 0)
    logprobs = None
    if body.get("logprobs") is not None:
        logprobs = _check_int(body, "logprobs", 0, max_top_k, 0)
    _refuse_generation_options(body, max_tokens)
    return CompletionCall(
        model,
        tuple(prompts),
        echo,
        logprobs,
        max_tokens,
        _score_request(model, prompts, echo, logprobs, max_tokens),
    )


def _score_request(
    model: str,
    prompts: Sequence[str | tuple[int, ...]],
    echo: bool,
    logprobs: int | None,
    max_tokens: int,
) -> pb.ScoreRequest:
    """One item per prompt. The prompt's token details carry the echo; with max_tokens 1 a
    placeholder completion token's details carry the distribution after the prompt."""
    details = (echo and logprobs is not None) or max_tokens == 1
    options = pb.ScoreOptions(
        token_details=details, top_k=max(logprobs or 0, max_tokens) if details else 0
    )
    if prompts and not isinstance(prompts[0], str):
        options.add_bos = False  # token ids are scored as given
    request = pb.ScoreRequest(model=model, options=options)
    for prompt in prompts:
        item = request.items.add()
        if isinstance(prompt, str):
            item.prompt = prompt
        else:
            item.prompt_token_ids.ids.extend(prompt)
        if max_tokens:
            completion = pb.Completion(token_ids=pb.TokenIds(ids=[_NEXT_TOKEN_PLACEHOLDER]))
        elif isinstance(prompt, str):
            completion = pb.Completion(text="")
        else:
            completion = pb.Completion(token_ids=pb.TokenIds())
        item.completions.append(completion)
    return request


def param_of(field: str) -> str:
    """A Score request's field path as the completions request's parameter:
    items[2].prompt_token_ids[5] -> prompt[2][5]; other fields -> prompt."""
    match = re.match(r"items\[(\d+)\]\.prompt(?:_token_ids)?(?:\[(\d+)\])?", field)
    if match is None:
        return "model" if field == "model" else "prompt"
    item, token = match.groups()
    return f"prompt[{item}]" + (f"[{token}]" if token is not None else "")


def _top(token: pb.TokenDetail, count: int) -> dict[str, float]:
    # Two alternatives whose texts decode the same keep the likelier one, as a dict can.
    top: dict[str, float] = {}
    for alternative in token.top[:count]:
        top.setdefault(alternative.text, alternative.logprob)
    return top


def _choice(call: CompletionCall, index: int, result: pb.ScoreResult) -> tuple[dict[str, Any], int]:
    """One choice, and the prompt tokens the model read (BOS included)."""
    tokens = [t for t in result.tokens if t.segment != pb.SEGMENT_BOS]
    generated = None
    if call.max_tokens:  # the placeholder's position: the distribution after the prompt
        placeholder = tokens.pop()
        generated = placeholder.top[0]
    prompt = call.prompts[index]
    is_text = isinstance(prompt, str)
    echoed_text = prompt if is_text else "".join(t.text for t in tokens)
    texts, logprobs_, tops, offsets = [], [], [], []
    if call.echo:
        scored_prompt_len = len(result.scored_prompt)
        position = 0
        for token in tokens:
            if is_text and token.HasField("start"):
                base = scored_prompt_len if token.segment == pb.SEGMENT_COMPLETION else 0
                position = base + token.start
            offsets.append(position)
            if not is_text or not token.HasField("end"):
                position += len(token.text)
            texts.append(token.text)
            scored = token.HasField("logprob")
            logprobs_.append(token.logprob if scored else None)
            tops.append(_top(token, call.logprobs or 0) if scored else None)
    text = echoed_text if call.echo else ""
    if generated is not None:
        offsets.append(len(text))
        texts.append(generated.text)
        logprobs_.append(generated.logprob)
        tops.append(_top(placeholder, call.logprobs or 0))
        text += generated.text
    choice: dict[str, Any] = {
        "index": index,
        "text": text,
        "logprobs": None,
        "finish_reason": "length",
    }
    if call.logprobs is not None:
        choice["logprobs"] = {
            "tokens": texts,
            "token_logprobs": logprobs_,
            "top_logprobs": tops,
            "text_offset": offsets,
        }
    return choice, int(result.bos_added) + len(tokens)


def completion_response(
    call: CompletionCall,
    results: Sequence[pb.ScoreResult],
    model_name: str,
    now: Callable[[], float] = time.time,
) -> dict[str, Any]:
    """The completions response of `call` from its Score results (any order)."""
    by_item = {r.item_index: r for r in results}
    choices, prompt_tokens = [], 0
    for index in range(len(call.prompts)):
        choice, read = _choice(call, index, by_item[index])
        choices.append(choice)
        prompt_tokens += read
    completion_tokens = call.max_tokens * len(call.prompts)
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(now()),
        "model": model_name,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }
