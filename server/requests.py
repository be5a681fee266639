"""What the scoring engine is asked: items and texts, their options, the facts of the model
that bound them, and the errors that reject a request.

The servicer (lmscore.server.servicer) builds these from protobuf messages; the
engine plans them (lmscore.server.planning). Errors carry the path of the bad
field, e.g. items[2].completions[0], which the servicer turns into a gRPC status.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from lmscore.v1.results import MarginalMode

# Text, or token ids used verbatim.
TokenInput = str | Sequence[int]


class InvalidInput(ValueError):
    """A request field breaks a rule; `field` is its path, e.g. items[2].completions[0]."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.description = message


class RequestTooLarge(InvalidInput):
    """A request exceeds a size limit (items, completions, tokens): RESOURCE_EXHAUSTED."""


class Overloaded(RuntimeError):
    """The server's queue is full: RESOURCE_EXHAUSTED, try again later."""


@dataclasses.dataclass(frozen=True)
class ModelFacts:
    """What the model's export says about it (lmscore.export.manifest)."""

    max_context: int
    vocab_size: int
    bos_token_id: int | None
    eos_token_id: int | None = None
    # A sequence starts with BOS, unless a request says otherwise, exactly when this is
    # set: the model's own tokenizer adds BOS (TextTokenizer.adds_bos).
    bos_by_default: bool = True


@dataclasses.dataclass(frozen=True)
class ItemInput:
    """A prompt (text, token ids, or None for empty) and its completions (None: given neither
    text nor ids, which planning rejects naming the field)."""

    prompt: TokenInput | None
    completions: Sequence[TokenInput | None]


@dataclasses.dataclass(frozen=True)
class PlanOptions:
    """Options of a Score request (the proto's ScoreOptions)."""

    token_details: bool = False
    top_k: int = 0
    marginal_mode: MarginalMode = "same_pass"
    truncate_prompt_left: bool = False
    # None: BOS exactly when the model's tokenizer adds it (ModelFacts.bos_by_default).
    add_bos: bool | None = None
    # Also score each completion after the model's prefix token alone (BOS, else EOS):
    # unconditional log-prob and PMI.
    pmi: bool = False
    # Per-word scores of the completion, and of the prompt (text input only).
    words: bool = False
    prompt_words: bool = False


@dataclasses.dataclass(frozen=True)
class RollingPlanOptions:
    """Options of a ScoreRolling request (the proto's RollingOptions)."""

    # 0: the longest window the server allows.
    max_window_tokens: int = 0
    # 0 or 1: lm-eval's disjoint windows.
    min_context_tokens: int = 0
    token_logprobs: bool = False
    # Put BOS before each text's tokens, as lm-eval's HFLM does when the tokenizer adds it
    # (the first window then predicts that BOS from the prefix token).
    add_bos: bool = False
