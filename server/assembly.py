"""Result assembly: a planned completion and the scores of its sequences -> its ScoreResult;
a text's scored windows -> its RollingResult.

Pure: the sums are lmscore.server.scoring's (joint, marginal, conditional, normalized,
PMI, words) and lmscore.server.rolling's (whole texts); this module only reads them off
the right sequences of the plan and puts them, with the token details, into the
contract's result types (lmscore.v1.results).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from lmscore.server.planning import PlannedCompletion, RollingPlan, ScoringPlan
from lmscore.server.rolling import perplexity, text_logprob
from lmscore.server.scoring import (
    PositionScores,
    SequenceLayout,
    WordSpan,
    normalize,
    score_word,
    sum_pmi,
    sum_sequence,
)
from lmscore.v1.results import (
    Distribution,
    RollingResult,
    ScoreResult,
    Segment,
    Token,
    TopToken,
    Word,
)

# A token id's text (lmscore.server.tokenization.TextTokenizer.decode_token).
DecodeToken = Callable[[int], str]


def build_result(
    plan: ScoringPlan,
    completion: PlannedCompletion,
    scored: Mapping[int, PositionScores],
    decode: DecodeToken,
) -> ScoreResult:
    """The result of `completion` from the scores of the plan's sequences it needs (by index
    into plan.sequences: its joint, and its marginal and unconditional ones if any)."""
    layout = completion.layout
    scores = scored[completion.joint]
    separate = None
    if completion.marginal is not None:
        separate = sum_sequence(layout.prompt_only(), scored[completion.marginal]).marginal
    sums = sum_sequence(layout, scores, separate)
    text = completion.scored_completion if completion.completion_is_text else None
    normalized = normalize(layout, sums.conditional, text)
    pmi = None
    if completion.unconditional is not None:
        pmi = sum_pmi(layout, sums.conditional, scored[completion.unconditional])
    entropy = plan.options.entropy
    tokens: tuple[Token, ...] = ()
    if plan.options.token_details:
        ids = plan.sequences[completion.joint]
        tokens = token_details(ids, layout, scores, completion.offsets, decode, entropy)
    last = layout.length - 1
    labels = tuple(label_logprobs(plan, scores.gathered_at(last))) if plan.label_ids else ()
    return ScoreResult(
        item_index=completion.item_index,
        completion_index=completion.completion_index,
        joint_logprob=sums.joint,
        marginal_logprob=sums.marginal,
        conditional_logprob=sums.conditional,
        greedy=sums.greedy,
        prompt_tokens=layout.prompt_len,
        completion_tokens=layout.completion_len,
        bos_added=layout.bos,
        truncated_prompt_tokens=completion.truncated,
        first_token_scored=sums.first_token_scored,
        scored_prompt=completion.scored_prompt,
        scored_completion=completion.scored_completion,
        tokens=tokens,
        conditional_logprob_per_token=normalized.per_token,
        conditional_logprob_per_char=normalized.per_char,
        conditional_logprob_per_byte=normalized.per_byte,
        unconditional_logprob=pmi.unconditional if pmi is not None else None,
        pmi=pmi.pmi if pmi is not None else None,
        words=tuple(word_result(span, scores, entropy) for span in completion.words),
        prompt_words=tuple(word_result(span, scores, entropy) for span in completion.prompt_words),
        label_logprobs=labels,
        distributions=tuple(
            Distribution(p, distribution_bytes(scores.gathered_at(p)))
            for p in completion.distribution_positions
        ),
    )


def label_logprobs(plan: ScoringPlan, gathered: np.ndarray) -> list[float]:
    """The labels' log-probs from the gathered log-probs of the last position: the labels'
    own, or (with whole distributions) those of the labels' ids."""
    values = gathered if plan.gather_ids == plan.label_ids else gathered[list(plan.label_ids)]
    return [float(v) for v in values]


def distribution_bytes(logprobs: np.ndarray) -> bytes:
    """A whole distribution as the contract packs it: little-endian float32."""
    return logprobs.astype("<f4", copy=False).tobytes()


def token_details(
    ids: tuple[int, ...],
    layout: SequenceLayout,
    scores: PositionScores,
    offsets: tuple[tuple[int, int] | None, ...] | None,
    decode: DecodeToken,
    entropy: bool = False,
) -> tuple[Token, ...]:
    """One Token per id of the joint sequence: its score (none for the first), rank, top
    alternatives and span in its segment's text; with `entropy`, the entropy it was scored
    from."""
    if entropy and scores.entropies is None:
        raise ValueError("token entropies need a model that computes them")
    spans = offsets if offsets is not None else (None,) * len(ids)
    details = []
    for j, token_id in enumerate(ids):
        start, end = spans[j] or (None, None)
        token_entropy = None
        if j == 0:  # Token 0 opens the sequence: nothing precedes it, so it has no score.
            logprob, rank, top = None, 0, ()
        else:
            if entropy:
                token_entropy = float(scores.entropies[j - 1])  # type: ignore[index]
            top = tuple(
                TopToken(int(t), decode(int(t)), float(lp))
                for t, lp in zip(scores.top_ids[j - 1], scores.top_logprobs[j - 1], strict=True)
            )
            logprob, rank = float(scores.logprobs[j - 1]), int(scores.ranks[j - 1])
        details.append(
            Token(
                token_id,
                decode(token_id),
                layout.segment(j),
                logprob,
                rank,
                top,
                start,
                end,
                token_entropy,
            )
        )
    return tuple(details)


def word_result(span: WordSpan, scores: PositionScores, entropy: bool = False) -> Word:
    """One word of a segment, beginning-of-word corrected (lmscore.server.scoring.score_word);
    with `entropy`, the entropy of the distribution before it."""
    score = score_word(span, scores)
    before = None
    if entropy and span.token_start > 0:
        if scores.entropies is None:
            raise ValueError("word entropies need a model that computes them")
        before = float(scores.entropies[span.token_start - 1])
    return Word(
        span.text,
        span.start,
        span.end,
        score.logprob,
        score.logprob_uncorrected,
        span.token_start,
        span.token_end,
        before,
    )


def rolling_result(
    plan: RollingPlan, text_index: int, windows: Mapping[int, ScoreResult]
) -> RollingResult:
    """Text `text_index` of the plan from its scored windows (items of plan.plan)."""
    ids = plan.texts[text_index]
    parts = [windows[i] for i in plan.windows_of[text_index]]
    logprob = text_logprob([p.conditional_logprob for p in parts])
    with_tokens = plan.options.token_logprobs
    return RollingResult(
        text_index=text_index,
        logprob=logprob,
        token_count=len(ids),
        perplexity=perplexity(logprob, len(ids)),
        windows=len(parts),
        prefix_token_id=plan.prefix_token_id,
        token_ids=tuple(ids) if with_tokens else (),
        token_logprobs=tuple(
            t.logprob  # type: ignore[misc]
            for part in parts
            for t in part.tokens
            if t.segment is Segment.COMPLETION
        ),
    )
