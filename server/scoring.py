"""The scoring math: per-token log-probabilities in, joint / marginal / conditional out.

Pure numpy, no model and no gRPC. These are the rules every number the server
returns follows (the README states the same):

* Natural log. Log-softmax over the vocabulary in float32 whatever the model's
  dtype; sums of token log-probs in float64.
* A sequence is ``[BOS] + tokens(x) + tokens(y)``: BOS when the model's own
  tokenizer adds one (as ``tokenizer(text)`` does), unless the request says.
  Token ``j >= 1`` is scored by the logits at position ``j - 1``:
  ``log p(t_j | t_<j)``.
* The token that opens the sequence has nothing before it and is never scored.
  With BOS that costs nothing (BOS is given, not predicted). Without BOS the
  first real token goes unscored: it is left out of every sum and the result
  says ``first_token_scored = False``; no number is invented for it.
* marginal = sum over the scored prompt tokens = log Pr(x);
  conditional = sum over the scored completion tokens = log Pr(y | x);
  joint = sum over every scored token = log Pr([x, y]) = marginal + conditional.
  The marginal's sequence ``[BOS] + tokens(x)`` is exactly the prefix of the
  joint's, so with causal attention it can be read from the joint pass
  (default) or computed by a separate pass over the prefix alone; then
  conditional = joint - marginal, verbatim.
* Empty completion: conditional 0.0 and joint = marginal. Empty prompt:
  marginal 0.0 and conditional = joint.
* greedy: every scored completion token is the argmax at its position, i.e.
  no vocabulary entry has a strictly higher logit (rank 1). Vacuously true for
  an empty completion.
* rank of a token: 1 + the number of vocabulary entries with a strictly higher
  logit.
* Normalized conditionals: conditional / n for n = the completion tokens the
  conditional sums (per token), the code points of the scored completion text
  (per char, lm-eval's acc_norm) and its UTF-8 bytes (per byte, lm-eval's
  acc_bytes); None when n is 0 (an empty completion, a lone unscored token, no
  text for ids): no number is invented, where lm-eval's numpy would give NaN.
* PMI: the unconditional log Pr(y | empty context) sums the same completion
  tokens scored after the model's prefix token alone (BOS, else EOS: lm-eval's
  HFLM prefix_token_id), leaving out a first token the conditional left out;
  pmi = conditional - unconditional.
* Words (Pimentel & Meister 2024): a token whose text starts with whitespace
  (GPT-2's Ġ, SentencePiece's ▁, a newline) begins a word; a word is such a
  token and the tokens after it up to the next one, whitespace-only tokens
  joining the word after them, and a segment's first token opens a word
  whatever it is. B(p) = the probability that the token after position p
  begins a word or is EOS (the scoring head's word_start_logprobs). A word of
  tokens [a, b) has logprob = sum of their log-probs + log B(b - 1)
  - log B(a - 1), the last term only when token a begins a word (a text that
  starts without whitespace, or a completion inside a word the prompt began,
  has nothing divided out).
  Over a completion's words the corrections telescope: their sum is
  conditional + log B(last) - [first token begins a word] log B(before it).

* Entropy (in nats) of the distribution at position p: H(p) = -sum_v p(v) log p(v) over
  the whole vocabulary (the scoring head's `entropy`). A token's entropy is that of the
  distribution it was scored from (position j - 1 for token j); a word's is that of the
  distribution before it (at its first token).
* Candidate labels and whole distributions: log p(v | tokens 0..p) of chosen ids v at
  chosen positions p (the head's gathered_logprobs); labels are read at the last
  position, after the whole joint sequence.

How tokens(x) and tokens(y) are formed from text is in lmscore.server.tokenization.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from lmscore.v1.results import Segment


@dataclasses.dataclass(frozen=True)
class BatchScores:
    """What one model run returns: scores of target_ids[b, t] under the logits at [b, t]."""

    logprobs: np.ndarray  # float32 [batch, seq]
    ranks: np.ndarray  # int64 [batch, seq]
    top_logprobs: np.ndarray  # float32 [batch, seq, top_k]
    top_ids: np.ndarray  # int64 [batch, seq, top_k]
    # float32 [batch, seq]: log B at each position (the next token begins a word or is
    # EOS); None from a model without it.
    word_start_logprobs: np.ndarray | None = None
    # float32 [batch, seq]: the entropy (nats) of each position's distribution; None from a
    # model without it.
    entropies: np.ndarray | None = None
    # float32 [batch, P, K]: log-probs of the run's gather_ids at its gather_positions.
    gathered_logprobs: np.ndarray | None = None

    @classmethod
    def concat(cls, parts: list[BatchScores]) -> BatchScores:
        """Runs over consecutive chunks of the same rows, joined along the sequence (what
        each gathered is the caller's: the chunks' own positions)."""
        if len(parts) == 1:
            return parts[0]
        return cls(
            np.concatenate([p.logprobs for p in parts], axis=1),
            np.concatenate([p.ranks for p in parts], axis=1),
            np.concatenate([p.top_logprobs for p in parts], axis=1),
            np.concatenate([p.top_ids for p in parts], axis=1),
            _joined([p.word_start_logprobs for p in parts], axis=1),
            _joined([p.entropies for p in parts], axis=1),
        )

    def row(self, row: int, length: int) -> PositionScores:
        """The first `length` positions of one row; word starts at `length + 1` positions
        when the run had them (the position after the row's last scored token)."""
        starts = self.word_start_logprobs
        return PositionScores(
            self.logprobs[row, :length],
            self.ranks[row, :length],
            self.top_ids[row, :length],
            self.top_logprobs[row, :length],
            None if starts is None or starts.shape[1] <= length else starts[row, : length + 1],
            None if self.entropies is None else self.entropies[row, :length],
        )


def _joined(parts: list[np.ndarray | None], axis: int = 0) -> np.ndarray | None:
    """The parts joined, or None when any part lacks them."""
    if any(p is None for p in parts):
        return None
    return np.concatenate(parts, axis=axis)  # type: ignore[arg-type]


@dataclasses.dataclass(frozen=True)
class SequenceLayout:
    """How a token sequence splits: ``[BOS]? + prompt_len + completion_len`` tokens."""

    bos: bool
    prompt_len: int
    completion_len: int

    @property
    def length(self) -> int:
        return int(self.bos) + self.prompt_len + self.completion_len

    @property
    def completion_start(self) -> int:
        return int(self.bos) + self.prompt_len

    @property
    def scored_completion_tokens(self) -> int:
        """Completion tokens the conditional sums: all, but the first when it opens the
        sequence (no BOS, no prompt) and so goes unscored."""
        return self.completion_len - int(self.completion_start == 0 and self.completion_len > 0)

    def prompt_only(self) -> SequenceLayout:
        return SequenceLayout(self.bos, self.prompt_len, 0)

    def segment(self, position: int) -> Segment:
        """The segment of the token at `position` of the sequence."""
        if self.bos and position == 0:
            return Segment.BOS
        return Segment.PROMPT if position < self.completion_start else Segment.COMPLETION


@dataclasses.dataclass(frozen=True)
class PositionScores:
    """Scores of tokens 1..n-1 of an n-token sequence; entry ``j - 1`` is token ``j``."""

    logprobs: np.ndarray  # float32 [n-1]
    ranks: np.ndarray  # int64 [n-1]
    top_ids: np.ndarray  # int64 [n-1, k]
    top_logprobs: np.ndarray  # float32 [n-1, k]
    # float32 [n]: entry p is log B(p), the next token after tokens 0..p begins a word or
    # is EOS; None where a run did not reach the position after the last token.
    word_start_logprobs: np.ndarray | None = None
    # float32 [n-1]: entry j - 1 is the entropy (nats) of the distribution token j was
    # scored from; None from a model without it.
    entropies: np.ndarray | None = None
    # float32 [P, K]: log-probs of the plan's gather ids at gathered_positions (the
    # distribution after tokens 0..p), by lmscore.server.gather_runs.
    gathered_positions: tuple[int, ...] = ()
    gathered_logprobs: np.ndarray | None = None

    def gathered_at(self, position: int) -> np.ndarray:
        """The gathered log-probs of the distribution after tokens 0..position."""
        if self.gathered_logprobs is None or position not in self.gathered_positions:
            raise ValueError(f"position {position} was not gathered")
        return self.gathered_logprobs[self.gathered_positions.index(position)]

    @classmethod
    def empty(cls, top_k: int = 0) -> PositionScores:
        return cls(
            logprobs=np.zeros(0, np.float32),
            ranks=np.zeros(0, np.int64),
            top_ids=np.zeros((0, top_k), np.int64),
            top_logprobs=np.zeros((0, top_k), np.float32),
            entropies=np.zeros(0, np.float32),
        )

    def __len__(self) -> int:
        return int(self.logprobs.shape[0])

    def with_top_k(self, top_k: int) -> PositionScores:
        """The same scores keeping only the `top_k` best alternatives."""
        if self.top_ids.shape[1] == top_k:
            return self
        return dataclasses.replace(
            self, top_ids=self.top_ids[:, :top_k], top_logprobs=self.top_logprobs[:, :top_k]
        )

    @classmethod
    def concat(cls, parts: list[PositionScores]) -> PositionScores:
        """A prefix's scores then its continuation's (prefix reuse, which scores no word
        starts: those plans run full passes)."""
        return cls(
            np.concatenate([p.logprobs for p in parts]),
            np.concatenate([p.ranks for p in parts]),
            np.concatenate([p.top_ids for p in parts]),
            np.concatenate([p.top_logprobs for p in parts]),
            entropies=_joined([p.entropies for p in parts]),
        )


def score_positions(
    logits: np.ndarray,
    targets: np.ndarray,
    top_k: int = 0,
    word_start_mask: np.ndarray | None = None,
) -> PositionScores:
    """Log-prob, rank and top-k of ``targets[t]`` under ``logits[t]`` (shape [t, vocab]),
    and the entropy of each position; with `word_start_mask` (bool [vocab]), log B at every
    given position.

    The caller passes the logits of positions 0..n-2 and the tokens 1..n-1 (and, for word
    starts, the logits of every position, their last target any id).
    """
    if logits.ndim != 2 or targets.shape != (logits.shape[0],):
        raise ValueError(f"logits {logits.shape} and targets {targets.shape} do not match")
    if logits.shape[0] == 0:
        return PositionScores.empty(top_k)
    logits = logits.astype(np.float32, copy=False)
    rows = np.arange(logits.shape[0])
    row_max = logits.max(axis=-1, keepdims=True)
    shifted = logits - row_max
    exps = np.exp(shifted)
    exp_sums = exps.sum(axis=-1, keepdims=True)
    log_normalizer = row_max + np.log(exp_sums)
    entropies = entropy_of(shifted, exps, exp_sums)
    target_logits = logits[rows, targets]
    logprobs = (target_logits - log_normalizer[:, 0]).astype(np.float32)
    ranks = 1 + (logits > target_logits[:, None]).sum(axis=-1, dtype=np.int64)
    if top_k > 0:
        k = min(top_k, logits.shape[1])
        candidates = np.argpartition(-logits, k - 1, axis=-1)[:, :k]
        order = np.argsort(-logits[rows[:, None], candidates], axis=-1, kind="stable")
        top_ids = np.take_along_axis(candidates, order, axis=-1).astype(np.int64)
        top_logprobs = (logits[rows[:, None], top_ids] - log_normalizer).astype(np.float32)
    else:
        top_ids = np.zeros((logits.shape[0], 0), np.int64)
        top_logprobs = np.zeros((logits.shape[0], 0), np.float32)
    word_starts = None
    if word_start_mask is not None:
        masked = exps[:, word_start_mask].sum(axis=-1, dtype=np.float64)
        with np.errstate(divide="ignore"):
            word_starts = (np.log(masked) + row_max[:, 0] - log_normalizer[:, 0]).astype(np.float32)
    return PositionScores(logprobs, ranks, top_ids, top_logprobs, word_starts, entropies)


def entropy_of(shifted: np.ndarray, exps: np.ndarray, exp_sums: np.ndarray) -> np.ndarray:
    """H = log S - sum(e * s) / S per row, from s = logits - max, e = exp(s) and S = sum e
    (as the head computes it: both terms >= 0, nothing cancels); float32 [rows]."""
    weighted = (exps * shifted).sum(axis=-1, keepdims=True)
    return (np.log(exp_sums) - weighted / exp_sums)[:, 0].astype(np.float32)


def gather_logprobs(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """log_softmax(logits[p])[ids] for every row p of `logits` [P, vocab]: the head's
    gathered_logprobs of one sequence; float32 [P, K]."""
    logits = logits.astype(np.float32, copy=False)
    row_max = logits.max(axis=-1, keepdims=True)
    log_normalizer = row_max + np.log(np.exp(logits - row_max).sum(axis=-1, keepdims=True))
    return (logits[:, ids] - log_normalizer).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class SequenceSums:
    joint: float
    marginal: float
    conditional: float
    greedy: bool
    first_token_scored: bool


def _fsum(values: np.ndarray) -> float:
    return math.fsum(values.astype(np.float64).tolist())


def sum_sequence(
    layout: SequenceLayout, scores: PositionScores, separate_marginal: float | None = None
) -> SequenceSums:
    """Joint, marginal and conditional log-probs of one scored sequence.

    ``separate_marginal``: log Pr(x) from a pass over the prefix alone; when
    given, it is the marginal and conditional = joint - marginal.
    """
    if len(scores) != max(layout.length - 1, 0):
        raise ValueError(f"{len(scores)} scored positions for a {layout.length}-token sequence")
    # Token j is entry j - 1; token 0 is never scored.
    completion_from = max(layout.completion_start, 1) - 1
    prompt_scores = scores.logprobs[:completion_from]
    completion_scores = scores.logprobs[completion_from:]
    joint = _fsum(scores.logprobs)
    greedy = bool(np.all(scores.ranks[completion_from:] == 1))
    first_token_scored = layout.bos or layout.length == 0
    if separate_marginal is None:
        marginal = _fsum(prompt_scores)
        conditional = _fsum(completion_scores)
    else:
        marginal = separate_marginal
        conditional = joint - marginal
    return SequenceSums(joint, marginal, conditional, greedy, first_token_scored)


@dataclasses.dataclass(frozen=True)
class Normalized:
    per_token: float | None
    per_char: float | None
    per_byte: float | None


def _per(total: float, count: int) -> float | None:
    return total / count if count else None


def normalize(layout: SequenceLayout, conditional: float, text: str | None) -> Normalized:
    """The conditional per scored completion token, per code point and per UTF-8 byte of
    `text` (the scored completion; None when it was given as token ids)."""
    return Normalized(
        _per(conditional, layout.scored_completion_tokens),
        None if text is None else _per(conditional, len(text)),
        None if text is None else _per(conditional, len(text.encode("utf-8", "surrogatepass"))),
    )


def sum_unconditional(layout: SequenceLayout, scores: PositionScores) -> float:
    """log Pr(y | empty context) from the scores of ``[prefix token] + tokens(y)``: the
    completion tokens the conditional of `layout` sums, no more."""
    if len(scores) != layout.completion_len:
        raise ValueError(f"{len(scores)} scored positions for {layout.completion_len} tokens")
    skip = layout.completion_len - layout.scored_completion_tokens
    return _fsum(scores.logprobs[skip:])


@dataclasses.dataclass(frozen=True)
class PmiSums:
    unconditional: float
    pmi: float


def sum_pmi(
    layout: SequenceLayout, conditional: float, unconditional_scores: PositionScores
) -> PmiSums:
    """The unconditional log-prob (sum_unconditional) of the completion of `layout`, and
    pmi = conditional - unconditional."""
    unconditional = sum_unconditional(layout, unconditional_scores)
    return PmiSums(unconditional, conditional - unconditional)


@dataclasses.dataclass(frozen=True)
class WordSpan:
    """Where a word is: its tokens [token_start, token_end) in the joint sequence, its
    characters [start, end) in its segment's text, and whether its first token begins a
    word (then its start's B is divided out)."""

    text: str
    start: int
    end: int
    token_start: int
    token_end: int
    opens_with_word_start: bool


def split_words(
    word_start: list[bool],
    blank: list[bool],
    offsets: list[tuple[int, int]],
    text: str,
    first_index: int,
) -> list[WordSpan]:
    """The words of one segment's tokens (the rule in the module docstring).

    Per token of the segment: whether it begins a word, whether it is whitespace only, and
    its [start, end) in `text`; `first_index` is the segment's first token in the joint
    sequence."""
    groups: list[list[int]] = []
    for i in range(len(word_start)):
        # A word-start token opens a new word unless the word so far is only whitespace.
        if not groups or (word_start[i] and not all(blank[j] for j in groups[-1])):
            groups.append([i])
        else:
            groups[-1].append(i)
    words = []
    for group in groups:
        start, end = offsets[group[0]][0], max(offsets[j][1] for j in group)
        # The word's characters without whitespace around them (an empty word where a
        # whitespace-only run ends, as trailing whitespace is).
        while start < end and text[start].isspace():
            start += 1
        while end > start and text[end - 1].isspace():
            end -= 1
        if start == end:
            start = end = max(offsets[j][1] for j in group)
        words.append(
            WordSpan(
                text[start:end],
                start,
                end,
                first_index + group[0],
                first_index + group[-1] + 1,
                word_start[group[0]],
            )
        )
    return words


@dataclasses.dataclass(frozen=True)
class WordScore:
    logprob: float | None
    logprob_uncorrected: float | None


def score_word(span: WordSpan, scores: PositionScores) -> WordScore:
    """The beginning-of-word corrected log-prob of one word of a scored sequence."""
    if span.token_start == 0:  # its first token opens the sequence: never scored
        return WordScore(None, None)
    starts = scores.word_start_logprobs
    if starts is None or len(starts) != len(scores) + 1:
        raise ValueError("word scores need the word-start log-probs of every position")
    uncorrected = _fsum(scores.logprobs[span.token_start - 1 : span.token_end - 1])
    corrected = uncorrected + float(starts[span.token_end - 1])
    if span.opens_with_word_start:
        corrected -= float(starts[span.token_start - 1])
    return WordScore(corrected, uncorrected)
