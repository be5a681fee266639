"""Fairness between the models of one server (issue 23): their runs take turns on one
thread, first come first served, and while another model is active a model's runs are kept
to `--model-turn-ms` by their measured cost, so a quiet model's short request waits for
one short turn of a busy model, not for a whole chunk of its long request. Scores stay
those of one pass. Fake models whose runs take a set time per position: no ONNX."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from test_engine import VOCAB, FakeCausalModel

from lmscore.server.config import EngineSettings
from lmscore.server.engine import ScoringEngine
from lmscore.server.model_runs import ModelThread
from lmscore.server.requests import ItemInput, ModelFacts
from lmscore.server.tokenization import TextTokenizer
from lmscore.v1.options import ScoreOptions
from tiny_model import build_tokenizer

# The busy model's cost: a full chunk of 64 positions takes 0.128 s, a turn 0.05 s (25).
POSITION_S = 0.002
CHUNK = 64
TURN_S = 0.05
LONG = [ItemInput(list(range(10, 60)), [list(range(60, 150))])]
SHORT = [ItemInput("Short", [" one"])]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> TextTokenizer:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    build_tokenizer().backend_tokenizer.save(str(path))
    return TextTokenizer(path)


class TimedFakeModel(FakeCausalModel):
    """A run takes POSITION_S per position (rows x positions), as a real model's would;
    `runs`: the positions of each run, and when it began (time.monotonic())."""

    def __init__(self) -> None:
        super().__init__()
        self.runs: list[tuple[int, float]] = []

    def score(self, input_ids, *args: Any, **kwargs: Any):  # type: ignore[override]
        self.runs.append((input_ids.shape[1], time.monotonic()))
        time.sleep(POSITION_S * input_ids.size)
        return super().score(input_ids, *args, **kwargs)


def engine_on(thread: ModelThread, tokenizer: TextTokenizer, name: str) -> ScoringEngine:
    return ScoringEngine(
        TimedFakeModel(),
        tokenizer,
        ModelFacts(max_context=256, vocab_size=VOCAB, bos_token_id=1),
        EngineSettings(prefill_chunk_tokens=CHUNK, max_queue_delay_ms=0),
        model_thread=thread,
        name=name,
    )


async def score(engine: ScoringEngine, items: list[ItemInput]) -> list:
    return [r async for r in engine.score(engine.plan(items, ScoreOptions()))]


def test_a_quiet_model_waits_one_turn_of_a_busy_one(tokenizer: TextTokenizer) -> None:
    thread = ModelThread(turn_s=TURN_S)
    busy, quiet = engine_on(thread, tokenizer, "busy"), engine_on(thread, tokenizer, "quiet")
    asked: list[float] = []

    async def run() -> list:
        await score(quiet, SHORT)  # the quiet model is active
        long_task = asyncio.create_task(score(busy, LONG))
        while not long_task.done():
            await asyncio.sleep(0.03)
            asked.append(time.monotonic())
            await score(quiet, SHORT)
        return await long_task

    long_results = asyncio.run(run())
    widths = [positions for positions, _ in busy.model.runs]
    # The busy model's first run is a whole chunk (its cost not known yet), the rest turns:
    # no more positions than TURN_S allows at its cost.
    assert CHUNK / 2 < widths[0] <= CHUNK
    assert all(w <= TURN_S / POSITION_S for w in widths[1:]), widths
    assert len(widths) >= 1 + (sum(widths) - widths[0]) // int(TURN_S / POSITION_S)
    # First come, first served: each of the quiet model's requests ran right after the busy
    # model's run in progress when it came, before any other run of the busy model began.
    assert len(asked) >= 3
    quiet_began = [began for _, began in quiet.model.runs[1:]]
    busy_began = [began for _, began in busy.model.runs]
    for came, ran in zip(asked, quiet_began, strict=True):
        assert not [b for b in busy_began if came < b < ran], (came, ran, busy_began)
    one_pass = engine_on(ModelThread(), tokenizer, "one-pass")
    expected = one_pass.score_sync(one_pass.plan(LONG, ScoreOptions()))
    assert [r.joint_logprob for r in long_results] == pytest.approx(
        [r.joint_logprob for r in expected], abs=1e-5
    )


def test_a_model_alone_runs_whole_chunks(tokenizer: TextTokenizer) -> None:
    """Turns apply only while another model is active: alone, or with the limit off, the
    chunks are --prefill-chunk-tokens wide."""
    for thread in (ModelThread(turn_s=TURN_S), ModelThread(turn_s=0)):
        busy, other = engine_on(thread, tokenizer, "busy"), engine_on(thread, tokenizer, "other")
        if not thread.turn_s:
            asyncio.run(score(other, SHORT))  # active, but turns are off
        asyncio.run(score(busy, LONG))
        widths = [positions for positions, _ in busy.model.runs]
        assert max(widths) <= CHUNK and len(widths) == -(-sum(widths) // CHUNK), widths
