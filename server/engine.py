"""Scoring engine: validated items -> token sequences -> padded batches -> model -> results.

`plan()` checks and tokenizes a request (raising InvalidInput naming the field
and the limit); `score()` runs the plan batch by batch and yields each
completion's result as soon as every sequence it needs has been scored.
The math on the model's logits is lmscore.server.scoring's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import numpy as np

from lmscore.server.scoring import PositionScores, SequenceLayout, score_positions, sum_sequence
from lmscore.server.tokenization import TextTokenizer

TokenInput = str | Sequence[int]


class InvalidInput(ValueError):
    """A request field breaks a rule; `field` is its path, e.g. items[2].completions[0]."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.description = message


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


class LogitsModel(Protocol):
    vocab_size: int

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class EngineLimits:
    max_context: int
    max_batch_tokens: int = 2048
    max_top_k: int = 20


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
class ScoringPlan:
    options: ScoreOptions
    sequences: list[tuple[int, ...]]
    completions: list[_PlannedCompletion]
    batches: list[list[int]]

    @property
    def result_count(self) -> int:
        return len(self.completions)


class ScoringEngine:
    def __init__(
        self,
        model: LogitsModel,
        tokenizer: TextTokenizer,
        bos_token_id: int | None,
        limits: EngineLimits,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.bos_token_id = bos_token_id
        self.limits = limits
        self.vocab_size = model.vocab_size
        # One model run at a time: ORT already spreads one run over the cores.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmscore-model")

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

    def plan(self, items: Sequence[ItemInput], options: ScoreOptions) -> ScoringPlan:
        """Validate and tokenize; raises InvalidInput naming the first bad field."""
        if not items:
            raise InvalidInput("items", "must hold at least one item")
        add_bos = self._check_options(options)
        bos = [self.bos_token_id] if add_bos and self.bos_token_id is not None else []
        max_context = self.limits.max_context
        sequence_index: dict[tuple[int, ...], int] = {}

        def intern(ids: tuple[int, ...]) -> int:
            return sequence_index.setdefault(ids, len(sequence_index))

        completions: list[_PlannedCompletion] = []
        for item_index, item in enumerate(items):
            if not item.completions:
                raise InvalidInput(
                    f"items[{item_index}].completions", "must hold at least one completion"
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
                            f"prompt + {len(completion_ids)} completion) exceeds the model's "
                            f"context of {max_context} tokens; set options.truncate_prompt_left "
                            "to drop prompt tokens from the left",
                        )
                    truncated = length - max_context
                    if truncated > len(prompt_ids):
                        raise InvalidInput(
                            field,
                            f"completion of {len(completion_ids)} tokens (+{len(bos)} BOS) does "
                            f"not fit the model's context of {max_context} tokens even with "
                            "the whole prompt truncated",
                        )
                    prompt_ids = prompt_ids[truncated:]
                layout = SequenceLayout(bool(bos), len(prompt_ids), len(completion_ids))
                joint = intern(tuple(bos + prompt_ids + completion_ids))
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
        return ScoringPlan(options, sequences, completions, self._batches(sequences))

    def _batches(self, sequences: list[tuple[int, ...]]) -> list[list[int]]:
        """Group sequences of similar length so that batch * longest <= max_batch_tokens.

        Sequences of one token or none need no model run (nothing to score).
        """
        order = sorted(
            (i for i, ids in enumerate(sequences) if len(ids) > 1),
            key=lambda i: len(sequences[i]),
        )
        batches: list[list[int]] = []
        current: list[int] = []
        for index in order:
            longest = len(sequences[index])  # sorted ascending: the newest is the longest
            if current and (len(current) + 1) * longest > self.limits.max_batch_tokens:
                batches.append(current)
                current = []
            current.append(index)
        if current:
            batches.append(current)
        return batches

    # -- execution --------------------------------------------------------------------------

    def _run_batch(
        self, sequences: list[tuple[int, ...]], batch: list[int], top_k: int
    ) -> dict[int, PositionScores]:
        lengths = [len(sequences[i]) for i in batch]
        input_ids = np.zeros((len(batch), max(lengths)), dtype=np.int64)
        attention_mask = np.zeros_like(input_ids)
        for row, (index, length) in enumerate(zip(batch, lengths, strict=True)):
            input_ids[row, :length] = sequences[index]
            attention_mask[row, :length] = 1
        logits = self.model.logits(input_ids, attention_mask)
        return {
            index: score_positions(logits[row, : length - 1], input_ids[row, 1:length], top_k)
            for row, (index, length) in enumerate(zip(batch, lengths, strict=True))
        }

    def _batch_runs(self, plan: ScoringPlan) -> Iterator[Callable[[], dict[int, PositionScores]]]:
        top_k = plan.options.top_k if plan.options.token_details else 0
        for batch in plan.batches:
            yield lambda batch=batch: self._run_batch(plan.sequences, batch, top_k)

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
        """Run a plan in the calling thread; results in (item, completion) order."""
        progress = _PlanProgress(plan)
        results = [self._finish(plan, c, progress.scored) for c in progress.start()]
        for run in self._batch_runs(plan):
            results.extend(self._finish(plan, c, progress.scored) for c in progress.add(run()))
        return sorted(results, key=lambda r: (r.item_index, r.completion_index))

    async def score(self, plan: ScoringPlan) -> AsyncIterator[CompletionScore]:
        """Run a plan on the model thread, yielding results as soon as they are complete."""
        loop = asyncio.get_running_loop()
        progress = _PlanProgress(plan)
        for completion in progress.start():
            yield self._finish(plan, completion, progress.scored)
        for run in self._batch_runs(plan):
            scored = await loop.run_in_executor(self._executor, run)
            for completion in progress.add(scored):
                yield self._finish(plan, completion, progress.scored)


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
