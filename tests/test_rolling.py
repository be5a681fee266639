"""Rolling log-likelihood (ScoreRolling): whole texts longer than the context.

The window rule is checked against lm-evaluation-harness's own functions, and
every number the server returns against PyTorch scoring those windows.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import grpc
import pytest
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from conftest import ServerProcess
from lmscore.client import (
    AsyncScoringClient,
    InvalidArgumentError,
    ModelNotFoundError,
    RollingOptions,
    ScoringClient,
)
from lmscore.server.rolling import rolling_windows
from reference import encode, sequence_logprobs
from tiny_model import MAX_CONTEXT, VOCAB_SIZE

BOS = 1
LONG_TEXT = Path("/usr/share/common-licenses/GPL-3").read_text()[:3000]
TEXTS = [
    LONG_TEXT,  # several windows
    "Everyone is permitted to copy and distribute verbatim copies.",  # one window
    " x",  # a single token or two
]


@pytest.mark.parametrize("length", [0, 1, 2, 5, 9, 10, 11, 37])
@pytest.mark.parametrize(("window", "min_context"), [(1, 1), (4, 1), (10, 1), (10, 3), (10, 10)])
def test_windows_are_lm_evals(length: int, window: int, min_context: int) -> None:
    tokens = list(range(100, 100 + length))
    ours = [
        (list(w.context), list(w.continuation))
        for w in rolling_windows(tokens, 7, window, min_context)
    ]
    theirs = [
        make_disjoint_window(pair)
        for pair in get_rolling_token_windows(tokens, 7, window, min_context)
    ]
    assert ours == theirs
    # Every token scored exactly once, in order, within the window, with enough context.
    assert [t for _, continuation in ours for t in continuation] == tokens
    for index, (context, continuation) in enumerate(ours):
        assert len(context) + len(continuation) - 1 <= window
        if index:
            assert len(context) >= min_context


def reference_rolling(model, tokenizer, text: str, window: int, min_context: int = 1):
    """Token log-probs of `text` by lm-eval's windows, each window one PyTorch pass."""
    tokens = encode(tokenizer, text)
    logprobs: list[float] = []
    for pair in get_rolling_token_windows(tokens, BOS, window, min_context):
        context, continuation = make_disjoint_window(pair)
        scores, _, _ = sequence_logprobs(model, context + continuation)
        logprobs.extend(float(x) for x in scores[len(context) - 1 :])
    assert len(logprobs) == len(tokens)
    return tokens, logprobs


@pytest.fixture(scope="module")
def client(tiny_server: ServerProcess):
    with ScoringClient(tiny_server.address, timeout=60) as client:
        yield client


@pytest.mark.parametrize(("window", "min_context"), [(0, 0), (32, 1), (32, 24)])
def test_rolling_equals_pytorch(client: ScoringClient, tiny_torch, window, min_context) -> None:
    model, tokenizer = tiny_torch
    options = RollingOptions(
        max_window_tokens=window, min_context_tokens=min_context, token_logprobs=True
    )
    results = client.score_rolling(TEXTS, options)
    assert [r.text_index for r in results] == list(range(len(TEXTS)))
    effective = window or MAX_CONTEXT - 1
    for text, result in zip(TEXTS, results, strict=True):
        tokens, expected = reference_rolling(model, tokenizer, text, effective, min_context or 1)
        assert list(result.token_ids) == tokens
        assert result.token_count == len(tokens)
        assert result.prefix_token_id == BOS
        assert result.token_logprobs == pytest.approx(expected, abs=1e-4)
        assert result.logprob == pytest.approx(math.fsum(expected), abs=1e-3)
        assert result.perplexity == pytest.approx(math.exp(-result.logprob / len(tokens)))
        stride = effective - max(min_context, 1) + 1
        assert result.windows == 1 + math.ceil(max(len(tokens) - effective, 0) / stride)
    assert results[0].windows > 1  # the long text really rolled


def test_token_ids_and_text_agree_and_empty_text(client: ScoringClient) -> None:
    [by_text] = client.score_rolling([LONG_TEXT], RollingOptions(token_logprobs=True))
    by_ids, empty = client.score_rolling([list(by_text.token_ids), ""])
    assert by_ids.logprob == by_text.logprob and by_ids.windows == by_text.windows
    assert by_ids.token_logprobs == ()  # only when asked
    assert (empty.token_count, empty.windows, empty.logprob) == (0, 0, 0.0)
    assert math.isnan(empty.perplexity)


def test_async_client_rolling(tiny_server: ServerProcess, client: ScoringClient) -> None:
    async def run():
        async with AsyncScoringClient(tiny_server.address, timeout=60) as async_client:
            return await async_client.score_rolling(TEXTS)

    assert asyncio.run(run()) == client.score_rolling(TEXTS)


@pytest.mark.parametrize(
    ("texts", "options", "field", "limit"),
    [
        ([], RollingOptions(), "texts", "at least one text"),
        (
            ["a"],
            RollingOptions(max_window_tokens=MAX_CONTEXT),
            "options.max_window_tokens",
            "<= 95",
        ),
        (
            ["a"],
            RollingOptions(max_window_tokens=8, min_context_tokens=9),
            "options.min_context_tokens",
            "<= the window of 8",
        ),
        (["a", [5, VOCAB_SIZE]], RollingOptions(), "texts[1].token_ids[1]", f"[0, {VOCAB_SIZE})"),
    ],
)
def test_bad_rolling_requests_name_field_and_limit(
    client: ScoringClient, texts, options, field: str, limit: str
) -> None:
    with pytest.raises(InvalidArgumentError) as error:
        client.score_rolling(texts, options)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error.value.field_violations
    assert limit in error.value.message
    assert client.score_rolling(["still serving"])[0].token_count > 0


def test_rolling_unknown_model_is_not_found(client: ScoringClient) -> None:
    with pytest.raises(ModelNotFoundError):
        client.score_rolling(["a"], RollingOptions(model="another-model"))
