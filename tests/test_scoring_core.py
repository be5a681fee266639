"""The scoring math on hand-built arrays: no model, no gRPC."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lmscore.server.scoring import PositionScores, SequenceLayout, score_positions, sum_sequence


def exact_logprob(row: list[float], target: int) -> float:
    """log softmax(row)[target] in float64, written out."""
    normalizer = math.log(sum(math.exp(x) for x in row))
    return row[target] - normalizer


def test_logprobs_ranks_and_top_k_match_a_direct_computation() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(5, 11)).astype(np.float32)
    targets = np.array([0, 3, 10, 7, 7])
    scores = score_positions(logits, targets, top_k=3)
    for t, target in enumerate(targets):
        row = logits[t].astype(np.float64).tolist()
        assert scores.logprobs[t] == pytest.approx(exact_logprob(row, target), abs=1e-6)
        assert scores.ranks[t] == 1 + sum(x > row[target] for x in row)
        expected_top = sorted(range(11), key=lambda i: -row[i])[:3]
        assert scores.top_ids[t].tolist() == expected_top
        for i, token in enumerate(expected_top):
            assert scores.top_logprobs[t, i] == pytest.approx(exact_logprob(row, token), abs=1e-6)
    assert scores.logprobs.dtype == np.float32


def test_log_softmax_is_float32_even_for_float16_logits_and_stable_for_large_values() -> None:
    logits = np.array([[1000.0, 999.0, -1000.0]], dtype=np.float16)
    scores = score_positions(logits, np.array([1]))
    assert scores.logprobs.dtype == np.float32
    assert scores.logprobs[0] == pytest.approx(-1.0 - math.log1p(math.exp(-1.0)), abs=1e-3)


def test_rank_counts_only_strictly_higher_logits() -> None:
    logits = np.array([[2.0, 2.0, 1.0, 2.0]], dtype=np.float32)
    assert score_positions(logits, np.array([1])).ranks.tolist() == [1]
    assert score_positions(logits, np.array([2])).ranks.tolist() == [4]


def scores_of(logprobs: list[float], ranks: list[int] | None = None) -> PositionScores:
    n = len(logprobs)
    return PositionScores(
        np.array(logprobs, np.float32),
        np.array(ranks or [1] * n, np.int64),
        np.zeros((n, 0), np.int64),
        np.zeros((n, 0), np.float32),
    )


def test_sums_split_prompt_and_completion_at_the_boundary() -> None:
    # [BOS, p1, p2, c1, c2]: entries score p1, p2, c1, c2.
    layout = SequenceLayout(bos=True, prompt_len=2, completion_len=2)
    sums = sum_sequence(layout, scores_of([-1.0, -2.0, -0.5, -0.25], [1, 3, 1, 2]))
    assert sums.marginal == pytest.approx(-3.0)
    assert sums.conditional == pytest.approx(-0.75)
    assert sums.joint == pytest.approx(-3.75)
    assert sums.greedy is False  # c2 has rank 2
    assert sums.first_token_scored is True


def test_greedy_looks_only_at_completion_tokens() -> None:
    layout = SequenceLayout(bos=True, prompt_len=2, completion_len=1)
    assert sum_sequence(layout, scores_of([-1.0, -2.0, -0.5], [7, 9, 1])).greedy is True


def test_empty_completion_has_conditional_zero_and_joint_equal_marginal() -> None:
    layout = SequenceLayout(bos=True, prompt_len=3, completion_len=0)
    sums = sum_sequence(layout, scores_of([-1.0, -2.0, -3.0]))
    assert sums.conditional == 0.0
    assert sums.joint == sums.marginal == pytest.approx(-6.0)
    assert sums.greedy is True


def test_empty_prompt_has_marginal_zero_and_conditional_equal_joint() -> None:
    layout = SequenceLayout(bos=True, prompt_len=0, completion_len=2)
    sums = sum_sequence(layout, scores_of([-1.5, -2.5]))
    assert sums.marginal == 0.0
    assert sums.conditional == sums.joint == pytest.approx(-4.0)


def test_without_bos_the_first_token_is_left_out_and_flagged() -> None:
    # [p1, p2, c1]: entries score p2 and c1; p1 has no log-prob.
    layout = SequenceLayout(bos=False, prompt_len=2, completion_len=1)
    sums = sum_sequence(layout, scores_of([-2.0, -0.5]))
    assert sums.first_token_scored is False
    assert sums.marginal == pytest.approx(-2.0)
    assert sums.conditional == pytest.approx(-0.5)


def test_without_bos_and_prompt_the_first_completion_token_is_unscored() -> None:
    layout = SequenceLayout(bos=False, prompt_len=0, completion_len=3)
    sums = sum_sequence(layout, scores_of([-1.0, -2.0], [1, 1]))
    assert sums.first_token_scored is False
    assert sums.marginal == 0.0
    assert sums.conditional == pytest.approx(-3.0)


def test_separate_marginal_gives_conditional_as_joint_minus_marginal() -> None:
    layout = SequenceLayout(bos=True, prompt_len=1, completion_len=1)
    sums = sum_sequence(layout, scores_of([-1.0, -2.0]), separate_marginal=-1.25)
    assert sums.marginal == -1.25
    assert sums.joint == pytest.approx(-3.0)
    assert sums.conditional == pytest.approx(-1.75)


def test_sums_are_float64() -> None:
    values = [-1e-8] * 1000 + [-1000.0]
    layout = SequenceLayout(bos=True, prompt_len=0, completion_len=len(values))
    sums = sum_sequence(layout, scores_of(values))
    expected = math.fsum(float(np.float32(v)) for v in values)
    assert sums.joint == expected


def test_mismatched_lengths_are_refused() -> None:
    with pytest.raises(ValueError):
        sum_sequence(SequenceLayout(True, 2, 2), scores_of([-1.0]))
    with pytest.raises(ValueError):
        score_positions(np.zeros((3, 4), np.float32), np.zeros(2, np.int64))
