"""Rolling windows: how a text longer than the model's context is scored, token by token.

lm-evaluation-harness's ``loglikelihood_rolling`` rule (``get_rolling_token_windows``
and ``make_disjoint_window`` in lm_eval.utils), restated:

* The text's tokens t_0..t_{n-1} are predicted in order, each exactly once.
* The first window feeds ``[prefix] + t_0..t_{m-2}`` (m = min(W, n) model inputs,
  W = ``max_window``) and scores t_0..t_{m-1}: t_0 is predicted from the prefix
  token alone (the model's BOS, else EOS), so no token goes unscored.
* Every later window feeds the W tokens before its last predicted token and
  scores the next at most ``W - min_context + 1`` unscored tokens; so each of
  them sees at least ``min_context`` preceding tokens. ``min_context = 1`` is
  lm-eval's own setting (disjoint windows, fewest passes); larger values make
  a sliding window with more context at each window's start.

A window is returned as (context, continuation): its joint sequence is
``context + continuation`` (at most W + 1 tokens, the last only predicted) and
its score is the sum over the continuation, i.e. log Pr(continuation | context).
The text's log-likelihood is the sum of its windows' scores (every token once),
and its perplexity exp(-logprob / tokens).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class Window:
    context: tuple[int, ...]
    continuation: tuple[int, ...]


def rolling_windows(
    tokens: Sequence[int], prefix_token: int, max_window: int, min_context: int = 1
) -> list[Window]:
    """The windows that score every token of `tokens` once (none for an empty text)."""
    if not 1 <= min_context <= max_window:
        raise ValueError(f"need 1 <= min_context ({min_context}) <= max_window ({max_window})")
    tokens = tuple(tokens)
    if not tokens:
        return []
    predicted = min(max_window, len(tokens))
    windows = [Window((prefix_token,), tokens[:predicted])]
    stride = max_window - min_context + 1
    while predicted < len(tokens):
        count = min(len(tokens) - predicted, stride)
        end = predicted + count
        context = tokens[end - max_window - 1 : end - count]
        windows.append(Window(context, tokens[end - count : end]))
        predicted = end
    return windows


def text_logprob(window_logprobs: Sequence[float]) -> float:
    """log Pr(text): the windows' log Pr(continuation | context), summed exactly."""
    return math.fsum(window_logprobs)


def perplexity(logprob: float, token_count: int) -> float:
    """exp(-logprob / token_count); NaN for a text without tokens."""
    return math.exp(-logprob / token_count) if token_count else math.nan
