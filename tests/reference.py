"""Independent PyTorch computation of what the server must return.

Written from the rules in the README, sharing no code with lmscore.server:
Hugging Face tokenizer, transformers model, float64 sums.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np

NATURAL_TEXTS = [Path("/usr/share/common-licenses") / n for n in ("GPL-3", "Apache-2.0", "MPL-2.0")]


@dataclasses.dataclass(frozen=True)
class Reference:
    joint: float
    marginal: float
    conditional: float
    greedy: bool
    prompt_ids: list[int]
    completion_ids: list[int]
    # Per token of the sequence, None for the first.
    token_logprobs: list[float | None]
    token_ranks: list[int]
    top_ids: list[list[int]]


def encode(hf_tokenizer, text: str) -> list[int]:
    return list(hf_tokenizer(text, add_special_tokens=False)["input_ids"])


def split_pair(hf_tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's _encode_pair, plus the documented fallback at a merged boundary."""
    n_spaces = len(prompt) - len(prompt.rstrip())
    if n_spaces:
        completion = prompt[-n_spaces:] + completion
        prompt = prompt[:-n_spaces]
    context = encode(hf_tokenizer, prompt)
    if not completion:
        return context, []
    whole = encode(hf_tokenizer, prompt + completion)
    if whole[: len(context)] != context:
        return context, encode(hf_tokenizer, completion)
    return context, whole[len(context) :]


def sequence_logprobs(model, ids: list[int], top_k: int = 0):
    """log p(t_j | t_<j) for j >= 1 (float64), ranks, and top-k ids, from one PyTorch pass."""
    import torch

    if len(ids) < 2:
        return np.zeros(0), np.zeros(0, dtype=np.int64), np.zeros((0, top_k), dtype=np.int64)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    targets = torch.tensor(ids[1:])
    chosen = logprobs[torch.arange(len(targets)), targets]
    ranks = 1 + (logits > logits[torch.arange(len(targets)), targets][:, None]).sum(-1)
    top = torch.topk(logits, top_k, dim=-1).indices if top_k else torch.zeros((len(targets), 0))
    return chosen.numpy(), ranks.numpy(), top.long().numpy()


def reference_score(
    model,
    hf_tokenizer,
    prompt: str | list[int],
    completion: str | list[int],
    bos_id: int | None,
    top_k: int = 0,
    truncate_to: int | None = None,
) -> Reference:
    if isinstance(prompt, str) and isinstance(completion, str):
        prompt_ids, completion_ids = split_pair(hf_tokenizer, prompt, completion)
    else:
        prompt_ids = encode(hf_tokenizer, prompt) if isinstance(prompt, str) else list(prompt)
        completion_ids = (
            encode(hf_tokenizer, completion) if isinstance(completion, str) else list(completion)
        )
    bos = [] if bos_id is None else [bos_id]
    if truncate_to is not None:
        excess = len(bos) + len(prompt_ids) + len(completion_ids) - truncate_to
        if excess > 0:
            prompt_ids = prompt_ids[excess:]
    ids = bos + prompt_ids + completion_ids
    logprobs, ranks, top = sequence_logprobs(model, ids, top_k)
    # Entry j-1 scores token j; token 0 (BOS, or the first token without BOS) is unscored.
    boundary = len(bos) + len(prompt_ids)
    marginal = float(sum(logprobs[: max(boundary - 1, 0)]))
    conditional = float(sum(logprobs[max(boundary - 1, 0) :]))
    greedy = bool(all(r == 1 for r in ranks[max(boundary - 1, 0) :]))
    return Reference(
        joint=float(sum(logprobs)),
        marginal=marginal,
        conditional=conditional,
        greedy=greedy,
        prompt_ids=prompt_ids,
        completion_ids=completion_ids,
        token_logprobs=[None, *(float(x) for x in logprobs)] if ids else [],
        token_ranks=[0, *(int(r) for r in ranks)] if ids else [],
        top_ids=[[], *(list(map(int, t)) for t in top)] if ids else [],
    )


def natural_pairs(count_per_text: int = 4) -> list[tuple[str, str]]:
    """Sentences cut from the license texts, split into prompt and completion at a word."""
    pairs = []
    for path in NATURAL_TEXTS:
        text = re.sub(r"\s+", " ", path.read_text())
        sentences = [s for s in re.split(r"(?<=[.;:])\s", text) if 12 <= len(s.split()) <= 40]
        for number, sentence in enumerate(sentences[5 : 5 + count_per_text]):
            words = sentence.split(" ")
            cut = len(words) * 2 // 3
            prompt = " ".join(words[:cut])
            # Every other pair keeps the space at the end of the prompt (the whitespace rule).
            completion = " ".join(words[cut:])
            if number % 2:
                pairs.append((prompt + " ", completion))
            else:
                pairs.append((prompt, " " + completion))
    return pairs


def assert_equals_reference(result, expected: Reference, tolerance: float) -> None:
    """A ScoreResult's split, joint, marginal, conditional and greedy flag against the
    reference."""
    import pytest

    assert result.prompt_tokens == len(expected.prompt_ids)
    assert result.completion_tokens == len(expected.completion_ids)
    assert result.joint_logprob == pytest.approx(expected.joint, abs=tolerance)
    assert result.marginal_logprob == pytest.approx(expected.marginal, abs=tolerance)
    assert result.conditional_logprob == pytest.approx(expected.conditional, abs=tolerance)
    assert result.greedy == expected.greedy


def assert_token_details_equal(tokens, expected: Reference, tolerance: float) -> None:
    """Token details after the first (log-prob, rank, top-k ids) against the reference."""
    import pytest

    for token, logprob, rank, top in zip(
        tokens[1:],
        expected.token_logprobs[1:],
        expected.token_ranks[1:],
        expected.top_ids[1:],
        strict=True,
    ):
        assert token.logprob == pytest.approx(logprob, abs=tolerance)
        assert token.rank == rank
        assert [t.id for t in token.top] == top
