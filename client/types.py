"""Requests and results of the client, as plain typed dataclasses."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

TokenInput = str | Sequence[int]
MarginalMode = Literal["same_pass", "separate_pass"]


@dataclasses.dataclass(frozen=True)
class Item:
    """A prompt (text, token ids, or None for the empty prompt) and its completions."""

    prompt: TokenInput | None
    completions: Sequence[TokenInput]


@dataclasses.dataclass(frozen=True)
class ScoreOptions:
    token_details: bool = False
    top_k: int = 0
    marginal: MarginalMode = "same_pass"
    truncate_prompt_left: bool = False
    # None: the server's default (BOS when the model has one).
    add_bos: bool | None = None
    # Empty: whatever model the server serves.
    model: str = ""


@dataclasses.dataclass(frozen=True)
class ScoreRequest:
    """One request on a ScoreStream."""

    items: Sequence[Item]
    options: ScoreOptions = ScoreOptions()
    request_id: str = ""


@dataclasses.dataclass(frozen=True)
class TopToken:
    id: int
    text: str
    logprob: float


@dataclasses.dataclass(frozen=True)
class Token:
    id: int
    text: str
    segment: Literal["bos", "prompt", "completion"]
    # None for the sequence's first token: nothing precedes it.
    logprob: float | None
    rank: int
    top: tuple[TopToken, ...] = ()


@dataclasses.dataclass(frozen=True)
class ScoreResult:
    item_index: int
    completion_index: int
    joint_logprob: float
    marginal_logprob: float
    conditional_logprob: float
    greedy: bool
    prompt_tokens: int
    completion_tokens: int
    bos_added: bool
    truncated_prompt_tokens: int
    first_token_scored: bool
    scored_prompt: str
    scored_completion: str
    tokens: tuple[Token, ...] = ()
    request_id: str = ""
    request_index: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class RollingOptions:
    """How ScoreRolling cuts texts into windows (see the proto's RollingOptions)."""

    # 0: the server's longest window (ModelInfo.max_context - 1).
    max_window_tokens: int = 0
    # 0 or 1: lm-eval's disjoint windows; larger: each token keeps this much context.
    min_context_tokens: int = 0
    token_logprobs: bool = False
    model: str = ""


@dataclasses.dataclass(frozen=True)
class RollingResult:
    """Log-likelihood of one whole text: every token scored once, the first after the
    model's prefix token (BOS, else EOS)."""

    text_index: int
    logprob: float
    token_count: int
    # exp(-logprob / token_count); NaN for an empty text.
    perplexity: float
    windows: int
    prefix_token_id: int
    token_ids: tuple[int, ...] = ()
    token_logprobs: tuple[float, ...] = ()
    request_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class QuantizationInfo:
    recipe: str
    # Tokens per second, quantized / float32, measured side by side at export.
    speedup: float
    # |log p_quantized - log p_float32| per token on held-out text, in nats.
    mean_abs_deviation: float
    max_abs_deviation: float
    held_out_tokens: int


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    name: str
    architecture: str
    vocab_size: int
    bos_token_id: int | None
    eos_token_id: int | None
    max_context: int
    dtype: str
    providers: tuple[str, ...]
    onnxruntime_version: str
    export_validation_max_abs_diff: float
    source_sha256: str
    max_top_k: int
    manifest: dict[str, Any]
    # None for a float32 model.
    quantization: QuantizationInfo | None = None
