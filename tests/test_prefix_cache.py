"""The cross-request prefix cache (issue 12): exact reuse of earlier prompts' passes.

The cache's own rules on hand-built entries, the engine with a fake causal model (every
result equal with and without the cache, whatever it held before), then a real server
with the tiny model against PyTorch, with its metrics. The default model's check is in
tests/test_e2e_default_model.py.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from test_engine import VOCAB, FakeCausalModel

from conftest import free_port, running_server, scrape_metrics
from lmscore.client import Item, ScoreOptions, ScoringClient
from lmscore.server.config import EngineSettings
from lmscore.server.engine import ScoringEngine
from lmscore.server.prefix_cache import PrefixCache
from lmscore.server.requests import ItemInput, ModelFacts
from lmscore.server.scoring import PositionScores
from lmscore.server.tokenization import TextTokenizer
from reference import assert_equals_reference, reference_score
from tiny_model import build_tokenizer

TOLERANCE = 1e-4
GPL = Path("/usr/share/common-licenses/GPL-3")


def entry(tokens: list[int], top_k: int = 0) -> tuple[np.ndarray, dict, PositionScores]:
    """A fake prefix pass over `tokens`: a [1, 2, m, 3] cache whose values say their position,
    and scores whose log-probs do too."""
    m = len(tokens) - 1
    past = {"k": np.broadcast_to(np.arange(m, dtype=np.float32)[None, None, :, None], (1, 2, m, 3))}
    scores = PositionScores(
        -np.arange(1, m + 1, dtype=np.float32),
        np.ones(m, np.int64),
        np.zeros((m, top_k), np.int64),
        np.zeros((m, top_k), np.float32),
    )
    return np.asarray(tokens, np.int64), past, scores


def test_lookup_reuses_positions_whose_inputs_and_targets_are_shared() -> None:
    cache = PrefixCache(10**6)
    cache.store(*entry([1, 2, 3, 4, 5, 6]))
    # Shares 4 tokens (1 2 3 4): positions 0..2 (targets 2, 3, 4) are reusable, not 3.
    hit = cache.lookup(np.asarray([1, 2, 3, 4, 9, 9, 9]), top_k=0)
    assert hit is not None and hit.length == 3
    assert hit.past["k"].shape == (1, 2, 3, 3)
    np.testing.assert_array_equal(hit.past["k"][0, 0, :, 0], [0, 1, 2])
    np.testing.assert_array_equal(hit.scores.logprobs, [-1, -2, -3])
    # A prompt wholly inside the cached one: every position of its pass.
    hit = cache.lookup(np.asarray([1, 2, 3]), top_k=0)
    assert hit is not None and hit.length == 2
    assert cache.lookup(np.asarray([7, 2, 3, 4]), top_k=0) is None
    assert (cache.hits, cache.misses, cache.hit_tokens) == (2, 1, 5)


def test_lookup_needs_enough_alternatives_and_enough_tokens() -> None:
    cache = PrefixCache(10**6, min_tokens=3)
    cache.store(*entry([1, 2, 3, 4, 5, 6], top_k=2))
    assert cache.lookup(np.asarray([1, 2, 3, 4, 5]), top_k=3) is None  # scored with 2 only
    hit = cache.lookup(np.asarray([1, 2, 3, 4, 5]), top_k=1)
    assert hit is not None and hit.scores.top_ids.shape == (4, 1)
    assert cache.lookup(np.asarray([1, 2, 3, 9]), top_k=0) is None  # 2 positions < 3


def test_budget_evicts_least_recently_used_and_longer_prompts_supersede() -> None:
    probe = PrefixCache(10**6)
    probe.store(*entry([1, 2, 3]))
    cache = PrefixCache(3 * probe.bytes)  # three entries of three tokens
    cache.store(*entry([1, 2, 3]))
    cache.store(*entry([4, 5, 6]))
    cache.store(*entry([7, 8, 9]))
    assert len(cache) == 3
    assert cache.lookup(np.asarray([1, 2, 3]), 0) is not None  # now the most recent
    cache.store(*entry([10, 11, 12]))
    assert cache.lookup(np.asarray([4, 5, 6]), 0) is None  # the least recently used went
    assert cache.lookup(np.asarray([1, 2, 3]), 0) is not None
    assert cache.bytes <= cache.max_bytes
    # [1, 2, 3, 4] supersedes [1, 2, 3], which starts it, and, being larger, evicts the
    # least recently used [7, 8, 9].
    cache.store(*entry([1, 2, 3, 4]))
    assert len(cache) == 2
    assert cache.lookup(np.asarray([7, 8, 9]), 0) is None
    assert cache.lookup(np.asarray([10, 11, 12]), 0) is not None
    hit = cache.lookup(np.asarray([1, 2, 3, 4, 5]), 0)
    assert hit is not None and hit.length == 3
    cache.store(*entry(list(range(1000))))  # alone over the budget: not kept
    assert cache.lookup(np.asarray(list(range(1000))), 0) is None
    cache.clear()
    assert cache.bytes == 0 and len(cache) == 0


# The engine with a fake causal model.


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> TextTokenizer:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    build_tokenizer().backend_tokenizer.save(str(path))
    return TextTokenizer(path)


def engine(tokenizer: TextTokenizer, cache_bytes: int) -> ScoringEngine:
    return ScoringEngine(
        FakeCausalModel(),
        tokenizer,
        ModelFacts(max_context=512, vocab_size=VOCAB, bos_token_id=1),
        EngineSettings(
            prefix_cache_bytes=cache_bytes, min_prefix_reuse_tokens=1, prefill_chunk_tokens=16
        ),
    )


def few_shot_requests(count: int, seed: int) -> list[tuple[list[ItemInput], ScoreOptions]]:
    """Requests sharing preambles (two of them, so the cache holds several), questions that
    repeat, prompts inside other prompts, and token details of varied top_k."""
    rng = random.Random(seed)
    words = GPL.read_text().split()
    preambles = [" ".join(words[:60]), " ".join(words[200:240])]
    requests = []
    for _ in range(count):
        preamble = rng.choice(preambles)
        question = " ".join(rng.sample(words[400:500], rng.randint(0, 6)))
        prompt = f"{preamble} {question}".strip()
        choices = [" " + " ".join(rng.sample(words, rng.randint(1, 4))) for _ in range(3)]
        options = ScoreOptions(token_details=rng.random() < 0.5, top_k=rng.choice([0, 0, 2, 5]))
        requests.append(([ItemInput(prompt, choices)], options))
    return requests


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_results_equal_with_and_without_the_cache_whatever_it_held(
    tokenizer: TextTokenizer, seed: int
) -> None:
    cached, uncached = engine(tokenizer, 10**7), engine(tokenizer, 0)
    requests = few_shot_requests(24, seed)
    for items, options in requests:
        with_cache = cached.score_sync(cached.plan(items, options))
        without = uncached.score_sync(uncached.plan(items, options))
        for a, b in zip(with_cache, without, strict=True):
            for name in ("joint_logprob", "marginal_logprob", "conditional_logprob"):
                assert getattr(a, name) == pytest.approx(getattr(b, name), abs=TOLERANCE)
            assert a.greedy == b.greedy
            for s, t in zip(a.tokens, b.tokens, strict=True):
                assert (s.id, s.rank) == (t.id, t.rank)
                assert [x.id for x in s.top] == [x.id for x in t.top]
                if s.logprob is not None:
                    assert s.logprob == pytest.approx(t.logprob, abs=TOLERANCE)
    stats = cached.stats()
    # Misses: each preamble's first request, and requests asking more top-k alternatives
    # than the cached passes scored.
    assert stats.prefix_cache_hits >= len(requests) // 2 and stats.prefix_cache_hit_tokens > 0
    tokens_run = lambda e: sum(b * s for b, s in e.model.calls)  # noqa: E731
    assert tokens_run(cached) < tokens_run(uncached) / 2


def test_a_small_budget_still_gives_the_same_results(tokenizer: TextTokenizer) -> None:
    """A budget of about one entry: eviction on every request, results unchanged."""
    tiny, uncached = engine(tokenizer, 60_000), engine(tokenizer, 0)
    for items, options in few_shot_requests(10, 5):
        for a, b in zip(
            tiny.score_sync(tiny.plan(items, options)),
            uncached.score_sync(uncached.plan(items, options)),
            strict=True,
        ):
            assert a.conditional_logprob == pytest.approx(b.conditional_logprob, abs=TOLERANCE)
    assert tiny.stats().prefix_cache_bytes <= 60_000


# A real server, against PyTorch.


def test_server_cache_hits_equal_pytorch_and_show_in_metrics(tiny_export, tiny_torch) -> None:
    model, hf_tokenizer = tiny_torch
    words = GPL.read_text().split()
    preamble = " ".join(words[:14])  # the tiny model's context is 96 tokens
    questions = [" ".join(words[100 + 5 * i : 103 + 5 * i]) for i in range(4)]
    choices = [" yes", " no", " perhaps not"]
    port = free_port()
    flags = ("--min-prefix-reuse-tokens", "1", "--metrics-port", str(port))
    with running_server(tiny_export, *flags, "--prefill-chunk-tokens", "8") as server:
        with ScoringClient(server.address, timeout=60) as client:
            results = [
                client.score([Item(f"{preamble} {q}", choices)], ScoreOptions(token_details=True))
                for q in questions
            ]
        metrics = scrape_metrics(port)
    for question, answers in zip(questions, results, strict=True):
        for choice, result in zip(choices, answers, strict=True):
            expected = reference_score(model, hf_tokenizer, f"{preamble} {question}", choice, 1)
            assert_equals_reference(result, expected, TOLERANCE)
    label = (("model", "tiny-llama"),)
    hits = metrics[("lmscore_prefix_cache_lookups_total", (*label, ("result", "hit")))]
    misses = metrics[("lmscore_prefix_cache_lookups_total", (*label, ("result", "miss")))]
    assert (hits, misses) == (3, 1)
    assert metrics[("lmscore_prefix_cache_hit_tokens_total", label)] >= 3 * 20
    assert 0 < metrics[("lmscore_prefix_cache_bytes", label)] <= 256 * 2**20


@pytest.mark.parametrize("io_binding", [True, False], ids=["io-binding", "session-run"])
def test_an_entry_keeps_no_view_of_onnx_runtimes_buffers(
    tiny_export: Path, io_binding: bool
) -> None:
    """A kept prefix pass is copied out of ONNX Runtime's output buffers (numpy views of its
    arena), else one entry would keep a whole arena region from going back when idle."""
    from lmscore.server.config import RuntimeOptions
    from lmscore.server.prefix_cache import owns_its_memory
    from lmscore.server.runtime import OnnxCausalLM

    model = OnnxCausalLM(tiny_export, RuntimeOptions(io_binding=io_binding))
    tokens = np.arange(10, 30, dtype=np.int64)
    inputs = tokens[None, :-1]
    scores, present = model.score(
        inputs, np.ones_like(inputs), tokens[None, 1:], top_k=2, return_present=True
    )
    assert present is not None
    row = PositionScores(
        scores.logprobs[0], scores.ranks[0], scores.top_ids[0], scores.top_logprobs[0]
    )
    assert not owns_its_memory(row.logprobs)  # what the model run hands back
    cache = PrefixCache(10**8)
    cache.store(tokens, present, row)
    hit = cache.lookup(tokens, top_k=2)
    assert hit is not None
    (kept,) = cache._entries.values()
    arrays = [
        *kept.past.values(),
        kept.scores.logprobs,
        kept.scores.ranks,
        kept.scores.top_ids,
        kept.scores.top_logprobs,
    ]
    assert all(owns_its_memory(array) for array in arrays)
    np.testing.assert_array_equal(hit.scores.logprobs, row.logprobs[: hit.length])
