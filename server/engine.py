"""Scoring engine: validated items -> token sequences -> batched model runs -> results.

`plan()` checks and tokenizes a request (raising InvalidInput naming the field
and the limit). `score()` runs the plan through the dynamic batcher
(lmscore.server.batching) and yields each completion's result as soon as every
sequence it needs has been scored.

Prefix reuse: joint sequences that share a prompt prefix (several completions
of one prompt, e.g. multiple choice) are scored by one pass over the prompt,
whose key/value cache then serves all the completions in one batched pass.
Causal attention makes this equal to separate full passes (tested to 1e-4).
The sums are lmscore.server.scoring's.

Rolling log-likelihood (whole texts of any length) is planned as one item per
window of lmscore.server.rolling, token ids verbatim and no BOS, so windows go
through the same validation, batching and sums as any item.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import functools
import math
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np

from lmscore.server import defaults
from lmscore.server.batching import DynamicBatcher, pack_by_length
from lmscore.server.rolling import rolling_windows
from lmscore.server.runtime import BatchScores, PastKeyValues
from lmscore.server.scoring import PositionScores, SequenceLayout, sum_sequence
from lmscore.server.tokenization import TextTokenizer

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


class Segment(enum.Enum):
    BOS = "bos"
    PROMPT = "prompt"
    COMPLETION = "completion"


@dataclasses.dataclass(frozen=True)
class ItemInput:
    """A prompt (text, token ids, or None for empty) and its completions."""

    prompt: TokenInput | None
    completions: Sequence[TokenInput | None]


@dataclasses.dataclass(frozen=True)
class ScoreOptions:
    token_details: bool = False
    top_k: int = 0
    separate_marginal_pass: bool = False
    truncate_prompt_left: bool = False
    add_bos: bool | None = None


@dataclasses.dataclass(frozen=True)
class TopToken:
    id: int
    text: str
    logprob: float


@dataclasses.dataclass(frozen=True)
class TokenScore:
    id: int
    text: str
    segment: Segment
    logprob: float | None
    rank: int
    top: tuple[TopToken, ...]


@dataclasses.dataclass(frozen=True)
class CompletionScore:
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
    tokens: tuple[TokenScore, ...]


@dataclasses.dataclass(frozen=True)
class RollingOptions:
    # 0: the longest window the server allows.
    max_window_tokens: int = 0
    # 0 or 1: lm-eval's disjoint windows.
    min_context_tokens: int = 0
    token_logprobs: bool = False


@dataclasses.dataclass(frozen=True)
class RollingScore:
    text_index: int
    logprob: float
    token_count: int
    # exp(-logprob / token_count); NaN without tokens.
    perplexity: float
    windows: int
    prefix_token_id: int
    token_ids: tuple[int, ...] = ()
    token_logprobs: tuple[float, ...] = ()


@dataclasses.dataclass
class RollingPlan:
    """Windows of every text as the items of one ScoringPlan; `windows_of[t]` lists text t's
    item indices in text order."""

    options: RollingOptions
    prefix_token_id: int
    texts: list[list[int]]
    windows_of: list[list[int]]
    plan: ScoringPlan | None  # None when every text is empty


class TokenScorer(Protocol):
    """What the engine needs of a model (lmscore.server.runtime.OnnxCausalLM)."""

    def score(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        target_ids: np.ndarray,
        top_k: int = 0,
        past: PastKeyValues | None = None,
        return_present: bool = False,
    ) -> tuple[BatchScores, dict[str, np.ndarray] | None]: ...


@dataclasses.dataclass(frozen=True)
class EngineLimits:
    max_context: int
    vocab_size: int
    max_batch_tokens: int = defaults.MAX_BATCH_TOKENS
    max_top_k: int = defaults.MAX_TOP_K
    max_items_per_request: int = defaults.MAX_ITEMS_PER_REQUEST
    max_completions_per_item: int = defaults.MAX_COMPLETIONS_PER_ITEM
    # Per item (joint sequence, BOS included); the model's context caps it too.
    max_tokens_per_item: int | None = None
    max_tokens_per_request: int = defaults.MAX_TOKENS_PER_REQUEST
    # Sequences waiting for the model, over all requests.
    max_queue_length: int = defaults.MAX_QUEUE_LENGTH
    # Seconds the batcher waits for other requests' sequences to share a run.
    max_queue_delay: float = defaults.MAX_QUEUE_DELAY_MS / 1000
    cross_request_batching: bool = True
    prefix_reuse: bool = True
    min_prefix_reuse_saved_tokens: int = defaults.MIN_PREFIX_REUSE_SAVED_TOKENS


@dataclasses.dataclass
class _PlannedCompletion:
    item_index: int
    completion_index: int
    layout: SequenceLayout
    joint: int  # index into ScoringPlan.sequences
    marginal: int | None  # separate-pass prefix sequence, if requested
    truncated: int
    scored_prompt: str
    scored_completion: str


@dataclasses.dataclass
class _PrefixGroup:
    """Joint sequences `members` (indices) that all start with `prefix` = [BOS] + prompt."""

    prefix: tuple[int, ...]
    members: list[int]


@dataclasses.dataclass
class ScoringPlan:
    options: ScoreOptions
    sequences: list[tuple[int, ...]]
    completions: list[_PlannedCompletion]
    # Sequences scored by full passes, and the groups scored by prefix reuse.
    full_passes: list[int]
    prefix_groups: list[_PrefixGroup]

    @property
    def top_k(self) -> int:
        return self.options.top_k if self.options.token_details else 0


class ScoringEngine:
    def __init__(
        self,
        model: TokenScorer,
        tokenizer: TextTokenizer,
        bos_token_id: int | None,
        limits: EngineLimits,
        *,
        eos_token_id: int | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.limits = limits
        self.vocab_size = limits.vocab_size
        # One model run at a time: ORT already spreads one run over the cores.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmscore-model")
        self.batcher = DynamicBatcher(
            self._run_sequences,
            self._executor,
            limits.max_batch_tokens,
            limits.max_queue_delay,
            limits.cross_request_batching,
        )

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    # -- planning ---------------------------------------------------------------------------

    def _check_ids(self, ids: Sequence[int], field: str) -> list[int]:
        for position, token_id in enumerate(ids):
            if not 0 <= token_id < self.vocab_size:
                raise InvalidInput(
                    f"{field}[{position}]",
                    f"token id {token_id} is outside the vocabulary [0, {self.vocab_size})",
                )
        return list(ids)

    def _check_options(self, options: ScoreOptions) -> bool:
        if options.top_k < 0:
            raise InvalidInput("options.top_k", f"must be >= 0, got {options.top_k}")
        if options.top_k > self.limits.max_top_k:
            raise InvalidInput(
                "options.top_k", f"must be <= {self.limits.max_top_k}, got {options.top_k}"
            )
        if options.add_bos and self.bos_token_id is None:
            raise InvalidInput("options.add_bos", "the model has no BOS token")
        return self.bos_token_id is not None and options.add_bos is not False

    def _encode(
        self, prompt: TokenInput | None, completion: TokenInput | None, field: str
    ) -> tuple[str, str, list[int], list[int]]:
        if completion is None:
            raise InvalidInput(field, "has neither text nor token_ids")
        prompt_field = field.rsplit(".completions", 1)[0]
        if isinstance(prompt, str | None) and isinstance(completion, str):
            pair = self.tokenizer.encode_pair(prompt or "", completion)
            return pair.scored_prompt, pair.scored_completion, pair.prompt_ids, pair.completion_ids
        if prompt is None:
            prompt_text, prompt_ids = "", []
        elif isinstance(prompt, str):
            prompt_text, prompt_ids = prompt, self.tokenizer.encode(prompt)
        else:
            prompt_text, prompt_ids = (
                "",
                self._check_ids(prompt, f"{prompt_field}.prompt_token_ids"),
            )
        if isinstance(completion, str):
            return prompt_text, completion, prompt_ids, self.tokenizer.encode(completion)
        return prompt_text, "", prompt_ids, self._check_ids(completion, f"{field}.token_ids")

    def plan(
        self,
        items: Sequence[ItemInput],
        options: ScoreOptions,
        *,
        limits: EngineLimits | None = None,
    ) -> ScoringPlan:
        """Validate and tokenize; raises InvalidInput naming the first bad field.
        `limits` replaces the engine's (a rolling plan checks its own request limits)."""
        limits = limits or self.limits
        if not items:
            raise InvalidInput("items", "must hold at least one item")
        if len(items) > limits.max_items_per_request:
            raise RequestTooLarge(
                "items",
                f"{len(items)} items exceed the limit of {limits.max_items_per_request}",
            )
        add_bos = self._check_options(options)
        bos = [self.bos_token_id] if add_bos and self.bos_token_id is not None else []
        max_context = self._max_sequence()
        limit_name = (
            "the model's context"
            if max_context == limits.max_context
            else "the server's per-item limit (--max-tokens-per-item)"
        )
        request_tokens = 0
        sequence_index: dict[tuple[int, ...], int] = {}

        def intern(ids: tuple[int, ...]) -> int:
            return sequence_index.setdefault(ids, len(sequence_index))

        completions: list[_PlannedCompletion] = []
        prefixes: dict[int, tuple[int, ...]] = {}  # joint sequence -> its [BOS] + prompt
        for item_index, item in enumerate(items):
            if not item.completions:
                raise InvalidInput(
                    f"items[{item_index}].completions", "must hold at least one completion"
                )
            if len(item.completions) > limits.max_completions_per_item:
                raise RequestTooLarge(
                    f"items[{item_index}].completions",
                    f"{len(item.completions)} completions exceed the limit of "
                    f"{limits.max_completions_per_item} per item",
                )
            for completion_index, completion in enumerate(item.completions):
                field = f"items[{item_index}].completions[{completion_index}]"
                scored_prompt, scored_completion, prompt_ids, completion_ids = self._encode(
                    item.prompt, completion, field
                )
                length = len(bos) + len(prompt_ids) + len(completion_ids)
                truncated = 0
                if length > max_context:
                    if not options.truncate_prompt_left:
                        raise InvalidInput(
                            field,
                            f"sequence of {length} tokens ({len(bos)} BOS + {len(prompt_ids)} "
                            f"prompt + {len(completion_ids)} completion) exceeds {limit_name} "
                            f"of {max_context} tokens; set options.truncate_prompt_left "
                            "to drop prompt tokens from the left",
                        )
                    truncated = length - max_context
                    if truncated > len(prompt_ids):
                        raise InvalidInput(
                            field,
                            f"completion of {len(completion_ids)} tokens (+{len(bos)} BOS) does "
                            f"not fit {limit_name} of {max_context} tokens even with "
                            "the whole prompt truncated",
                        )
                    prompt_ids = prompt_ids[truncated:]
                layout = SequenceLayout(bool(bos), len(prompt_ids), len(completion_ids))
                request_tokens += layout.length
                if request_tokens > limits.max_tokens_per_request:
                    raise RequestTooLarge(
                        "items",
                        f"more than {limits.max_tokens_per_request} tokens in one request "
                        f"(reached at {field})",
                    )
                joint = intern(tuple(bos + prompt_ids + completion_ids))
                prefixes.setdefault(joint, tuple(bos + prompt_ids))
                marginal = (
                    intern(tuple(bos + prompt_ids)) if options.separate_marginal_pass else None
                )
                completions.append(
                    _PlannedCompletion(
                        item_index,
                        completion_index,
                        layout,
                        joint,
                        marginal,
                        truncated,
                        scored_prompt,
                        scored_completion,
                    )
                )
        sequences = list(sequence_index)
        groups = self._prefix_groups(prefixes, options)
        grouped = {m for g in groups for m in g.members}
        full_passes = [i for i, ids in enumerate(sequences) if len(ids) > 1 and i not in grouped]
        return ScoringPlan(options, sequences, completions, full_passes, groups)

    def _max_sequence(self) -> int:
        limits = self.limits
        return min(limits.max_context, limits.max_tokens_per_item or limits.max_context)

    def plan_rolling(
        self, texts: Sequence[TokenInput | None], options: RollingOptions
    ) -> RollingPlan:
        """Validate and tokenize texts, cut them into windows; InvalidInput names the field."""
        limits = self.limits
        if not texts:
            raise InvalidInput("texts", "must hold at least one text")
        if len(texts) > limits.max_items_per_request:
            raise RequestTooLarge(
                "texts", f"{len(texts)} texts exceed the limit of {limits.max_items_per_request}"
            )
        prefix = self.bos_token_id if self.bos_token_id is not None else self.eos_token_id
        if prefix is None:
            raise InvalidInput("texts", "the model has neither BOS nor EOS to start a text with")
        longest = self._max_sequence() - 1
        window = options.max_window_tokens or longest
        if window > longest:
            raise InvalidInput(
                "options.max_window_tokens",
                f"must be <= {longest} (the server's longest sequence, {longest + 1} tokens, "
                f"holds {longest} model inputs and the last predicted token), got {window}",
            )
        min_context = max(options.min_context_tokens, 1)
        if min_context > window:
            raise InvalidInput(
                "options.min_context_tokens",
                f"must be <= the window of {window} tokens, got {min_context}",
            )
        encoded: list[list[int]] = []
        for index, text in enumerate(texts):
            if text is None:
                raise InvalidInput(f"texts[{index}]", "has neither text nor token_ids")
            if isinstance(text, str):
                encoded.append(self.tokenizer.encode(text))
            else:
                encoded.append(self._check_ids(text, f"texts[{index}].token_ids"))
        items: list[ItemInput] = []
        windows_of: list[list[int]] = []
        model_tokens = 0
        for index, ids in enumerate(encoded):
            own = []
            for w in rolling_windows(ids, prefix, window, min_context):
                own.append(len(items))
                items.append(ItemInput(list(w.context), [list(w.continuation)]))
                model_tokens += len(w.context) + len(w.continuation)
            if model_tokens > limits.max_tokens_per_request:
                raise RequestTooLarge(
                    "texts",
                    f"more than {limits.max_tokens_per_request} tokens in model windows in one "
                    f"request (reached at texts[{index}], {len(ids)} tokens); send fewer texts",
                )
            windows_of.append(own)
        plan = None
        if items:
            # The request limits are checked above, in terms of texts.
            unlimited = dataclasses.replace(
                limits, max_items_per_request=len(items), max_tokens_per_request=model_tokens
            )
            scoring = ScoreOptions(token_details=options.token_logprobs, add_bos=False)
            plan = self.plan(items, scoring, limits=unlimited)
        return RollingPlan(options, prefix, encoded, windows_of, plan)

    def _rolling_score(
        self, plan: RollingPlan, text_index: int, windows: dict[int, CompletionScore]
    ) -> RollingScore:
        ids = plan.texts[text_index]
        parts = [windows[i] for i in plan.windows_of[text_index]]
        token_logprobs: tuple[float, ...] = ()
        if plan.options.token_logprobs:
            token_logprobs = tuple(
                t.logprob  # type: ignore[misc]
                for part in parts
                for t in part.tokens
                if t.segment is Segment.COMPLETION
            )
        logprob = math.fsum(p.conditional_logprob for p in parts)
        return RollingScore(
            text_index=text_index,
            logprob=logprob,
            token_count=len(ids),
            perplexity=math.exp(-logprob / len(ids)) if ids else math.nan,
            windows=len(parts),
            prefix_token_id=plan.prefix_token_id,
            token_ids=tuple(ids) if plan.options.token_logprobs else (),
            token_logprobs=token_logprobs,
        )

    async def score_rolling(self, plan: RollingPlan) -> AsyncIterator[RollingScore]:
        """Each text's result as soon as all its windows are scored."""
        text_of = {i: t for t, own in enumerate(plan.windows_of) for i in own}
        done: dict[int, CompletionScore] = {}
        remaining = [len(own) for own in plan.windows_of]
        for text_index, count in enumerate(remaining):
            if count == 0:
                yield self._rolling_score(plan, text_index, done)
        if plan.plan is None:
            return
        async for result in self.score(plan.plan):
            done[result.item_index] = result
            text_index = text_of[result.item_index]
            remaining[text_index] -= 1
            if remaining[text_index] == 0:
                yield self._rolling_score(plan, text_index, done)

    def score_rolling_sync(self, plan: RollingPlan) -> list[RollingScore]:
        """score_rolling in the calling thread, in text order (tests, benchmarks)."""
        done = {r.item_index: r for r in self.score_sync(plan.plan)} if plan.plan else {}
        return [self._rolling_score(plan, t, done) for t in range(len(plan.texts))]

    def _prefix_groups(
        self, prefixes: dict[int, tuple[int, ...]], options: ScoreOptions
    ) -> list[_PrefixGroup]:
        """Two or more joint sequences sharing a non-empty prefix that saves at least
        min_prefix_reuse_saved_tokens, in same-pass mode (separate-pass mode stays the
        definition verbatim: full passes only)."""
        if not self.limits.prefix_reuse or options.separate_marginal_pass:
            return []
        by_prefix: dict[tuple[int, ...], list[int]] = {}
        for joint, prefix in prefixes.items():
            if prefix:
                by_prefix.setdefault(prefix, []).append(joint)
        # The prefix pass runs len(p) - 1 tokens once instead of once per member.
        least = self.limits.min_prefix_reuse_saved_tokens
        return [
            _PrefixGroup(p, m)
            for p, m in by_prefix.items()
            if len(m) > 1 and (len(m) - 1) * (len(p) - 1) >= least
        ]

    # -- execution --------------------------------------------------------------------------

    def _run_sequences(self, sequences: list[tuple[int, ...]], top_k: int) -> list[PositionScores]:
        """Score right-padded full sequences in one model run (empty past)."""
        lengths = [len(ids) for ids in sequences]
        input_ids = np.zeros((len(sequences), max(lengths)), dtype=np.int64)
        attention_mask = np.zeros_like(input_ids)
        target_ids = np.zeros_like(input_ids)
        for row, ids in enumerate(sequences):
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
            target_ids[row, : len(ids) - 1] = ids[1:]
        scores, _ = self.model.score(input_ids, attention_mask, target_ids, top_k)
        return [_row(scores, row, length - 1) for row, length in enumerate(lengths)]

    def _run_prefix_group(
        self, plan: ScoringPlan, group: _PrefixGroup
    ) -> dict[int, PositionScores]:
        """One pass over the prefix, then the continuations against its key/value cache.

        With S = [BOS] + prompt, the prefix pass runs S[:-1] and scores S[1:] (the
        marginal); each continuation runs [S[-1]] + completion[:-1] and scores the
        completion, so every token keeps exactly the context of a full pass.
        """
        top_k = plan.top_k
        past_len = len(group.prefix) - 1
        past: dict[str, np.ndarray] | None = None
        prefix_scores = PositionScores.empty(top_k)
        if past_len > 0:
            ids = np.asarray([group.prefix[:-1]], dtype=np.int64)
            targets = np.asarray([group.prefix[1:]], dtype=np.int64)
            scores, past = self.model.score(
                ids, np.ones_like(ids), targets, top_k, return_present=True
            )
            prefix_scores = _row(scores, 0, past_len)
        # Each continuation: the prompt's last token, then the completion.
        continuations = [plan.sequences[m][past_len:] for m in group.members]
        runs = [i for i, c in enumerate(continuations) if len(c) >= 2]
        # An empty completion's joint sequence is the prefix itself.
        results = {
            group.members[i]: prefix_scores for i in set(range(len(continuations))) - set(runs)
        }
        lengths = [len(continuations[i]) - 1 for i in runs]
        for batch in pack_by_length(lengths, self.limits.max_batch_tokens):
            rows = [runs[b] for b in batch]
            width = max(lengths[b] for b in batch)
            input_ids = np.zeros((len(rows), width), dtype=np.int64)
            target_ids = np.zeros_like(input_ids)
            attention_mask = np.zeros((len(rows), past_len + width), dtype=np.int64)
            attention_mask[:, :past_len] = 1
            for row, i in enumerate(rows):
                tokens = continuations[i]
                input_ids[row, : len(tokens) - 1] = tokens[:-1]
                target_ids[row, : len(tokens) - 1] = tokens[1:]
                attention_mask[row, past_len : past_len + len(tokens) - 1] = 1
            batch_past = (
                None
                if past is None
                else {name: np.repeat(value, len(rows), axis=0) for name, value in past.items()}
            )
            scores, _ = self.model.score(input_ids, attention_mask, target_ids, top_k, batch_past)
            for row, i in enumerate(rows):
                own = _row(scores, row, len(continuations[i]) - 1)
                results[group.members[i]] = PositionScores.concat([prefix_scores, own])
        return results

    def _finish(
        self, plan: ScoringPlan, completion: _PlannedCompletion, scored: dict[int, PositionScores]
    ) -> CompletionScore:
        layout = completion.layout
        scores = scored[completion.joint]
        separate = None
        if completion.marginal is not None:
            separate = sum_sequence(layout.prompt_only(), scored[completion.marginal]).marginal
        sums = sum_sequence(layout, scores, separate)
        tokens: tuple[TokenScore, ...] = ()
        if plan.options.token_details:
            tokens = self._token_details(plan.sequences[completion.joint], layout, scores)
        return CompletionScore(
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
        )

    def _token_details(
        self, ids: tuple[int, ...], layout: SequenceLayout, scores: PositionScores
    ) -> tuple[TokenScore, ...]:
        decode = self.tokenizer.decode_token
        details = []
        for j, token_id in enumerate(ids):
            if layout.bos and j == 0:
                segment = Segment.BOS
            elif j < layout.completion_start:
                segment = Segment.PROMPT
            else:
                segment = Segment.COMPLETION
            if j == 0:
                details.append(TokenScore(token_id, decode(token_id), segment, None, 0, ()))
                continue
            top = tuple(
                TopToken(int(t), decode(int(t)), float(lp))
                for t, lp in zip(scores.top_ids[j - 1], scores.top_logprobs[j - 1], strict=True)
            )
            details.append(
                TokenScore(
                    token_id,
                    decode(token_id),
                    segment,
                    float(scores.logprobs[j - 1]),
                    int(scores.ranks[j - 1]),
                    top,
                )
            )
        return tuple(details)

    def score_sync(self, plan: ScoringPlan) -> list[CompletionScore]:
        """Run a plan in the calling thread, batched only within itself; results in
        (item, completion) order. For warm-up, benchmarks and tests; the server uses score()."""
        progress = _PlanProgress(plan)
        results = [self._finish(plan, c, progress.scored) for c in progress.start()]
        sequences = [plan.sequences[i] for i in plan.full_passes]
        for batch in pack_by_length([len(s) for s in sequences], self.limits.max_batch_tokens):
            scored = self._run_sequences([sequences[b] for b in batch], plan.top_k)
            done = progress.add(
                {plan.full_passes[b]: s for b, s in zip(batch, scored, strict=True)}
            )
            results.extend(self._finish(plan, c, progress.scored) for c in done)
        for group in plan.prefix_groups:
            done = progress.add(self._run_prefix_group(plan, group))
            results.extend(self._finish(plan, c, progress.scored) for c in done)
        return sorted(results, key=lambda r: (r.item_index, r.completion_index))

    async def score(self, plan: ScoringPlan) -> AsyncIterator[CompletionScore]:
        """Run a plan through the dynamic batcher, yielding results as they complete.

        When the consumer stops early (client cancelled or went away), the plan's
        queued work is cancelled and never runs.
        """
        queued = self.batcher.pending_count()
        if queued + len(plan.full_passes) + len(plan.prefix_groups) > self.limits.max_queue_length:
            raise Overloaded(
                f"queue full: {queued} sequences waiting, limit {self.limits.max_queue_length}"
            )
        progress = _PlanProgress(plan)
        for completion in progress.start():
            yield self._finish(plan, completion, progress.scored)
        owner = self.batcher.new_owner()
        waiting: dict[asyncio.Future[Any], int | None] = {}
        for index in plan.full_passes:
            waiting[self.batcher.submit_sequence(plan.sequences[index], plan.top_k, owner)] = index
        for group in plan.prefix_groups:
            call = functools.partial(self._run_prefix_group, plan, group)
            waiting[self.batcher.submit_call(call, owner)] = None
        try:
            pending: set[asyncio.Future[Any]] = set(waiting)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for future in done:
                    index = waiting[future]
                    scored = {index: future.result()} if index is not None else future.result()
                    for completion in progress.add(scored):
                        yield self._finish(plan, completion, progress.scored)
        finally:
            for future in waiting:
                future.cancel()


def _row(scores: BatchScores, row: int, length: int) -> PositionScores:
    return PositionScores(
        scores.logprobs[row, :length],
        scores.ranks[row, :length],
        scores.top_ids[row, :length],
        scores.top_logprobs[row, :length],
    )


class _PlanProgress:
    """Which sequences of a plan are scored, and which completions each new batch completes."""

    def __init__(self, plan: ScoringPlan) -> None:
        self._plan = plan
        self.scored: dict[int, PositionScores] = {}
        self._waiting: dict[int, list[_PlannedCompletion]] = {}
        self._missing: dict[int, int] = {}
        for completion in plan.completions:
            needed = {completion.joint}
            if completion.marginal is not None:
                needed.add(completion.marginal)
            self._missing[id(completion)] = len(needed)
            for index in needed:
                self._waiting.setdefault(index, []).append(completion)

    def start(self) -> list[_PlannedCompletion]:
        """Sequences of one token or none need no model run: they are scored already."""
        top_k = self._plan.options.top_k if self._plan.options.token_details else 0
        trivial = {
            index: PositionScores.empty(top_k)
            for index, ids in enumerate(self._plan.sequences)
            if len(ids) <= 1
        }
        return self.add(trivial)

    def add(self, scored: dict[int, PositionScores]) -> list[_PlannedCompletion]:
        complete = []
        for index, scores in scored.items():
            self.scored[index] = scores
            for completion in self._waiting.pop(index, []):
                self._missing[id(completion)] -= 1
                if self._missing[id(completion)] == 0:
                    complete.append(completion)
        return complete
