"""Per-word scores with the beginning-of-word correction (issue 13, docs/research.md).

The head's word-start sum against float64, the export's mask against the vocabulary
pieces, the split rule on hand-built tokens, the engine with a fake causal model, then
real servers against PyTorch (tests/reference.py): the tiny byte-level model and a tiny
model with a SentencePiece-style ("▁") tokenizer. The shipped models' checks are in
tests/test_e2e_default_model.py and tests/test_e2e_gemma.py.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from test_engine import VOCAB, FakeCausalModel
from test_export import logits_only_graph

from conftest import LMSCORE, running_server
from lmscore.client import InvalidArgumentError, Item, ScoreOptions, ScoringClient
from lmscore.export.words import word_start_mask
from lmscore.server.config import EngineSettings
from lmscore.server.engine import ScoringEngine
from lmscore.server.requests import InvalidInput, ItemInput, ModelFacts
from lmscore.server.scoring import score_positions, split_words
from lmscore.server.tokenization import TextTokenizer
from reference import assert_words_equal, piece_starts_word, reference_words, word_start_ids
from tiny_model import EOS, build_metaspace_tokenizer, build_tokenizer, save_tiny_model

TOLERANCE = 1e-4
BOS_ID = 1
EOS_ID = 2

# Words of every kind: a sentence start, punctuation, digits, a newline run, a merge across
# the prompt/completion boundary, an empty prompt, trailing whitespace, non-ASCII.
PAIRS = [
    ("The old man the", " boat."),
    ("This License applies to any program ", "or other work, 2024 copies"),
    ("Copyright (C) 2007 Free Software Foundation,", " Inc.\n\n  Everyone is permitted"),
    ("the", "re is"),
    ("", "Everyone is permitted to copy"),
    ("Free software", " is free. "),
    ("Le café coûte 3 €,", " dit le robot 🤖 à 中文 readers."),
]
# SentencePiece-style tokenizers keep newlines inside pieces: their pairs have none.
SPACE_PAIRS = [(p, c) for p, c in PAIRS if "\n" not in p + c]


# The head: log B summed in the graph, against float64.


def test_head_sums_word_start_probability_as_float64(tmp_path: Path) -> None:
    from lmscore.export.head import WORD_START_OUTPUT, add_scoring_head

    vocab = 49152
    path = logits_only_graph(tmp_path / "head.onnx", vocab)
    rng = np.random.default_rng(3)
    mask = rng.random(vocab) < 0.6
    add_scoring_head(path, word_start_mask=mask)

    logits = (rng.standard_normal((2, 32, vocab)) * 3).astype(np.float32)
    targets = rng.integers(0, vocab, (2, 32))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (word_starts,) = session.run(
        [WORD_START_OUTPUT],
        {
            "input_ids": targets,
            "raw": logits,
            "target_ids": targets,
            "top_k": np.array([0]),
            "gather_positions": np.zeros((2, 0), np.int64),  # no distribution read
            "gather_ids": np.zeros(0, np.int64),
        },
    )
    wide = logits.astype(np.float64)
    total = np.log(np.exp(wide).sum(-1))
    expected = np.log(np.exp(wide[..., mask]).sum(-1)) - total
    error = word_starts - expected
    assert np.abs(error).max() < 5e-6
    assert abs(error.mean()) < 5e-7  # no drift from the dropped tail of tiny terms
    # The numpy twin of the head (the fake model's and the tests' scorer) agrees.
    twin = score_positions(logits[0], targets[0], word_start_mask=mask).word_start_logprobs
    assert twin is not None
    assert np.abs(twin - expected[0]).max() < 5e-6


# The export's mask: decoded tokens that start with whitespace, and EOS.


@pytest.mark.parametrize(
    ("build", "style"),
    [(build_tokenizer, "byte-level"), (build_metaspace_tokenizer, "sentencepiece")],
)
def test_word_start_mask_marks_the_pieces_that_start_with_whitespace(
    tmp_path: Path, build, style: str
) -> None:
    hf_tokenizer = build()
    hf_tokenizer.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    eos = hf_tokenizer.convert_tokens_to_ids(EOS)
    width = len(hf_tokenizer) + 3  # a model's output layer may be wider than its vocabulary
    mask = word_start_mask(tmp_path / "tokenizer.json", width, eos)
    expected = word_start_ids(hf_tokenizer, style, eos, width)
    np.testing.assert_array_equal(mask, expected)
    assert mask[eos] and not mask[len(hf_tokenizer) :].any()
    assert 50 < mask.sum() < len(hf_tokenizer) - 50  # a real split of the vocabulary
    assert piece_starts_word("\u2581the" if style == "sentencepiece" else "\u0120the", style)


# The split rule, on hand-built tokens.


def test_words_open_at_word_starts_and_blank_tokens_join_the_next_word() -> None:
    text = "  The cat.\n\nSat "
    # "  The"  as [" ", " The"], " cat", ".", "\n\n", "Sat", " "
    offsets = [(0, 1), (1, 5), (5, 9), (9, 10), (10, 12), (12, 15), (15, 16)]
    starts = [True, True, True, False, True, False, True]
    blank = [True, False, False, False, True, False, True]
    words = split_words(starts, blank, offsets, text, first_index=4)
    assert [(w.text, w.start, w.end) for w in words] == [
        ("The", 2, 5),
        ("cat.", 6, 10),
        ("Sat", 12, 15),
        ("", 16, 16),
    ]
    assert [(w.token_start, w.token_end) for w in words] == [(4, 6), (6, 8), (8, 10), (10, 11)]
    assert all(w.opens_with_word_start for w in words)
    # A segment's first token opens a word whatever it is (a completion inside a word).
    inside = split_words([False, True], [False, False], [(0, 2), (2, 5)], "re is", 7)
    assert [(w.text, w.opens_with_word_start) for w in inside] == [("re", False), ("is", True)]


# The engine, with a fake causal model: the formula on its float64 logits.


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> TextTokenizer:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    build_tokenizer().backend_tokenizer.save(str(path))
    return TextTokenizer(path, word_start_mask(path, VOCAB, EOS_ID))


def fake_engine(tokenizer: TextTokenizer, **settings) -> ScoringEngine:
    model = FakeCausalModel()
    model.word_start_mask = tokenizer.word_starts
    return ScoringEngine(
        model,
        tokenizer,
        ModelFacts(max_context=256, vocab_size=VOCAB, bos_token_id=BOS_ID, eos_token_id=EOS_ID),
        EngineSettings(min_prefix_reuse_tokens=1, **settings),
    )


def test_engine_words_follow_the_formula_and_telescope(tokenizer: TextTokenizer) -> None:
    engine = fake_engine(tokenizer)
    model = engine.model
    assert isinstance(model, FakeCausalModel)
    mask = tokenizer.word_starts
    assert mask is not None
    items = [ItemInput(p, [c, c + " again"]) for p, c in PAIRS]
    options = ScoreOptions(words=True, prompt_words=True, token_details=True)
    results = engine.score_sync(engine.plan(items, options))
    for result in results:
        ids = [t.id for t in result.tokens]
        logits = model.logits(ids)
        logsoftmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        after = np.log(np.exp(logsoftmax[:, mask]).sum(-1))
        for word in result.prompt_words + result.words:
            a, b = word.token_start, word.token_end
            uncorrected = sum(logsoftmax[j - 1, ids[j]] for j in range(a, b))
            corrected = uncorrected + after[b - 1] - (after[a - 1] if mask[ids[a]] else 0)
            assert word.logprob_uncorrected == pytest.approx(uncorrected, abs=TOLERANCE)
            assert word.logprob == pytest.approx(corrected, abs=TOLERANCE)
            text = result.scored_completion if word in result.words else result.scored_prompt
            assert text[word.start : word.end] == word.text
        # The completion's words cover its tokens, and their corrections telescope.
        first = result.tokens[result.words[0].token_start].id
        assert result.words[0].token_start == 1 + result.prompt_tokens
        assert result.words[-1].token_end == len(ids)
        telescoped = result.conditional_logprob + after[-1]
        telescoped -= after[result.words[0].token_start - 1] if mask[first] else 0
        assert sum(w.logprob for w in result.words) == pytest.approx(telescoped, abs=TOLERANCE)
        assert sum(w.logprob_uncorrected for w in result.words) == pytest.approx(
            result.conditional_logprob, abs=TOLERANCE
        )


def test_engine_word_requests_run_full_passes(tokenizer: TextTokenizer) -> None:
    """Prefix reuse never computes B after a completion's last token: word plans run full
    passes, with the same conditionals."""
    engine = fake_engine(tokenizer)
    items = [ItemInput("The old man the", [" boat.", " boats.", " sea"])]
    with_words = engine.plan(items, ScoreOptions(words=True))
    without = engine.plan(items, ScoreOptions())
    assert not with_words.prefix_groups and without.prefix_groups
    for a, b in zip(engine.score_sync(with_words), engine.score_sync(without), strict=True):
        assert a.conditional_logprob == pytest.approx(b.conditional_logprob, abs=TOLERANCE)
        assert a.words and not b.words


def test_engine_refuses_words_without_text_or_without_a_mask(
    tokenizer: TextTokenizer, tmp_path: Path
) -> None:
    engine = fake_engine(tokenizer)
    with pytest.raises(InvalidInput) as error:
        engine.plan([ItemInput("The", ["x", [5, 6]])], ScoreOptions(words=True))
    assert error.value.field == "items[0].completions[1].token_ids"
    assert "options.words" in str(error.value)
    with pytest.raises(InvalidInput) as error:
        engine.plan([ItemInput([5, 6], [" x"])], ScoreOptions(prompt_words=True))
    assert error.value.field == "items[0].prompt_token_ids"
    # Token ids are fine for the completion when only the prompt's words are asked.
    engine.plan([ItemInput("The cat", [[5, 6]])], ScoreOptions(prompt_words=True))
    path = tmp_path / "tokenizer.json"
    build_tokenizer().backend_tokenizer.save(str(path))
    old = ScoringEngine(
        FakeCausalModel(),
        TextTokenizer(path),
        ModelFacts(max_context=64, vocab_size=VOCAB, bos_token_id=BOS_ID),
    )
    with pytest.raises(InvalidInput) as error:
        old.plan([ItemInput("The", [" cat"])], ScoreOptions(words=True))
    assert error.value.field == "options.words"
    assert "export it again" in str(error.value)


# Real servers against PyTorch.


@pytest.fixture(scope="module")
def client(tiny_server):
    with ScoringClient(tiny_server.address, timeout=60) as client:
        yield client


@pytest.mark.parametrize("add_bos", [None, False])
def test_tiny_model_words_equal_pytorch(client: ScoringClient, tiny_torch, add_bos) -> None:
    model, hf_tokenizer = tiny_torch
    options = ScoreOptions(words=True, prompt_words=True, add_bos=add_bos)
    results = client.score([Item(p, [c]) for p, c in PAIRS], options)
    for (prompt, completion), result in zip(PAIRS, results, strict=True):
        words, prompt_words = reference_words(
            model,
            hf_tokenizer,
            "byte-level",
            prompt,
            completion,
            None if add_bos is False else BOS_ID,
            EOS_ID,
        )
        assert_words_equal(result.words, words, TOLERANCE)
        assert_words_equal(result.prompt_words, prompt_words, TOLERANCE)


def test_server_refuses_words_on_token_ids_naming_the_field(client: ScoringClient) -> None:
    with pytest.raises(InvalidArgumentError) as error:
        client.score([Item("The", [[5, 6, 7]])], ScoreOptions(words=True))
    assert "items[0].completions[0].token_ids" in str(error.value)
    assert "options.words" in str(error.value)


@pytest.fixture(scope="module")
def metaspace_model(tmp_path_factory: pytest.TempPathFactory):
    """A tiny Llama whose tokenizer marks word starts with "▁" (SentencePiece style),
    exported through lmscore's export: (export directory, PyTorch model, HF tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmscore.export.convert import export_model

    hf_dir = save_tiny_model(
        tmp_path_factory.mktemp("metaspace-hf") / "llama",
        "LlamaConfig",
        seed=5,
        tokenizer=build_metaspace_tokenizer(),
        max_position_embeddings=96,
    )
    output = tmp_path_factory.mktemp("metaspace-onnx") / "llama"
    export_model(str(hf_dir), output, progress=False)
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    return output, model, AutoTokenizer.from_pretrained(str(hf_dir))


def test_sentencepiece_style_words_equal_pytorch(metaspace_model) -> None:
    export_dir, model, hf_tokenizer = metaspace_model
    with (
        running_server(export_dir) as server,
        ScoringClient(server.address, timeout=60) as client,
    ):
        options = ScoreOptions(words=True, prompt_words=True)
        results = client.score([Item(p, [c]) for p, c in SPACE_PAIRS], options)
    for (prompt, completion), result in zip(SPACE_PAIRS, results, strict=True):
        assert result.bos_added
        words, prompt_words = reference_words(
            model, hf_tokenizer, "sentencepiece", prompt, completion, BOS_ID, EOS_ID
        )
        assert_words_equal(result.words, words, TOLERANCE)
        assert_words_equal(result.prompt_words, prompt_words, TOLERANCE)
        # Whitespace-separated words, and an empty one for trailing whitespace.
        texts = [w.text for w in result.words]
        assert texts == result.scored_completion.split() + [""] * completion.endswith(" ")


def test_cli_prints_and_writes_words(tiny_server, tmp_path: Path) -> None:
    prompt, completion = "The old man the", " boat. Then"
    flags = ["--prompt", prompt, "--completion", completion, "--words", "--prompt-words"]
    printed = subprocess.run(
        [LMSCORE, "score", "--server", tiny_server.address, *flags, "--unit", "bits"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    with ScoringClient(tiny_server.address, timeout=60) as client:
        [result] = client.score(
            [Item(prompt, [completion])], ScoreOptions(words=True, prompt_words=True)
        )
    lines = printed.splitlines()
    start = lines.index('words of " boat. Then":')
    assert "log2 P(w|before)" in lines[start + 1]
    rows = [line.split() for line in lines[start + 2 :]]
    assert [json.loads(row[0]) for row in rows] == ["boat.", "Then"]
    for row, word in zip(rows, result.words, strict=True):
        assert (int(row[1]), int(row[2])) == (word.start, word.end)
        assert float(row[3]) == pytest.approx(word.logprob / math.log(2), abs=1e-4)
        assert float(row[4]) == pytest.approx(word.logprob_uncorrected / math.log(2), abs=1e-4)
    assert 'words of the prompt "The old man the":' in lines

    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
    output = tmp_path / "out.jsonl"
    flags = ["--input", str(source), "--output", str(output), "--words", "--unit", "bits"]
    subprocess.run(
        [LMSCORE, "score", "--server", tiny_server.address, *flags],
        capture_output=True,
        timeout=60,
        check=True,
    )
    [line] = [json.loads(x) for x in output.read_text().splitlines()]
    assert "prompt_words" not in line and "scored_prompt" not in line
    assert line["scored_completion"] == result.scored_completion
    for written, word in zip(line["words"], result.words, strict=True):
        assert written["text"] == word.text
        assert written["logprob"] == pytest.approx(word.logprob, abs=1e-9)
        assert written["logprob_bits"] == pytest.approx(word.logprob / math.log(2))
