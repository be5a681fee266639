"""The results of the lmscore.v1 contract as Python types, declared once.

The server's engine builds them (lmscore.server.execution) and the typed client
returns them (lmscore.client); scoring.proto's ScoreResult, TokenDetail, TopToken
and RollingResult carry the same fields under the same names, and both sides
convert by name (tests/test_protos.py keeps the two declarations equal). What
each field means is documented in scoring.proto. Standard library only, so the
server's engine uses it without protobuf and the client without numpy.
"""

from __future__ import annotations

import array
import dataclasses
import enum
import sys
from typing import Any, Literal

# How log Pr(x) is computed: read from the joint pass over [x, y], or from a separate pass over
# x alone (the proto's MarginalMode, MARGINAL_MODE_SAME_PASS / MARGINAL_MODE_SEPARATE_PASS).
MarginalMode = Literal["same_pass", "separate_pass"]


class Segment(enum.StrEnum):
    """Which part of the joint sequence [BOS] + prompt + completion a token is in."""

    BOS = "bos"
    PROMPT = "prompt"
    COMPLETION = "completion"


@dataclasses.dataclass(frozen=True)
class TopToken:
    id: int
    text: str
    logprob: float


@dataclasses.dataclass(frozen=True)
class Token:
    """One token of the joint sequence (the proto's TokenDetail)."""

    id: int
    text: str
    segment: Segment
    # None for the sequence's first token: nothing precedes it.
    logprob: float | None
    rank: int
    top: tuple[TopToken, ...] = ()
    # [start, end) in code points of the segment's scored text; None for BOS and token ids.
    start: int | None = None
    end: int | None = None
    # With the entropy option: the entropy (nats) of the distribution it was scored from.
    entropy: float | None = None


@dataclasses.dataclass(frozen=True)
class Distribution:
    """The whole next-token distribution after tokens 0..position of the joint sequence."""

    position: int
    # vocab_size log-probs (nats) in id order, packed little-endian float32.
    logprobs: bytes

    def values(self) -> array.array[float]:
        """The log-probs as floats (array of float32, id order)."""
        values = array.array("f", self.logprobs)
        if sys.byteorder == "big":
            values.byteswap()
        return values


@dataclasses.dataclass(frozen=True)
class Word:
    """One word of a scored text, beginning-of-word corrected (the proto's Word)."""

    # The word without the whitespace before it ("" for trailing whitespace).
    text: str
    # [start, end) of text in code points of the segment's scored text.
    start: int
    end: int
    # log Pr(word | before), beginning-of-word corrected, and its tokens' sum alone; None
    # when its first token is the unscored first token of the sequence.
    logprob: float | None
    logprob_uncorrected: float | None
    # Its tokens [token_start, token_end) in the joint sequence (ScoreResult.tokens).
    token_start: int
    token_end: int
    # With the entropy option: the entropy (nats) of the distribution before the word.
    entropy: float | None = None


@dataclasses.dataclass(frozen=True)
class ScoreResult:
    """One (item, completion): log Pr([x, y]), log Pr(x), log Pr(y | x) and how it was split."""

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
    # conditional_logprob per scored completion token, per code point and per UTF-8 byte of
    # scored_completion; None when the divisor is 0 (or, per char / byte, for token ids).
    conditional_logprob_per_token: float | None = None
    conditional_logprob_per_char: float | None = None
    conditional_logprob_per_byte: float | None = None
    # With the pmi option: log Pr(y | the model's prefix token) and conditional minus it.
    unconditional_logprob: float | None = None
    pmi: float | None = None
    # With the words option: the words of scored_completion (and of scored_prompt).
    words: tuple[Word, ...] = ()
    prompt_words: tuple[Word, ...] = ()
    # With candidate labels: log P(label | [BOS] + x + y), in the order given.
    label_logprobs: tuple[float, ...] = ()
    # With distribution_positions: the whole distributions, in the order given.
    distributions: tuple[Distribution, ...] = ()
    # Set by the transport: the request's id, and its position on a ScoreStream.
    request_id: str = ""
    request_index: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
    # Set by the transport: the request's id.
    request_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
