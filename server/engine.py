"""The scoring engine: what the servicer, the warm-up and the benchmarks call.

It joins planning (lmscore.server.planning: requests -> checked token sequences)
to execution (lmscore.server.execution: sequences -> model runs -> results) on
one model and tokenizer, and assembles whole-text results from rolling windows
(the sums of lmscore.server.rolling). Follow a number from here: plan() ->
PlanRunner.score() -> OnnxCausalLM.score() -> lmscore.server.scoring.sum_sequence.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from concurrent.futures import Executor

from lmscore.server.config import EngineSettings
from lmscore.server.execution import PlanRunner, TokenScorer
from lmscore.server.planning import Planner, RollingPlan
from lmscore.server.requests import ModelFacts
from lmscore.server.rolling import perplexity, text_logprob
from lmscore.server.tokenization import TextTokenizer
from lmscore.v1.results import RollingResult, ScoreResult, Segment


class ScoringEngine:
    """One model's engine. `model_thread`: a thread shared with other models' engines (default:
    its own); `name`: the model's label in the metrics."""

    def __init__(
        self,
        model: TokenScorer,
        tokenizer: TextTokenizer,
        facts: ModelFacts,
        settings: EngineSettings | None = None,
        *,
        model_thread: Executor | None = None,
        name: str = "",
    ) -> None:
        settings = settings or EngineSettings()
        self.model = model
        self.tokenizer = tokenizer
        self.planner = Planner(tokenizer, facts, settings)
        self.runner = PlanRunner(
            model, tokenizer, settings, facts.vocab_size, model_thread=model_thread, name=name
        )
        self.batcher = self.runner.batcher
        # Its calls are its parts' own. plan(items, options): validate and tokenize
        # (InvalidInput names the first bad field); plan_rolling(texts, options): the same
        # for whole texts, cut into windows; score(plan): results as they complete, through
        # the dynamic batcher; score_sync(plan): in the calling thread, in input order.
        self.plan = self.planner.plan
        self.plan_rolling = self.planner.plan_rolling
        self.score = self.runner.score
        self.score_sync = self.runner.score_sync

    @property
    def settings(self) -> EngineSettings:
        return self.planner.settings

    def close(self) -> None:
        self.runner.close()

    async def score_rolling(self, plan: RollingPlan) -> AsyncIterator[RollingResult]:
        """Each text's result as soon as all its windows are scored."""
        text_of = {i: t for t, own in enumerate(plan.windows_of) for i in own}
        done: dict[int, ScoreResult] = {}
        remaining = [len(own) for own in plan.windows_of]
        for text_index, count in enumerate(remaining):
            if count == 0:
                yield _rolling_result(plan, text_index, done)
        if plan.plan is None:
            return
        async for result in self.score(plan.plan):
            done[result.item_index] = result
            text_index = text_of[result.item_index]
            remaining[text_index] -= 1
            if remaining[text_index] == 0:
                yield _rolling_result(plan, text_index, done)


def _rolling_result(
    plan: RollingPlan, text_index: int, windows: dict[int, ScoreResult]
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
