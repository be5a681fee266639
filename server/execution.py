"""Execution: a ScoringPlan -> model runs -> one ScoreResult per (item, completion).

Full passes: right-padded sequences scored from an empty past, packed by length
into runs of at most `max_batch_tokens` padded tokens; in the server they go
through the dynamic batcher (lmscore.server.batching), which shares runs across
requests.

Prefix reuse: joint sequences that share a prompt prefix (several completions
of one prompt, e.g. multiple choice) are scored by one pass over the prompt,
whose key/value cache then serves all the completions in one batched pass: the
model repeats the batch-1 cache along the batch where it lives (`past_repeats`).
Causal attention makes this equal to separate full passes (tested to 1e-4).

Chunked prefill: a batch wider than `prefill_chunk_tokens` runs in chunks of
that many positions, each against the key/value cache of the chunks before it,
so a run's memory is bounded by the chunk, not the sequence (equal to one pass:
causal attention sees the same context either way; tested to 1e-4). The work is
a generator that yields between its model runs: the dynamic batcher runs other
requests' runs between the chunks of a long one and stops it there when every
caller has left (cancelled, or past its deadline).

A completion's result is assembled (the sums of lmscore.server.scoring) as soon
as every sequence it needs is scored, off the event loop; a plan whose consumer
leaves has its queued work cancelled.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Generator, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

import numpy as np

from lmscore.server import metrics
from lmscore.server.batching import DynamicBatcher, pack_by_length
from lmscore.server.config import EngineSettings
from lmscore.server.memory import MIN_TRIM_INTERVAL, release_after_burst, release_free_memory
from lmscore.server.planning import PlannedCompletion, PrefixGroup, ScoringPlan
from lmscore.server.prefix_cache import PrefixCache
from lmscore.server.requests import Overloaded
from lmscore.server.scoring import (
    BatchScores,
    PositionScores,
    SequenceLayout,
    WordSpan,
    normalize,
    score_word,
    sum_sequence,
    sum_unconditional,
)
from lmscore.server.tokenization import TextTokenizer
from lmscore.v1.results import ScoreResult, Token, TopToken, Word

# A model's key/value cache by past input name, in whatever form the model keeps it (host
# arrays, or values on its device); the engine only hands it back.
KeyValueCache = Mapping[str, Any]

Result = TypeVar("Result")
# Up to this many results without token details are built on the event loop (sums only).
INLINE_RESULTS = 64
# Work on the model thread: yields between its model runs, returns its result.
Steps = Generator[None, None, Result]


def new_model_thread() -> ThreadPoolExecutor:
    """The thread model runs take turns on: one run at a time, since ONNX Runtime already
    spreads one run over the cores (two at once would oversubscribe them)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmscore-model")


def run_to_end(steps: Steps[Result]) -> Result:
    """Every step of `steps` in the calling thread; its result."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]


class TokenScorer(Protocol):
    """What execution needs of a model (lmscore.server.runtime.OnnxCausalLM)."""

    def score(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        target_ids: np.ndarray,
        top_k: int = 0,
        past: KeyValueCache | None = None,
        past_repeats: int = 1,
        return_present: bool = False,
    ) -> tuple[BatchScores, KeyValueCache | None]: ...

    def shrink_arena(self) -> bool: ...


class PlanProgress:
    """Which sequences of a plan are scored, and which completions each new batch completes."""

    def __init__(self, plan: ScoringPlan) -> None:
        self._plan = plan
        self.scored: dict[int, PositionScores] = {}
        self._waiting: dict[int, list[PlannedCompletion]] = {}
        self._missing: dict[int, int] = {}
        for completion in plan.completions:
            needed = {completion.joint}
            for other in (completion.marginal, completion.unconditional):
                if other is not None:
                    needed.add(other)
            self._missing[id(completion)] = len(needed)
            for index in needed:
                self._waiting.setdefault(index, []).append(completion)

    def start(self) -> list[PlannedCompletion]:
        """Sequences of one token or none need no model run: they are scored already."""
        empty = PositionScores.empty(self._plan.top_k)
        return self.add({i: empty for i, ids in enumerate(self._plan.sequences) if len(ids) <= 1})

    def add(self, scored: dict[int, PositionScores]) -> list[PlannedCompletion]:
        complete = []
        for index, scores in scored.items():
            self.scored[index] = scores
            for completion in self._waiting.pop(index, []):
                self._missing[id(completion)] -= 1
                if self._missing[id(completion)] == 0:
                    complete.append(completion)
        return complete


class PlanRunner:
    """Runs plans on one model: one run at a time, on a thread of its own, or on
    `model_thread` shared with other models' runners (so no two models' runs overlap).
    `name`: the model's label in the metrics."""

    def __init__(
        self,
        model: TokenScorer,
        tokenizer: TextTokenizer,
        settings: EngineSettings,
        vocab_size: int = 0,
        *,
        model_thread: Executor | None = None,
        name: str = "",
    ) -> None:
        self.model = model
        self.name = name
        # Positions one run may score: its [tokens, vocab] float32 scores within
        # max_logits_bytes (0 vocab_size: no bound).
        self.max_run_tokens = (
            max(1, settings.max_logits_bytes // (4 * vocab_size)) if vocab_size else 0
        )
        self.tokenizer = tokenizer
        self.settings = settings
        # A hit shorter than a reuse worth making splits a pass for nothing.
        self.prefix_cache = PrefixCache(
            settings.prefix_cache_bytes, settings.min_prefix_reuse_tokens, name=name
        )
        # Model runs, and those that were one chunk of a wider batch.
        self.model_runs = 0
        self.chunk_runs = 0
        # A shared thread is its owner's to shut down.
        self._owns_thread = model_thread is None
        self._executor = model_thread or new_model_thread()
        self.batcher = DynamicBatcher(
            self.run_sequences,
            self._executor,
            settings.max_batch_tokens,
            settings.max_queue_delay_ms / 1000,
            settings.cross_request_batching,
            settings.prefill_chunk_tokens,
            on_idle=functools.partial(release_after_burst, model.shrink_arena),
            name=name,
        )

    def close(self) -> None:
        if self._owns_thread:
            self._executor.shutdown(wait=True)

    def _passes(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        target_ids: np.ndarray,
        top_k: int,
        past: KeyValueCache | None = None,
        past_repeats: int = 1,
        return_present: bool = False,
    ) -> Steps[tuple[BatchScores, KeyValueCache | None]]:
        """model.score over right-padded rows, in chunks of `prefill_chunk_tokens` positions
        (each against the cache of the chunks before it); yields between the chunks."""
        rows, width = input_ids.shape
        chunk = self.settings.prefill_chunk_tokens or width
        if self.max_run_tokens:  # a big vocabulary: fewer positions per run
            chunk = min(chunk, max(1, self.max_run_tokens // rows))
        # Equal chunks, none longer than `chunk`: 257 positions run as 129 + 128, not 256 + 1.
        count = -(-width // chunk)
        chunk = -(-width // count)
        past_len = attention_mask.shape[1] - width
        parts: list[BatchScores] = []
        present: KeyValueCache | None = None
        for start in range(0, width, chunk):
            if start:
                yield
                # The last chunk's buffers are free: return them before the cache grows again.
                release_free_memory(MIN_TRIM_INTERVAL)
            end = min(start + chunk, width)
            scores, present = self.model.score(
                input_ids[:, start:end],
                attention_mask[:, : past_len + end],
                target_ids[:, start:end],
                top_k,
                past,
                past_repeats,
                return_present=return_present or end < width,
            )
            past, past_repeats = present, 1
            parts.append(scores)
            self.model_runs += 1
            if width > chunk:
                self.chunk_runs += 1
                metrics.PREFILL_CHUNKS.labels(self.name).inc()
        return BatchScores.concat(parts), present

    def run_sequences(
        self, sequences: list[tuple[int, ...]], top_k: int
    ) -> Steps[list[PositionScores]]:
        """Score right-padded full sequences (empty past): one model run, or one per chunk."""
        lengths = [len(ids) for ids in sequences]
        input_ids = np.zeros((len(sequences), max(lengths)), dtype=np.int64)
        attention_mask = np.zeros_like(input_ids)
        target_ids = np.zeros_like(input_ids)
        for row, ids in enumerate(sequences):
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
            target_ids[row, : len(ids) - 1] = ids[1:]
        scores, _ = yield from self._passes(input_ids, attention_mask, target_ids, top_k)
        return [scores.row(row, length - 1) for row, length in enumerate(lengths)]

    def run_prefix_group(
        self, plan: ScoringPlan, group: PrefixGroup
    ) -> Steps[dict[int, PositionScores]]:
        """One pass over the prefix, then the continuations against its key/value cache.

        With S = [BOS] + prompt, the prefix pass runs S[:-1] and scores S[1:] (the
        marginal); each continuation runs [S[-1]] + completion[:-1] and scores the
        completion, so every token keeps exactly the context of a full pass.
        """
        top_k = plan.top_k
        past_len = len(group.prefix) - 1
        past: KeyValueCache | None = None
        prefix_scores = PositionScores.empty(top_k)
        if past_len > 0:
            past, prefix_scores = yield from self._prefix_pass(group.prefix, top_k)
        # Each continuation: the prompt's last token, then the completion.
        continuations = [plan.sequences[m][past_len:] for m in group.members]
        runs = [i for i, c in enumerate(continuations) if len(c) >= 2]
        # An empty completion's joint sequence is the prefix itself.
        results = {
            group.members[i]: prefix_scores for i in set(range(len(continuations))) - set(runs)
        }
        lengths = [len(continuations[i]) - 1 for i in runs]
        for number, batch in enumerate(pack_by_length(lengths, self.settings.max_batch_tokens)):
            if past_len > 0 or number:
                yield  # another request's turn before the next model run
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
            scores, _ = yield from self._passes(
                input_ids, attention_mask, target_ids, top_k, past, past_repeats=len(rows)
            )
            for row, i in enumerate(rows):
                own = scores.row(row, len(continuations[i]) - 1)
                results[group.members[i]] = PositionScores.concat([prefix_scores, own])
        return results

    def _prefix_pass(
        self, prefix: tuple[int, ...], top_k: int
    ) -> Steps[tuple[KeyValueCache, PositionScores]]:
        """The pass over prefix[:-1] scoring prefix[1:]: its key/value cache and scores. The
        part the prefix cache holds (lmscore.server.prefix_cache) is not run again."""
        cache = self.prefix_cache
        tokens = np.asarray(prefix, dtype=np.int64)
        positions = len(prefix) - 1
        hit = cache.lookup(tokens, top_k) if cache.enabled else None
        start = hit.length if hit is not None else 0
        if start == positions and hit is not None:
            return hit.past, hit.scores
        ids = tokens[None, start:-1]
        scores, present = yield from self._passes(
            ids,
            np.ones((1, positions), dtype=np.int64),
            tokens[None, start + 1 :],
            top_k,
            hit.past if hit is not None else None,
            return_present=True,
        )
        assert present is not None
        own = scores.row(0, positions - start)
        prefix_scores = PositionScores.concat([hit.scores, own]) if hit is not None else own
        if cache.enabled:
            cache.store(tokens, present, prefix_scores)
        return present, prefix_scores

    def result(
        self, plan: ScoringPlan, completion: PlannedCompletion, scored: dict[int, PositionScores]
    ) -> ScoreResult:
        layout = completion.layout
        scores = scored[completion.joint]
        separate = None
        if completion.marginal is not None:
            separate = sum_sequence(layout.prompt_only(), scored[completion.marginal]).marginal
        sums = sum_sequence(layout, scores, separate)
        text = completion.scored_completion if completion.completion_is_text else None
        normalized = normalize(layout, sums.conditional, text)
        unconditional = pmi = None
        if completion.unconditional is not None:
            unconditional = sum_unconditional(layout, scored[completion.unconditional])
            pmi = sums.conditional - unconditional
        tokens: tuple[Token, ...] = ()
        words = tuple(_word(span, scores) for span in completion.words)
        prompt_words = tuple(_word(span, scores) for span in completion.prompt_words)
        if plan.options.token_details:
            tokens = self._tokens(
                plan.sequences[completion.joint], layout, scores, completion.offsets
            )
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
            unconditional_logprob=unconditional,
            pmi=pmi,
            words=words,
            prompt_words=prompt_words,
        )

    def _tokens(
        self,
        ids: tuple[int, ...],
        layout: SequenceLayout,
        scores: PositionScores,
        offsets: tuple[tuple[int, int] | None, ...] | None = None,
    ) -> tuple[Token, ...]:
        decode = self.tokenizer.decode_token
        spans = offsets if offsets is not None else (None,) * len(ids)
        details = []
        for j, token_id in enumerate(ids):
            start, end = spans[j] or (None, None)
            if j == 0:  # Token 0 opens the sequence: nothing precedes it, so it has no score.
                logprob, rank, top = None, 0, ()
            else:
                top = tuple(
                    TopToken(int(t), decode(int(t)), float(lp))
                    for t, lp in zip(scores.top_ids[j - 1], scores.top_logprobs[j - 1], strict=True)
                )
                logprob, rank = float(scores.logprobs[j - 1]), int(scores.ranks[j - 1])
            details.append(
                Token(token_id, decode(token_id), layout.segment(j), logprob, rank, top, start, end)
            )
        return tuple(details)

    def score_sync(self, plan: ScoringPlan) -> list[ScoreResult]:
        """Run a plan in the calling thread, batched only within itself; results in
        (item, completion) order. For warm-up, benchmarks and tests; the server uses score()."""
        progress = PlanProgress(plan)
        results = self.results(plan, progress.start(), progress.scored)
        sequences = [plan.sequences[i] for i in plan.full_passes]
        for batch in pack_by_length([len(s) for s in sequences], self.settings.max_batch_tokens):
            scored = run_to_end(self.run_sequences([sequences[b] for b in batch], plan.top_k))
            done = progress.add(
                {plan.full_passes[b]: s for b, s in zip(batch, scored, strict=True)}
            )
            results.extend(self.results(plan, done, progress.scored))
        for group in plan.prefix_groups:
            done = progress.add(run_to_end(self.run_prefix_group(plan, group)))
            results.extend(self.results(plan, done, progress.scored))
        return sorted(results, key=lambda r: (r.item_index, r.completion_index))

    def results(
        self,
        plan: ScoringPlan,
        completions: list[PlannedCompletion],
        scored: dict[int, PositionScores],
    ) -> list[ScoreResult]:
        return [self.result(plan, completion, scored) for completion in completions]

    async def _results_off_loop(
        self,
        plan: ScoringPlan,
        completions: list[PlannedCompletion],
        scored: dict[int, PositionScores],
    ) -> list[ScoreResult]:
        """The results, built on a worker thread when there is much to build (token details,
        many completions); a few plain sums are quicker than the hop to a thread and back."""
        if not completions:
            return []
        if not plan.options.token_details and len(completions) <= INLINE_RESULTS:
            return self.results(plan, completions, scored)
        return await asyncio.to_thread(self.results, plan, completions, scored)

    async def score(self, plan: ScoringPlan) -> AsyncIterator[ScoreResult]:
        """Run a plan through the dynamic batcher, yielding results as they complete (each
        assembled on a worker thread, so the event loop stays free for other calls).

        When the consumer stops early (client cancelled or went away), the plan's
        queued work is cancelled and never runs, and a run in progress stops at its next
        chunk.
        """
        queued = self.batcher.pending_count()
        limit = self.settings.max_queue_length
        if queued + len(plan.full_passes) + len(plan.prefix_groups) > limit:
            raise Overloaded(f"queue full: {queued} sequences waiting, limit {limit}")
        progress = PlanProgress(plan)
        for result in await self._results_off_loop(plan, progress.start(), progress.scored):
            yield result
        owner = self.batcher.new_owner()
        waiting: dict[asyncio.Future[Any], int | None] = {}
        for index in plan.full_passes:
            waiting[self.batcher.submit_sequence(plan.sequences[index], plan.top_k, owner)] = index
        for group in plan.prefix_groups:
            call = functools.partial(self.run_prefix_group, plan, group)
            waiting[self.batcher.submit_call(call, owner, len(group.prefix))] = None
        try:
            pending: set[asyncio.Future[Any]] = set(waiting)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                completed: list[PlannedCompletion] = []
                for future in done:
                    index = waiting[future]
                    scored = {index: future.result()} if index is not None else future.result()
                    completed.extend(progress.add(scored))
                for result in await self._results_off_loop(plan, completed, progress.scored):
                    yield result
        finally:
            for future in waiting:
                future.cancel()


def _word(span: WordSpan, scores: PositionScores) -> Word:
    score = score_word(span, scores)
    return Word(
        span.text,
        span.start,
        span.end,
        score.logprob,
        score.logprob_uncorrected,
        span.token_start,
        span.token_end,
    )
