"""Requests and model facts of the client, as plain typed dataclasses. The options and the
results are the contract's own (lmscore.v1.options, lmscore.v1.results)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from lmscore.v1 import options

TokenInput = str | Sequence[int]


@dataclasses.dataclass(frozen=True)
class Item:
    """A prompt (text, token ids, or None for the empty prompt) and its completions."""

    prompt: TokenInput | None
    completions: Sequence[TokenInput]


@dataclasses.dataclass(frozen=True)
class ScoreOptions(options.ScoreOptions):
    """The contract's ScoreOptions (lmscore.v1.options), and the served model to score with
    (a ModelInfo.name of list_models(); empty: the server's first model), which the
    request message carries beside them."""

    model: str = ""


@dataclasses.dataclass(frozen=True)
class ScoreRequest:
    """One request on a ScoreStream."""

    items: Sequence[Item]
    options: ScoreOptions = ScoreOptions()
    request_id: str = ""


@dataclasses.dataclass(frozen=True)
class RollingOptions(options.RollingOptions):
    """The contract's RollingOptions, and the served model (as ScoreOptions.model)."""

    model: str = ""


@dataclasses.dataclass(frozen=True)
class QuantizationInfo:
    recipe: str
    # Tokens per second, quantized / float32, measured side by side at export.
    speedup: float
    # |log p_quantized - log p_float32| per token on held-out text, in nats.
    mean_abs_deviation: float
    max_abs_deviation: float
    held_out_tokens: int
    # Mean KL(float32 || quantized) per held-out token (nats); share of positions whose most
    # likely token agrees. 0 for variants exported before these were measured.
    kl_divergence: float = 0.0
    top1_agreement: float = 0.0


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    # The name requests select the model by (ScoreOptions.model); the export's own name is
    # manifest["name"].
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
    # Score sequences start with BOS by default (ScoreOptions.add_bos None) exactly when
    # this is set: the model's own tokenizer adds BOS.
    bos_by_default: bool = False
