"""The scoring engine: the one API the transports (the gRPC servicer), the warm-up and the
benchmarks call.

    engine.plan(items, options)         -> ScoringPlan   (InvalidInput names the bad field)
    engine.plan_rolling(texts, options) -> RollingPlan
    engine.score(plan)                  -> ScoreResult as each completes (dynamic batcher)
    engine.score_rolling(plan)          -> RollingResult as each text completes
    engine.score_sync(plan)             -> every ScoreResult, run in the calling thread
    engine.stats(), reset_prefix_cache(), release_memory(), close()

Inside, one model's parts in the order a call meets them: planning (requests -> checked
token sequences), execution (which sequences a plan needs, results as they complete),
the dynamic batcher (runs shared across requests), the model runs (padding, chunked
prefill, prefix reuse, on the model's thread) and the model. Follow a number from
here: plan() -> PlanExecutor.score() -> DynamicBatcher -> ModelRunner.run_sequences()
-> OnnxCausalLM.score() -> lmscore.server.assembly.build_result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import Executor

from lmscore.server.assembly import rolling_result
from lmscore.server.batching import IDLE_DELAY_S, DynamicBatcher
from lmscore.server.config import EngineSettings
from lmscore.server.execution import PlanExecutor
from lmscore.server.memory import MemoryPolicy
from lmscore.server.model_runs import ModelRunner, TokenScorer
from lmscore.server.planning import Planner, RollingPlan, ScoringPlan, StopCheck
from lmscore.server.requests import Cancelled, InvalidInput, ItemInput, ModelFacts, TokenInput
from lmscore.server.tokenization import TextTokenizer
from lmscore.v1.limits import DEFAULT_MAX_MESSAGE_BYTES
from lmscore.v1.options import RollingOptions, ScoreOptions
from lmscore.v1.results import RollingResult, ScoreResult

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EngineStats:
    """What one engine has run since it started."""

    # Batches of sequences the batcher started, the sequences in them, their padded and
    # real tokens, and the prefix-reuse groups run as whole calls.
    batches: int
    sequences: int
    padded_tokens: int
    real_tokens: int
    calls: int
    # Batches and calls stopped between two model runs because every caller had left.
    abandoned: int
    # Runs of the model (a batch is one, or one per prefill chunk), and the chunk runs.
    model_runs: int
    chunk_runs: int
    # Prompt passes the prefix cache served (wholly or in part), the positions it saved,
    # and the bytes it holds.
    prefix_cache_hits: int
    prefix_cache_hit_tokens: int
    prefix_cache_bytes: int


class ScoringEngine:
    """One model's engine. `memory`: the server's memory policy, shared by its models
    (default: one of this engine's own); `model_thread`: a thread shared with other
    models' engines (default: its own); `name`: the model's label in the metrics;
    `message_limit`: the largest message the transport sends (one result each)."""

    def __init__(
        self,
        model: TokenScorer,
        tokenizer: TextTokenizer,
        facts: ModelFacts,
        settings: EngineSettings | None = None,
        *,
        memory: MemoryPolicy | None = None,
        model_thread: Executor | None = None,
        name: str = "",
        message_limit: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        settings = settings or EngineSettings()
        # What the model's scoring head computes beyond the scores (lmscore.server.runtime's
        # OnnxCausalLM says; a model without the attributes has neither).
        facts = dataclasses.replace(
            facts,
            entropy=bool(getattr(model, "entropy", False)),
            gathers=bool(getattr(model, "gathers", False)),
        )
        self._tokenizer = tokenizer
        self._planner = Planner(tokenizer, facts, settings, message_limit)
        self._runner = ModelRunner(
            model,
            settings,
            facts.vocab_size,
            memory=memory,
            model_thread=model_thread,
            name=name,
        )
        self._batcher = DynamicBatcher(
            self._runner,
            settings.max_batch_tokens,
            settings.max_queue_delay_ms / 1000,
            settings.cross_request_batching,
            settings.prefill_chunk_tokens,
            name=name,
        )
        self._executor = PlanExecutor(
            self._runner, self._batcher, tokenizer.decode_token, settings.max_queue_length
        )
        self._trim_lock = threading.Lock()
        self._trim_timer: threading.Timer | None = None

    @property
    def settings(self) -> EngineSettings:
        return self._planner.settings

    @property
    def tokenizer(self) -> TextTokenizer:
        return self._tokenizer

    @property
    def facts(self) -> ModelFacts:
        """What the model's export says about it (context, vocabulary, BOS and EOS)."""
        return self._planner.facts

    @property
    def model(self) -> TokenScorer:
        """The model this engine runs, as it was given."""
        return self._runner.model

    @property
    def max_run_tokens(self) -> int:
        """Positions one model run may score (--max-logits-bytes over the vocabulary); 0: no
        bound."""
        return self._runner.max_run_tokens

    def plan(
        self,
        items: Sequence[ItemInput],
        options: ScoreOptions,
        *,
        request_id: str = "",
        stop: StopCheck = None,
    ) -> ScoringPlan:
        """Validate and tokenize a Score request; InvalidInput names the first bad field,
        RequestTooLarge a size limit (the results, `request_id` echoed in each, included),
        Cancelled when `stop` (asked between items) says so. The memory a refused or
        stopped request took goes back as after a burst."""
        with self._released_when_refused():
            return self._planner.plan(items, options, request_id=request_id, stop=stop)

    def plan_rolling(
        self,
        texts: Sequence[TokenInput | None],
        options: RollingOptions,
        *,
        request_id: str = "",
        stop: StopCheck = None,
    ) -> RollingPlan:
        """The same for whole texts, cut into windows (`stop` asked between texts)."""
        with self._released_when_refused():
            return self._planner.plan_rolling(texts, options, request_id=request_id, stop=stop)

    @contextlib.contextmanager
    def _released_when_refused(self) -> Iterator[None]:
        """A request refused or stopped while it was planned may have tokenized megabytes
        for nothing, which no model run will reuse: once the refusal is over (its traceback
        still holds the tokens now), that memory goes back as after a burst."""
        try:
            yield
        except (InvalidInput, Cancelled):
            self._trim_heap_later()
            raise

    def _trim_heap_later(self) -> None:
        """The heap trimmed on the model thread IDLE_DELAY_S from now, burst or not (a
        refused request grew the heap, maybe less than a burst does); one pending at a time.
        Only the heap: a request that never ran grew no arena, and an arena kept for recent
        requests (--memory-hold) stays for the next one."""
        with self._trim_lock:
            if self._trim_timer is not None:
                return

            def trim() -> None:
                with self._trim_lock:
                    self._trim_timer = None
                self._tokenizer.forget_recent()  # the refused texts' ids
                # The refusal's traceback (its frames hold the tokens) is a reference cycle
                # the transport may keep until the cyclic collector runs: run it now.
                gc.collect()
                with contextlib.suppress(RuntimeError):  # the engine closed meanwhile
                    self._runner.thread.submit(self._runner.memory.trim_heap)
                log.debug("heap trimmed after a refused request (arenas kept)")

            self._trim_timer = threading.Timer(IDLE_DELAY_S, trim)
            self._trim_timer.daemon = True
            self._trim_timer.start()

    def score(self, plan: ScoringPlan) -> AsyncIterator[ScoreResult]:
        """Results as they complete, through the dynamic batcher; Overloaded when its queue
        is full."""
        return self._executor.score(plan)

    def score_sync(self, plan: ScoringPlan) -> list[ScoreResult]:
        """In the calling thread, batched within the plan only; results in input order."""
        return self._executor.score_sync(plan)

    async def score_rolling(self, plan: RollingPlan) -> AsyncIterator[RollingResult]:
        """Each text's result as soon as all its windows are scored."""
        text_of = {i: t for t, own in enumerate(plan.windows_of) for i in own}
        done: dict[int, ScoreResult] = {}
        remaining = [len(own) for own in plan.windows_of]
        for text_index, count in enumerate(remaining):
            if count == 0:
                yield rolling_result(plan, text_index, done)
        if plan.plan is None:
            return
        async for result in self.score(plan.plan):
            done[result.item_index] = result
            text_index = text_of[result.item_index]
            remaining[text_index] -= 1
            if remaining[text_index] == 0:
                yield rolling_result(plan, text_index, done)

    def stats(self) -> EngineStats:
        batching = self._batcher.stats()
        cache = self._runner.prefix_cache
        return EngineStats(
            batches=batching.batches,
            sequences=batching.sequences,
            padded_tokens=batching.padded_tokens,
            real_tokens=batching.real_tokens,
            calls=batching.calls,
            abandoned=batching.abandoned,
            model_runs=self._runner.model_runs,
            chunk_runs=self._runner.chunk_runs,
            prefix_cache_hits=cache.hits,
            prefix_cache_hit_tokens=cache.hit_tokens,
            prefix_cache_bytes=cache.bytes,
        )

    @property
    def prefix_cache_budget(self) -> int:
        """The cross-request prefix cache's budget in bytes (0: off)."""
        return self._runner.prefix_cache.max_bytes

    def reset_prefix_cache(self, max_bytes: int | None = None) -> None:
        """Empty the prefix cache; with `max_bytes`, give it that budget first (0: off).
        Call between requests (benchmarks compare with and without it)."""
        cache = self._runner.prefix_cache
        if max_bytes is not None:
            cache.max_bytes = max_bytes
        cache.clear()

    def release_memory(self) -> bool:
        """Hand ONNX Runtime's arena and free heap pages back now, on the model's thread
        (what going idle after a burst does); False where nothing could be released."""
        return self._runner.thread.submit(self._runner.release_memory).result()

    def close(self) -> None:
        with self._trim_lock:
            if self._trim_timer is not None:
                self._trim_timer.cancel()
        self._runner.close()
