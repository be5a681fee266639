"""Execution: a ScoringPlan -> the model runs it needs -> one ScoreResult per (item, completion).

A plan's work is its full passes (sequences scored from an empty past) and its prefix
groups (a shared prompt run once for all its completions), both run by
lmscore.server.model_runs. `PlanExecutor.score` hands them to the dynamic batcher
(lmscore.server.batching), which packs full passes across concurrent requests;
`score_sync` runs them in the calling thread, batched only within the plan (warm-up,
benchmarks, tests). Either way `PlanProgress` follows which sequences are scored, and
a completion's result is assembled (lmscore.server.assembly) as soon as every
sequence it needs is. A plan whose consumer leaves has its queued work cancelled.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from lmscore.server.assembly import DecodeToken, build_result
from lmscore.server.batching import DynamicBatcher
from lmscore.server.gather_runs import gathered_batches, run_gathered
from lmscore.server.model_runs import ModelRunner, Steps, pack_by_length, run_to_end
from lmscore.server.planning import PlannedCompletion, PrefixGroup, ScoringPlan
from lmscore.server.requests import Overloaded
from lmscore.server.scoring import PositionScores
from lmscore.v1.results import ScoreResult

# Up to this many results without token details are built on the event loop (sums only).
INLINE_RESULTS = 64
# Scores of some of a plan's sequences, by index into ScoringPlan.sequences.
Scored = dict[int, PositionScores]


class PlanProgress:
    """Which sequences of a plan are scored, and the results of the completions that each
    new lot of scores completes."""

    def __init__(self, plan: ScoringPlan, decode: DecodeToken) -> None:
        self._plan = plan
        self._decode = decode
        self.scored: Scored = {}
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
        gathered = self._plan.gather_positions  # a lone token still has a distribution to read
        return self.add(
            {
                i: empty
                for i, ids in enumerate(self._plan.sequences)
                if len(ids) <= 1 and i not in gathered
            }
        )

    def add(self, scored: Scored) -> list[PlannedCompletion]:
        """Record `scored`; the completions it completes."""
        complete = []
        for index, scores in scored.items():
            self.scored[index] = scores
            for completion in self._waiting.pop(index, []):
                self._missing[id(completion)] -= 1
                if self._missing[id(completion)] == 0:
                    complete.append(completion)
        return complete

    def results(self, completions: list[PlannedCompletion]) -> list[ScoreResult]:
        return [build_result(self._plan, c, self.scored, self._decode) for c in completions]


def prefix_group_steps(
    runner: ModelRunner, plan: ScoringPlan, group: PrefixGroup
) -> Steps[list[PositionScores]]:
    """The model runs of one prefix group: its members' scores, in member order."""
    members = [plan.sequences[m] for m in group.members]
    return runner.run_prefix_group(group.prefix, members, plan.top_k)


def _group_scored(group: PrefixGroup, scores: list[PositionScores]) -> Scored:
    return dict(zip(group.members, scores, strict=True))


def gathered_steps(
    runner: ModelRunner, plan: ScoringPlan, indices: list[int]
) -> Steps[list[PositionScores]]:
    """The model runs of the plan's sequences `indices` that read distributions
    (lmscore.server.gather_runs): their scores, in `indices` order."""
    assert plan.gather_ids is not None
    return run_gathered(
        runner,
        [plan.sequences[i] for i in indices],
        [plan.gather_positions[i] for i in indices],
        plan.gather_ids,
        plan.top_k,
    )


def gathered_batches_of(runner: ModelRunner, plan: ScoringPlan) -> list[list[int]]:
    """The plan's sequences that read distributions, packed into runs (sequence indices)."""
    indices = list(plan.gather_positions)
    sequences = [plan.sequences[i] for i in indices]
    return [
        [indices[b] for b in batch]
        for batch in gathered_batches(sequences, runner.settings.max_batch_tokens)
    ]


def _indices_scored(indices: list[int], scores: list[PositionScores]) -> Scored:
    return dict(zip(indices, scores, strict=True))


class PlanExecutor:
    """Runs plans on one model (`runner`), through `batcher` or in the calling thread."""

    def __init__(
        self,
        runner: ModelRunner,
        batcher: DynamicBatcher,
        decode: DecodeToken,
        max_queue_length: int,
    ) -> None:
        self._runner = runner
        self._batcher = batcher
        self._decode = decode
        self._max_queue_length = max_queue_length

    def score_sync(self, plan: ScoringPlan) -> list[ScoreResult]:
        """Run a plan in the calling thread, batched only within itself; results in
        (item, completion) order. For warm-up, benchmarks and tests; the server uses score()."""
        progress = PlanProgress(plan, self._decode)
        results = progress.results(progress.start())
        for scored in self._scored_in_thread(plan):
            results.extend(progress.results(progress.add(scored)))
        return sorted(results, key=lambda r: (r.item_index, r.completion_index))

    def _scored_in_thread(self, plan: ScoringPlan) -> Iterator[Scored]:
        """The plan's full passes packed by length, then its prefix groups, each run to its
        end here."""
        sequences = [plan.sequences[i] for i in plan.full_passes]
        max_batch_tokens = self._runner.settings.max_batch_tokens
        for batch in pack_by_length([len(s) for s in sequences], max_batch_tokens):
            batch_sequences = [sequences[b] for b in batch]
            scores = run_to_end(self._runner.run_sequences(batch_sequences, plan.top_k))
            yield {plan.full_passes[b]: s for b, s in zip(batch, scores, strict=True)}
        for group in plan.prefix_groups:
            yield _group_scored(group, run_to_end(prefix_group_steps(self._runner, plan, group)))
        for indices in gathered_batches_of(self._runner, plan):
            yield _indices_scored(indices, run_to_end(gathered_steps(self._runner, plan, indices)))

    async def score(self, plan: ScoringPlan) -> AsyncIterator[ScoreResult]:
        """Run a plan through the dynamic batcher, yielding results as they complete (each
        assembled on a worker thread when there is much to build, so the event loop stays
        free for other calls).

        When the consumer stops early (client cancelled or went away), the plan's queued
        work is cancelled and never runs, and a run in progress stops at its next chunk.
        """
        queued = self._batcher.pending_count()
        limit = self._max_queue_length
        work = len(plan.full_passes) + len(plan.prefix_groups) + len(plan.gather_positions)
        if queued + work > limit:
            raise Overloaded(f"queue full: {queued} sequences waiting, limit {limit}")
        progress = PlanProgress(plan, self._decode)
        for result in await self._results(plan, progress, progress.start()):
            yield result
        waiting = self._submit(plan)
        try:
            pending: set[asyncio.Future[Any]] = set(waiting)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                completed: list[PlannedCompletion] = []
                for future in done:
                    completed.extend(progress.add(waiting[future](future.result())))
                for result in await self._results(plan, progress, completed):
                    yield result
        finally:
            for future in waiting:
                future.cancel()

    def _submit(self, plan: ScoringPlan) -> dict[asyncio.Future[Any], Callable[[Any], Scored]]:
        """Queue the plan's work on the batcher: each future, and how its value reads as
        scores of the plan's sequences."""
        owner = self._batcher.new_owner()
        waiting: dict[asyncio.Future[Any], Callable[[Any], Scored]] = {}
        for index in plan.full_passes:
            future = self._batcher.submit_sequence(plan.sequences[index], plan.top_k, owner)
            waiting[future] = functools.partial(_one_sequence, index)
        for group in plan.prefix_groups:
            steps = functools.partial(prefix_group_steps, self._runner, plan, group)
            future = self._batcher.submit_call(steps, owner, len(group.prefix))
            waiting[future] = functools.partial(_group_scored, group)
        for indices in gathered_batches_of(self._runner, plan):
            steps = functools.partial(gathered_steps, self._runner, plan, indices)
            held = sum(len(plan.sequences[i]) for i in indices)  # its chunks' cache
            future = self._batcher.submit_call(steps, owner, held)
            waiting[future] = functools.partial(_indices_scored, indices)
        return waiting

    @staticmethod
    async def _results(
        plan: ScoringPlan, progress: PlanProgress, completions: list[PlannedCompletion]
    ) -> list[ScoreResult]:
        """The results, built on a worker thread when there is much to build (token details,
        many completions); a few plain sums are quicker than the hop to a thread and back."""
        if not completions:
            return []
        if not plan.options.token_details and len(completions) <= INLINE_RESULTS:
            return progress.results(completions)
        return await asyncio.to_thread(progress.results, completions)


def _one_sequence(index: int, scores: PositionScores) -> Scored:
    return {index: scores}
