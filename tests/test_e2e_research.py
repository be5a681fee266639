"""End to end, the research outputs of the shipped models (issue 24): next-token entropy,
candidate labels and whole distributions from SmolLM2-135M (49,152 tokens) and Gemma-3
270M (262,144), every value against PyTorch on the same weights (float64 log-softmax over
the whole vocabulary, tests/test_research_outputs.torch_logprobs), within 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_research_outputs import torch_logprobs

from conftest import ServerProcess
from lmscore.client import Item, ScoreOptions, ScoringClient
from reference import natural_pairs

pytestmark = pytest.mark.e2e
TOLERANCE = 1e-4
PROMPT = "Review: the film was a delight from start to finish.\nSentiment:"


def assert_research_outputs_equal_pytorch(server: ServerProcess, model, tokenizer) -> None:
    """Entropy of every token and word, 1,000 labels after a prompt, and two whole
    distributions per result, against float64 PyTorch; label strings as their ids."""
    pairs = natural_pairs(1)[:3]
    items = [Item(p, [c]) for p, c in pairs] + [Item(PROMPT, [""])]
    with ScoringClient(server.address, timeout=900) as client:
        vocab = client.model_info().vocab_size
        labels = tuple(int(i) for i in np.random.default_rng(24).choice(vocab, 1000, False))
        options = ScoreOptions(
            token_details=True,
            entropy=True,
            words=True,
            label_token_ids=labels,
            distribution_positions=(-1, 2),
        )
        results = client.score(items, options)
        strings = (" positive", " negative")
        string_ids = tuple(tokenizer(s, add_special_tokens=False)["input_ids"][0] for s in strings)
        [by_text] = client.score([Item(PROMPT, [""])], ScoreOptions(label_tokens=strings))
        [by_id] = client.score([Item(PROMPT, [""])], ScoreOptions(label_token_ids=string_ids))
    assert by_text.label_logprobs == by_id.label_logprobs
    for result in results:
        ids = [t.id for t in result.tokens]
        logprobs = torch_logprobs(model, ids)
        entropy = -(np.exp(logprobs) * logprobs).sum(-1)
        got = np.array([t.entropy for t in result.tokens[1:]])
        assert np.abs(got - entropy[:-1]).max() < TOLERANCE
        scored_words = [w for w in result.words if w.token_start > 0]
        for word in scored_words:
            assert abs(word.entropy - entropy[word.token_start - 1]) < TOLERANCE
        labelled = np.array(result.label_logprobs)
        assert np.abs(labelled - logprobs[-1][list(labels)]).max() < TOLERANCE
        assert [d.position for d in result.distributions] == [len(ids) - 1, 2]
        for distribution in result.distributions:
            values = np.frombuffer(distribution.logprobs, "<f4")
            assert values.shape == (vocab,)
            assert np.abs(values - logprobs[distribution.position]).max() < TOLERANCE
    prompt_logprobs = torch_logprobs(model, [t.id for t in results[-1].tokens])
    expected = prompt_logprobs[-1][list(string_ids)]
    assert np.abs(np.array(by_text.label_logprobs) - expected).max() < TOLERANCE


def test_default_model_research_outputs_equal_pytorch(default_server, torch_default) -> None:
    assert_research_outputs_equal_pytorch(default_server, *torch_default)


def test_gemma_research_outputs_equal_pytorch(gemma_server, torch_gemma) -> None:
    assert_research_outputs_equal_pytorch(gemma_server, *torch_gemma)
