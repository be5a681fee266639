"""The engine (planning, validation, batching) with a fake causal model: no ONNX, no gRPC."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lmscore.server.config import EngineSettings
from lmscore.server.engine import ScoringEngine
from lmscore.server.requests import Cancelled, InvalidInput, ItemInput, ModelFacts, RequestTooLarge
from lmscore.server.scoring import BatchScores, score_positions
from lmscore.server.tokenization import TextTokenizer, move_trailing_whitespace
from lmscore.v1.options import RollingOptions, ScoreOptions
from lmscore.v1.results import Segment
from tiny_model import build_tokenizer

VOCAB = 512


class FakeCausalModel:
    """A causal stand-in for the ONNX model: logits[t] = sum over s <= t of
    E[ids[s]] * 0.5 ** (t - s). Its "key/value cache" is the past ids themselves, shaped
    [batch, 1, sequence, 1] as a real cache's [batch, heads, sequence, head_dim]."""

    def __init__(self) -> None:
        self.embeddings = np.random.default_rng(1).normal(size=(VOCAB, VOCAB)).astype(np.float32)
        self.calls: list[tuple[int, ...]] = []
        # Seconds per run, as a real model takes (the abandonment test needs runs to take time).
        self.delay = 0.0
        # Set: runs also return log B, the word-start tokens' probability, at every position.
        self.word_start_mask: np.ndarray | None = None

    def score(
        self,
        input_ids,
        attention_mask,
        target_ids,
        top_k=0,
        past=None,
        past_repeats=1,
        return_present=False,
    ):
        self.calls.append(input_ids.shape)
        time.sleep(self.delay)
        batch, new = input_ids.shape
        past_ids = (
            np.zeros((batch, 0), np.int64)
            if past is None
            else np.repeat(past["ids"][:, 0, :, 0], past_repeats, axis=0)
        )
        logprobs = np.zeros((batch, new), np.float32)
        ranks = np.zeros((batch, new), np.int64)
        top_ids = np.zeros((batch, new, top_k), np.int64)
        top_logprobs = np.zeros((batch, new, top_k), np.float32)
        word_starts = np.zeros((batch, new), np.float32)
        for b in range(batch):
            state = np.zeros(VOCAB, np.float32)
            for token in past_ids[b]:
                state = state * 0.5 + self.embeddings[token]
            logits = np.zeros((new, VOCAB), np.float32)
            for t in range(new):
                state = state * 0.5 + self.embeddings[input_ids[b, t]]
                logits[t] = state
            scores = score_positions(logits, target_ids[b], top_k, self.word_start_mask)
            logprobs[b], ranks[b] = scores.logprobs, scores.ranks
            top_ids[b], top_logprobs[b] = scores.top_ids, scores.top_logprobs
            if scores.word_start_logprobs is not None:
                word_starts[b] = scores.word_start_logprobs
        # Shaped as a real key/value tensor, [batch, heads, sequence, head_dim].
        ids = np.concatenate([past_ids, input_ids], axis=1)
        present = {"ids": ids[:, None, :, None]} if return_present else None
        masked = self.word_start_mask is not None
        return BatchScores(
            logprobs, ranks, top_logprobs, top_ids, word_starts if masked else None
        ), present

    def shrink_arena(self) -> bool:
        return False  # no ONNX Runtime arena to hand back

    def logits(self, ids: list[int]) -> np.ndarray:
        """float64 logits at every position of a whole sequence, computed afresh."""
        state = np.zeros(VOCAB, np.float64)
        rows = []
        for token in ids:
            state = state * 0.5 + self.embeddings[token]
            rows.append(state.copy())
        return np.asarray(rows)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> TextTokenizer:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    build_tokenizer().backend_tokenizer.save(str(path))
    return TextTokenizer(path)


def make_engine(tokenizer: TextTokenizer, bos: int | None = 1, **settings: Any) -> ScoringEngine:
    return ScoringEngine(
        FakeCausalModel(),
        tokenizer,
        ModelFacts(max_context=64, vocab_size=VOCAB, bos_token_id=bos),
        EngineSettings(**{"min_prefix_reuse_tokens": 1, **settings}),
    )


ITEMS = [
    ItemInput("The licensee ", ["may copy", "shall not", ""]),
    ItemInput("", ["Free software"]),
    ItemInput([5, 6, 7], [[8, 9], "text"]),
    ItemInput("Warranty", [[10]]),
]


def test_whitespace_moves_from_prompt_to_completion() -> None:
    assert move_trailing_whitespace("The cat \n", "sat") == ("The cat", " \nsat")
    assert move_trailing_whitespace("", "x") == ("", "x")


def test_completion_tokens_follow_the_prompt_and_never_lose_text(tokenizer: TextTokenizer) -> None:
    pair = tokenizer.encode_pair("The licensee ", "may")
    whole = tokenizer.encode("The licensee may")
    assert pair.prompt_ids + pair.completion_ids == whole
    assert pair.scored_completion == " may"
    # "the" + "re" merges across the boundary: the completion is then encoded on its own.
    merged = tokenizer.encode_pair("the", "re")
    assert tokenizer.encode("the") + tokenizer.encode("re") != tokenizer.encode("there")
    assert merged.completion_ids == tokenizer.encode("re")


def test_batching_does_not_change_results(tokenizer: TextTokenizer) -> None:
    one_by_one = make_engine(tokenizer, max_batch_tokens=1)
    batched = make_engine(tokenizer, max_batch_tokens=4096)
    a = one_by_one.score_sync(one_by_one.plan(ITEMS, ScoreOptions(token_details=True)))
    b = batched.score_sync(batched.plan(ITEMS, ScoreOptions(token_details=True)))
    assert len(batched.model.calls) < len(one_by_one.model.calls)  # type: ignore[attr-defined]
    assert [(r.item_index, r.completion_index) for r in a] == [
        (0, 0),
        (0, 1),
        (0, 2),
        (1, 0),
        (2, 0),
        (2, 1),
        (3, 0),
    ]
    for x, y in zip(a, b, strict=True):
        assert x.joint_logprob == pytest.approx(y.joint_logprob, abs=1e-5)
        assert x.marginal_logprob == pytest.approx(y.marginal_logprob, abs=1e-5)
        assert [t.rank for t in x.tokens] == [t.rank for t in y.tokens]


def test_separate_marginal_pass_agrees_with_same_pass(tokenizer: TextTokenizer) -> None:
    engine = make_engine(tokenizer)
    same = engine.score_sync(engine.plan(ITEMS, ScoreOptions()))
    separate = engine.score_sync(engine.plan(ITEMS, ScoreOptions(marginal_mode="separate_pass")))
    for x, y in zip(same, separate, strict=True):
        assert x.marginal_logprob == pytest.approx(y.marginal_logprob, abs=1e-4)
        assert x.conditional_logprob == pytest.approx(y.conditional_logprob, abs=1e-4)


def test_async_stream_yields_the_same_results(tokenizer: TextTokenizer) -> None:
    engine = make_engine(tokenizer, max_batch_tokens=16)
    plan = engine.plan(ITEMS, ScoreOptions())

    async def collect() -> list:
        return [r async for r in engine.score(plan)]

    streamed = sorted(asyncio.run(collect()), key=lambda r: (r.item_index, r.completion_index))
    assert streamed == engine.score_sync(plan)


def test_identical_sequences_are_scored_once(tokenizer: TextTokenizer) -> None:
    engine = make_engine(tokenizer, max_batch_tokens=4096)
    plan = engine.plan([ItemInput("same", [" text"]), ItemInput("same", [" text"])], ScoreOptions())
    assert len(plan.sequences) == 1
    first, second = engine.score_sync(plan)
    assert first.joint_logprob == second.joint_logprob


def test_token_details_mark_segments_and_leave_the_first_token_unscored(
    tokenizer: TextTokenizer,
) -> None:
    engine = make_engine(tokenizer)
    [result] = engine.score_sync(
        engine.plan([ItemInput("Free", [" software"])], ScoreOptions(token_details=True, top_k=2))
    )
    segments = [t.segment for t in result.tokens]
    assert segments[0] is Segment.BOS and result.tokens[0].logprob is None
    assert segments.count(Segment.COMPLETION) == result.completion_tokens
    assert all(len(t.top) == 2 for t in result.tokens[1:])
    assert result.conditional_logprob == pytest.approx(
        sum(t.logprob for t in result.tokens if t.segment is Segment.COMPLETION), abs=1e-5
    )


def test_model_without_bos_flags_the_unscored_first_token(tokenizer: TextTokenizer) -> None:
    engine = make_engine(tokenizer, bos=None)
    [result] = engine.score_sync(engine.plan([ItemInput("Free", [" software"])], ScoreOptions()))
    assert not result.bos_added and not result.first_token_scored
    with pytest.raises(InvalidInput, match=r"options\.add_bos"):
        engine.plan([ItemInput("x", ["y"])], ScoreOptions(add_bos=True))


def test_left_truncation_reports_dropped_prompt_tokens(tokenizer: TextTokenizer) -> None:
    engine = make_engine(tokenizer)
    prompt = list(range(3, 73))  # 70 tokens + BOS + 2 completion tokens = 73 > 64
    with pytest.raises(InvalidInput) as error:
        engine.plan([ItemInput(prompt, [[5, 6]])], ScoreOptions())
    assert error.value.field == "items[0].completions[0]"
    assert "73 tokens" in str(error.value) and "context of 64" in str(error.value)
    [result] = engine.score_sync(
        engine.plan([ItemInput(prompt, [[5, 6]])], ScoreOptions(truncate_prompt_left=True))
    )
    assert result.truncated_prompt_tokens == 9
    assert result.prompt_tokens == 61
    with pytest.raises(InvalidInput, match="even with the whole prompt truncated"):
        engine.plan([ItemInput([3], [list(range(3, 70))])], ScoreOptions(truncate_prompt_left=True))


@pytest.mark.parametrize(
    ("items", "options", "field"),
    [
        ([], ScoreOptions(), "items"),
        ([ItemInput("x", [])], ScoreOptions(), "items[0].completions"),
        ([ItemInput("x", ["y", None])], ScoreOptions(), "items[0].completions[1]"),
        ([ItemInput([1, VOCAB], ["y"])], ScoreOptions(), "items[0].prompt_token_ids[1]"),
        ([ItemInput("x", ["y", [3, -1]])], ScoreOptions(), "items[0].completions[1].token_ids[1]"),
        ([ItemInput("x", ["y"])], ScoreOptions(top_k=-1), "options.top_k"),
        ([ItemInput("x", ["y"])], ScoreOptions(top_k=21), "options.top_k"),
    ],
)
def test_bad_input_names_the_field(
    tokenizer: TextTokenizer, items: list, options: ScoreOptions, field: str
) -> None:
    with pytest.raises(InvalidInput) as error:
        make_engine(tokenizer).plan(items, options)
    assert error.value.field == field


def test_tokenizer_matches_hugging_face_on_natural_text(tokenizer: TextTokenizer) -> None:
    hf = build_tokenizer()
    text = Path("/usr/share/common-licenses/BSD").read_text()
    assert tokenizer.encode(text) == hf(text, add_special_tokens=False)["input_ids"]


MULTIPLE_CHOICE = [
    ItemInput("Question: which license? Answer:", [" GPL", " MIT license", "", " Apache 2"]),
    ItemInput("Question: which license? Answer:", [" BSD"]),  # same prompt, another item
    ItemInput("", ["Free", "Software"]),  # the prefix is BOS alone
    ItemInput("Single", [" completion"]),
]


@pytest.mark.parametrize("options", [ScoreOptions(), ScoreOptions(token_details=True, top_k=3)])
def test_prefix_reuse_equals_full_passes(tokenizer: TextTokenizer, options: ScoreOptions) -> None:
    reuse = make_engine(tokenizer)
    full = make_engine(tokenizer, prefix_reuse=False)
    plan = reuse.plan(MULTIPLE_CHOICE, options)
    # The BOS-only prefix saves nothing: its completions stay full passes.
    assert [len(g.members) for g in plan.prefix_groups] == [5]
    with_reuse = reuse.score_sync(plan)
    without = full.score_sync(full.plan(MULTIPLE_CHOICE, options))
    assert len(with_reuse) == len(without) == 8
    for a, b in zip(with_reuse, without, strict=True):
        assert a.joint_logprob == pytest.approx(b.joint_logprob, abs=1e-4)
        assert a.marginal_logprob == pytest.approx(b.marginal_logprob, abs=1e-4)
        assert a.conditional_logprob == pytest.approx(b.conditional_logprob, abs=1e-4)
        assert a.greedy == b.greedy
        assert [t.id for t in a.tokens] == [t.id for t in b.tokens]
        assert [t.rank for t in a.tokens] == [t.rank for t in b.tokens]
        assert [[x.id for x in t.top] for t in a.tokens] == [
            [x.id for x in t.top] for t in b.tokens
        ]
    # The shared prompt ran once: one prefix pass, one batch of continuations.
    tokens_run = lambda engine: sum(b * s for b, s in engine.model.calls)  # noqa: E731
    assert tokens_run(reuse) < tokens_run(full)


def test_separate_pass_mode_never_reuses_prefixes(tokenizer: TextTokenizer) -> None:
    engine = make_engine(tokenizer)
    plan = engine.plan(MULTIPLE_CHOICE, ScoreOptions(marginal_mode="separate_pass"))
    assert plan.prefix_groups == []


def test_concurrent_requests_share_model_runs(tokenizer: TextTokenizer) -> None:
    items = [[ItemInput(f"Request {i} asks", [f" question {i}"])] for i in range(6)]

    async def run(engine: ScoringEngine) -> list:
        async def one(request):
            return [r async for r in engine.score(engine.plan(request, ScoreOptions()))]

        return await asyncio.gather(*(one(request) for request in items))

    shared = make_engine(tokenizer, max_queue_delay_ms=50)
    apart = make_engine(tokenizer, max_queue_delay_ms=50, cross_request_batching=False)
    together, separately = asyncio.run(run(shared)), asyncio.run(run(apart))
    assert shared.stats().batches < apart.stats().batches == 6
    for a, b in zip(together, separately, strict=True):
        assert a[0].joint_logprob == pytest.approx(b[0].joint_logprob, abs=1e-5)


def test_abandoned_request_does_no_more_work(tokenizer: TextTokenizer) -> None:
    engine = make_engine(tokenizer, max_batch_tokens=8, max_queue_delay_ms=0)
    engine.model.delay = 0.02
    items = [ItemInput(f"Item number {i} is", [f" here {i} and there"]) for i in range(20)]
    plan = engine.plan(items, ScoreOptions())

    async def take_one_and_leave() -> None:
        stream = engine.score(plan)
        await stream.__anext__()
        await stream.aclose()
        await asyncio.sleep(0.2)

    asyncio.run(take_one_and_leave())
    assert 1 <= len(engine.model.calls) < 5  # 20 sequences were queued, one batch each


def test_prefix_reuse_only_where_it_saves_enough_tokens(tokenizer: TextTokenizer) -> None:
    """(completions - 1) x prompt tokens (BOS included, last prompt token excluded) must reach
    the threshold; below it the completions go as full passes, batched with everything else."""
    prompt = list(range(10, 30))  # [BOS] + 20 prompt tokens: 20 tokens saved per extra member
    items = [ItemInput(prompt, [[40], [41], [42]])]  # 2 extra members: 40 saved
    for least, grouped in ((40, True), (41, False)):
        engine = make_engine(tokenizer, min_prefix_reuse_tokens=least)
        plan = engine.plan(items, ScoreOptions())
        assert bool(plan.prefix_groups) is grouped
        assert len(plan.full_passes) == (0 if grouped else 3)


def test_a_short_request_runs_between_the_chunks_of_a_long_one(tokenizer: TextTokenizer) -> None:
    """A 60-token sequence in chunks of 8 (8 model runs); a short request that arrives
    during the first chunk is answered after at most one more, with the one-pass numbers."""
    engine = make_engine(tokenizer, prefill_chunk_tokens=8, max_queue_delay_ms=0)
    engine.model.delay = 0.02
    long_items = [ItemInput(list(range(10, 40)), [list(range(40, 69))])]
    short_items = [ItemInput("Short", [" one"])]
    order: list[str] = []

    async def run() -> tuple[list, list]:
        async def score(name: str, items: list[ItemInput]) -> list:
            results = [r async for r in engine.score(engine.plan(items, ScoreOptions()))]
            order.append(name)
            return results

        long_task = asyncio.create_task(score("long", long_items))
        await asyncio.sleep(0.01)  # the long one's first chunk is running
        short = await score("short", short_items)
        calls_then = len(engine.model.calls)
        return await long_task, short, calls_then

    long_results, short_results, calls_then = asyncio.run(run())
    assert order == ["short", "long"]
    assert [shape[1] for shape in engine.model.calls].count(1) == 0
    assert calls_then <= 3  # the long one's chunk 1, maybe chunk 2, then the short one
    assert engine.stats().chunk_runs == 8
    one_pass = make_engine(tokenizer, prefill_chunk_tokens=0)
    for items, results in ((long_items, long_results), (short_items, short_results)):
        expected = one_pass.score_sync(one_pass.plan(items, ScoreOptions()))
        assert [r.joint_logprob for r in results] == pytest.approx(
            [r.joint_logprob for r in expected], abs=1e-5
        )


def test_a_long_run_whose_caller_left_stops_at_the_next_chunk(tokenizer: TextTokenizer) -> None:
    engine = make_engine(tokenizer, prefill_chunk_tokens=8, max_queue_delay_ms=0)
    engine.model.delay = 0.05
    plan = engine.plan([ItemInput(list(range(10, 40)), [list(range(40, 69))])], ScoreOptions())

    async def leave_after_the_first_chunk() -> None:
        task = asyncio.create_task(anext(engine.score(plan)))
        await asyncio.sleep(0.07)  # inside the second chunk
        task.cancel()
        # Until the batcher has stopped the run (on a loaded machine a chunk takes longer
        # than its 50 ms): at most 5 s.
        for _ in range(100):
            await asyncio.sleep(0.05)
            if engine.stats().abandoned:
                break

    asyncio.run(leave_after_the_first_chunk())
    assert 1 <= len(engine.model.calls) <= 3 < 8
    assert engine.stats().abandoned == 1


def test_bos_follows_the_tokenizer_unless_the_request_says(tmp_path: Path) -> None:
    """A tokenizer whose post-processor adds BOS (Llama's, SmolLM2's) gets BOS by default;
    one that adds none (GPT-2's, Qwen's) gets none; add_bos overrides either way."""
    for adds_bos in (True, False):
        path = tmp_path / f"bos-{adds_bos}.json"
        build_tokenizer(adds_bos=adds_bos).backend_tokenizer.save(str(path))
        tokenizer = TextTokenizer(path)
        assert tokenizer.adds_bos(1) is adds_bos
        assert tokenizer.adds_bos(None) is False
        facts = ModelFacts(64, VOCAB, 1, bos_by_default=tokenizer.adds_bos(1))
        engine = ScoringEngine(FakeCausalModel(), tokenizer, facts, EngineSettings())
        for add_bos, expected in ((None, adds_bos), (True, True), (False, False)):
            plan = engine.plan([ItemInput("The licensee", [" may"])], ScoreOptions(add_bos=add_bos))
            [result] = engine.score_sync(plan)
            assert result.bos_added is expected
            assert (plan.sequences[0][0] == 1) is expected


def test_text_bytes_and_rolling_bos_are_checked_naming_the_field(tokenizer: TextTokenizer) -> None:
    engine = make_engine(tokenizer, max_text_bytes=40)
    fine = "é" * 20  # 40 UTF-8 bytes: at the limit
    engine.plan([ItemInput(fine, [" x"])], ScoreOptions())
    for items, field, words in (
        ([ItemInput("é" * 21, [" x"])], "items[0].prompt", "42 bytes"),
        ([ItemInput("a", ["x" * 41])], "items[0].completions[0].text", "41 characters"),
    ):
        with pytest.raises(InvalidInput) as error:
            engine.plan(items, ScoreOptions())
        assert error.value.field == field
        assert words in error.value.description and "40 UTF-8 bytes" in error.value.description
    no_bos = ScoringEngine(FakeCausalModel(), tokenizer, ModelFacts(64, VOCAB, None, 2))
    with pytest.raises(InvalidInput) as error:
        no_bos.plan_rolling(["some text"], RollingOptions(add_bos=True))
    assert error.value.field == "options.add_bos"


class CountingEncodes:
    """Wraps a tokenizer's encode to count the texts it was given."""

    def __init__(self, engine: ScoringEngine) -> None:
        self.texts = 0
        tokenizer = engine.tokenizer
        encode = tokenizer.encode

        def counted(text: str) -> list[int]:
            self.texts += 1
            return encode(text)

        tokenizer.encode = counted  # type: ignore[method-assign]
        self._restore = lambda: setattr(tokenizer, "encode", encode)

    def close(self) -> None:
        self._restore()


def test_a_request_over_the_token_budget_is_refused_at_the_text_that_crosses_it(
    tokenizer: TextTokenizer,
) -> None:
    """Texts are tokenized one by one against the budget: 15 texts of which the second
    crosses it cost two tokenizations, not fifteen."""
    engine = make_engine(tokenizer, max_tokens_per_request=200)
    text = "free software " * 40  # 121 tokens, more with its windows' contexts
    counting = CountingEncodes(engine)
    try:
        with pytest.raises(RequestTooLarge, match=r"reached at texts\[1\]"):
            engine.plan_rolling([text] * 15, RollingOptions(max_window_tokens=32))
        assert counting.texts == 2
    finally:
        counting.close()


def test_a_stopped_request_stops_planning_between_items_and_texts(tokenizer: TextTokenizer) -> None:
    """`stop` (a cancelled call, a passed deadline) is asked between items and texts."""
    engine = make_engine(tokenizer)
    asked: list[int] = []

    def stop_after_two() -> bool:
        asked.append(1)
        return len(asked) > 2

    counting = CountingEncodes(engine)
    try:
        with pytest.raises(Cancelled):
            engine.plan_rolling(["one text"] * 10, RollingOptions(), stop=stop_after_two)
        assert counting.texts == 2
        asked.clear()
        with pytest.raises(Cancelled):
            engine.plan([ItemInput([5], [[6]])] * 10, ScoreOptions(), stop=stop_after_two)
    finally:
        counting.close()


def test_the_model_thread_releases_again_when_the_memory_hold_ends(
    tokenizer: TextTokenizer,
) -> None:
    """The batcher runs the memory policy at the first idle point (1 s) and again at the end
    of --memory-hold, where what was kept goes back; a request in between starts over."""
    from lmscore.server.batching import IDLE_DELAY_S
    from lmscore.server.memory import MemoryPolicy

    released: list[float] = []

    class ArenaModel(FakeCausalModel):
        def shrink_arena(self) -> bool:
            released.append(time.monotonic())
            return True

    # The second request comes 1.2 s after the first idle point and 1.2 s before the hold
    # would end: a CI machine's event loop can be late by over half a second.
    hold = IDLE_DELAY_S + 2.4
    # RSS never grows here: only the first idle point (the resting size) and the hold's end
    # release.
    policy = MemoryPolicy(hold_s=hold, resident=lambda: 1 << 30)
    engine = ScoringEngine(
        ArenaModel(),
        tokenizer,
        ModelFacts(max_context=64, vocab_size=VOCAB, bos_token_id=1),
        EngineSettings(memory_hold=hold),
        memory=policy,
    )
    plan = engine.plan([ItemInput("The licensee", [" may copy"])], ScoreOptions())

    async def requests() -> list[float]:
        times = []
        for pause in (IDLE_DELAY_S + 1.2, hold + 1.0):
            times.append(time.monotonic())
            [_ async for _ in engine.score(plan)]
            times.append(time.monotonic())
            await asyncio.sleep(pause)
        return times

    _, first_end, second_start, second_end = asyncio.run(requests())
    engine.close()
    # After the first request: its first idle point only (the next request came before the
    # hold's end); after the second: not its first idle point (nothing grew), the hold's end.
    assert len(released) == 2, [t - first_end for t in released]
    assert first_end + IDLE_DELAY_S - 0.05 < released[0] < second_start
    assert released[1] > second_end + hold - 0.05


def test_a_refused_request_trims_the_heap_but_keeps_an_arena_held_for_recent_requests(
    tokenizer: TextTokenizer,
) -> None:
    """A request refused while it was planned ran no model, so its memory is heap (its
    tokens): that goes back IDLE_DELAY_S later, while the arena the memory hold keeps for
    the next request stays (the next batch would pay its faults again)."""
    from lmscore.server.batching import IDLE_DELAY_S
    from lmscore.server.memory import MemoryPolicy

    shrunk: list[float] = []
    trimmed: list[float] = []

    class ArenaModel(FakeCausalModel):
        def shrink_arena(self) -> bool:
            shrunk.append(time.monotonic())
            return True

    class CountingPolicy(MemoryPolicy):
        def trim_heap(self, min_interval: float = 0.0) -> bool:
            trimmed.append(time.monotonic())
            return super().trim_heap(min_interval)

    engine = ScoringEngine(
        ArenaModel(),
        tokenizer,
        ModelFacts(max_context=64, vocab_size=VOCAB, bos_token_id=1),
        EngineSettings(max_tokens_per_request=200),
        memory=CountingPolicy(resident=lambda: 1 << 30),
    )
    try:
        refused_at = time.monotonic()
        with pytest.raises(RequestTooLarge):
            engine.plan_rolling(["free software " * 40] * 15, RollingOptions(max_window_tokens=32))
        time.sleep(IDLE_DELAY_S + 0.5)
        assert shrunk == []
        assert len(trimmed) == 1 and trimmed[0] > refused_at + IDLE_DELAY_S - 0.05
    finally:
        engine.close()
