"""The engine (planning, validation, batching) with a fake causal model: no ONNX, no gRPC."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from lmscore.server.engine import (
    EngineLimits,
    InvalidInput,
    ItemInput,
    ScoreOptions,
    ScoringEngine,
    Segment,
)
from lmscore.server.tokenization import TextTokenizer, move_trailing_whitespace
from tiny_model import build_tokenizer

VOCAB = 512


class FakeCausalModel:
    """logits[t] = sum over s <= t of E[ids[s]] * 0.5 ** (t - s): causal, padding-blind."""

    vocab_size = VOCAB

    def __init__(self) -> None:
        self.embeddings = np.random.default_rng(1).normal(size=(VOCAB, VOCAB)).astype(np.float32)
        self.calls: list[tuple[int, int]] = []

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        self.calls.append(input_ids.shape)
        out = np.zeros((*input_ids.shape, VOCAB), np.float32)
        for b in range(input_ids.shape[0]):
            state = np.zeros(VOCAB, np.float32)
            for t in range(input_ids.shape[1]):
                state = state * 0.5 + self.embeddings[input_ids[b, t]]
                out[b, t] = state
        return out


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> TextTokenizer:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    build_tokenizer().backend_tokenizer.save(str(path))
    return TextTokenizer(path)


def make_engine(tokenizer: TextTokenizer, bos: int | None = 1, **limits: int) -> ScoringEngine:
    return ScoringEngine(
        FakeCausalModel(), tokenizer, bos, EngineLimits(**{"max_context": 64, **limits})
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
    separate = engine.score_sync(engine.plan(ITEMS, ScoreOptions(separate_marginal_pass=True)))
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
