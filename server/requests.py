"""What the scoring engine is asked: items and texts (their options are the contract's own,
lmscore.v1.options), the facts of the model that bound them, and the errors that reject a
request.

The servicer (lmscore.server.servicer) builds these from protobuf messages; the
engine plans them (lmscore.server.planning). Errors carry the path of the bad
field, e.g. items[2].completions[0], which the servicer turns into a gRPC status.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

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


class Cancelled(RuntimeError):
    """Planning stopped because the request's caller left or its deadline passed."""


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
    # The scoring head's research outputs (manifest format 7 on): each position's entropy,
    # and chosen ids of chosen positions' distributions (labels, whole distributions).
    entropy: bool = False
    gathers: bool = False


@dataclasses.dataclass(frozen=True)
class ItemInput:
    """A prompt (text, token ids, or None for empty) and its completions (None: given neither
    text nor ids, which planning rejects naming the field)."""

    prompt: TokenInput | None
    completions: Sequence[TokenInput | None]
