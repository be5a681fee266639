"""The options of the lmscore.v1 requests as Python types, declared once.

`ScoreOptions` and `RollingOptions` carry the fields of scoring.proto's ScoreOptions and
RollingOptions under the same names (tests/test_protos.py keeps the two declarations
equal; what each field means is documented in scoring.proto). The server's engine plans
with them and the typed client sends them; both convert to and from the messages by
field name (lmscore.v1.messages). Standard library only, so the server's engine uses
them without protobuf and the client without numpy.
"""

from __future__ import annotations

import dataclasses

from lmscore.v1.results import MarginalMode


@dataclasses.dataclass(frozen=True)
class ScoreOptions:
    """How a Score request's items are scored."""

    token_details: bool = False
    # Alternatives per position in the token details (0: none).
    top_k: int = 0
    marginal_mode: MarginalMode = "same_pass"
    truncate_prompt_left: bool = False
    # None: BOS exactly when the model's tokenizer adds it (ModelInfo.bos_by_default).
    add_bos: bool | None = None
    # Also score each completion after the model's prefix token alone (BOS, else EOS):
    # ScoreResult.unconditional_logprob and pmi.
    pmi: bool = False
    # ScoreResult.words: the completion's words, beginning-of-word corrected
    # (docs/research.md); prompt_words: the prompt's too. Text input only.
    words: bool = False
    prompt_words: bool = False
    # TokenDetail.entropy and Word.entropy: the entropy (nats) of the next-token
    # distribution. With token_details, words or prompt_words.
    entropy: bool = False
    # Candidate labels, ids or one-token strings (not both): ScoreResult.label_logprobs,
    # log P(label | [BOS] + x + y), read after the joint sequence's last token.
    label_token_ids: tuple[int, ...] = ()
    label_tokens: tuple[str, ...] = ()
    # Positions of the joint sequence (negative: from the end, -1 after its last token)
    # whose whole distribution comes back: ScoreResult.distributions.
    distribution_positions: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class RollingOptions:
    """How ScoreRolling cuts texts into windows."""

    # 0: the server's longest window (ModelInfo.max_context - 1).
    max_window_tokens: int = 0
    # 0 or 1: lm-eval's disjoint windows; larger: each token keeps this much context.
    min_context_tokens: int = 0
    token_logprobs: bool = False
    # BOS before each text's tokens (what lm-eval's HFLM does when the tokenizer adds BOS).
    add_bos: bool = False
