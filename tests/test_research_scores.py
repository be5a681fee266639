"""Normalized scores, PMI, token offsets and bits (issue 13, docs/research.md).

The pure rules on hand-built numbers, the engine with a fake causal model, then a real
server with the tiny model against PyTorch (tests/reference.py) and the CLI's bits.
The default model's checks are in tests/test_e2e_default_model.py.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from test_engine import VOCAB, FakeCausalModel

from conftest import LMSCORE, ServerProcess
from lmscore.client import InvalidArgumentError, Item, ScoreOptions, ScoringClient
from lmscore.server.config import EngineSettings
from lmscore.server.engine import ScoringEngine
from lmscore.server.requests import InvalidInput, ItemInput, ModelFacts
from lmscore.server.scoring import (
    PositionScores,
    SequenceLayout,
    normalize,
    sum_unconditional,
)
from lmscore.server.tokenization import TextTokenizer
from lmscore.v1.results import ScoreResult, Segment
from reference import reference_score, sequence_logprobs
from tiny_model import build_tokenizer

TOLERANCE = 1e-4
BOS = 1
# Accents, an emoji (four UTF-8 bytes: byte-level BPE splits it), CJK, and plain ASCII.
NON_ASCII = ("Le café coûte 3 €, dit le robot 🤖 ", "à 中文 readers.")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> TextTokenizer:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    build_tokenizer().backend_tokenizer.save(str(path))
    return TextTokenizer(path)


def engine(
    tokenizer: TextTokenizer, bos: int | None = BOS, eos: int | None = 2, **settings
) -> ScoringEngine:
    return ScoringEngine(
        FakeCausalModel(),
        tokenizer,
        ModelFacts(max_context=256, vocab_size=VOCAB, bos_token_id=bos, eos_token_id=eos),
        EngineSettings(**settings),
    )


def check_offsets(result: ScoreResult) -> None:
    """Every text token's span, sliced from its segment's scored text, is the token's own
    text (a token holding some bytes of a character decodes them to U+FFFD and spans the
    whole character); the spans cover each text in order, without gaps."""
    texts = {Segment.PROMPT: result.scored_prompt, Segment.COMPLETION: result.scored_completion}
    covered = {Segment.PROMPT: 0, Segment.COMPLETION: 0}
    for token in result.tokens:
        if token.segment is Segment.BOS:
            assert (token.start, token.end) == (None, None)
            continue
        text = texts[token.segment]
        assert token.start is not None and token.end is not None
        assert 0 <= token.start < token.end <= len(text)
        piece = text[token.start : token.end]
        # Each run of U+FFFD (bytes of a character split between tokens) is that character.
        pattern = "[^\x00-\x7f]".join(re.escape(p) for p in re.split("\ufffd+", token.text))
        assert re.fullmatch(pattern, piece), (token, piece)
        assert token.start <= covered[token.segment]  # no gap
        covered[token.segment] = max(covered[token.segment], token.end)
    for segment, text in texts.items():
        if any(t.segment is segment for t in result.tokens):
            assert covered[segment] == len(text)


# The rules on hand-built numbers.


def test_normalized_scores_divide_by_scored_tokens_characters_and_bytes() -> None:
    layout = SequenceLayout(bos=True, prompt_len=3, completion_len=4)
    got = normalize(layout, -6.0, "é🤖ab")  # 4 code points, 2 + 4 + 1 + 1 bytes
    assert (got.per_token, got.per_char, got.per_byte) == (-1.5, -1.5, -0.75)
    # Token ids: no text to count characters or bytes of.
    assert normalize(layout, -6.0, None).per_char is None
    # Empty completion: nothing to divide by, nothing invented (lm-eval's numpy gives NaN).
    empty = normalize(SequenceLayout(True, 3, 0), 0.0, "")
    assert (empty.per_token, empty.per_char, empty.per_byte) == (None, None, None)
    # No BOS, no prompt: the first completion token is not scored, so not counted.
    assert normalize(SequenceLayout(False, 0, 3), -4.0, "abc").per_token == -2.0
    assert normalize(SequenceLayout(False, 0, 1), 0.0, "a").per_token is None


def test_unconditional_sum_leaves_out_what_the_conditional_left_out() -> None:
    scores = PositionScores(
        np.array([-1.0, -2.0, -4.0], np.float32),
        np.ones(3, np.int64),
        np.zeros((3, 0), np.int64),
        np.zeros((3, 0), np.float32),
    )
    assert sum_unconditional(SequenceLayout(True, 2, 3), scores) == -7.0
    assert sum_unconditional(SequenceLayout(False, 0, 3), scores) == -6.0
    with pytest.raises(ValueError):
        sum_unconditional(SequenceLayout(True, 2, 4), scores)


# The engine with a fake causal model.


def test_pmi_is_batched_with_the_conditional_and_equals_a_pass_after_the_prefix_token(
    tokenizer: TextTokenizer,
) -> None:
    scorer = engine(tokenizer)
    items = [ItemInput("The licensee", [" may copy", " shall not", ""]), ItemInput([5, 6], [[7]])]
    plan = scorer.plan(items, ScoreOptions(pmi=True))
    results = scorer.score_sync(plan)
    # One model run for the whole plan, unconditional sequences included.
    assert len(scorer.model.calls) == 1
    for result in results:
        item = items[result.item_index]
        completion = item.completions[result.completion_index]
        ids = (
            completion
            if isinstance(completion, list)
            else tokenizer.encode_pair(item.prompt, completion).completion_ids
        )
        alone = scorer.score_sync(scorer.plan([ItemInput([], [list(ids)])], ScoreOptions()))[0]
        assert result.unconditional_logprob == pytest.approx(alone.conditional_logprob, abs=1e-6)
        assert result.pmi == pytest.approx(
            result.conditional_logprob - result.unconditional_logprob, abs=1e-9
        )
    # Without the option the fields stay unset.
    plain = scorer.score_sync(scorer.plan(items, ScoreOptions()))
    assert all(r.pmi is None and r.unconditional_logprob is None for r in plain)
    assert [r.conditional_logprob for r in plain] == [r.conditional_logprob for r in results]


def test_pmi_uses_eos_without_bos_and_is_refused_without_either(tokenizer: TextTokenizer) -> None:
    no_bos = engine(tokenizer, bos=None, eos=2)
    plan = no_bos.plan([ItemInput("A", ["bc"])], ScoreOptions(pmi=True))
    unconditional = plan.sequences[plan.completions[0].unconditional]
    assert unconditional[0] == 2
    with pytest.raises(InvalidInput) as error:
        engine(tokenizer, bos=None, eos=None).plan([ItemInput("A", ["b"])], ScoreOptions(pmi=True))
    assert error.value.field == "options.pmi"


def test_offsets_index_the_scored_texts_in_code_points(tokenizer: TextTokenizer) -> None:
    scorer = engine(tokenizer)
    items = [
        ItemInput(NON_ASCII[0], [NON_ASCII[1]]),
        ItemInput("the", ["re"]),  # a token merges across the boundary: encode(y) alone
        ItemInput("", ["🤖🤖 é"]),
    ]
    results = scorer.score_sync(scorer.plan(items, ScoreOptions(token_details=True)))
    for result in results:
        check_offsets(result)
    assert results[0].conditional_logprob_per_char == pytest.approx(
        results[0].conditional_logprob / len(results[0].scored_completion)
    )
    assert results[0].conditional_logprob_per_byte == pytest.approx(
        results[0].conditional_logprob / len(results[0].scored_completion.encode())
    )


def test_offsets_of_a_truncated_prompt_still_index_its_text(tokenizer: TextTokenizer) -> None:
    scorer = ScoringEngine(
        FakeCausalModel(),
        tokenizer,
        ModelFacts(max_context=12, vocab_size=VOCAB, bos_token_id=BOS),
    )
    options = ScoreOptions(token_details=True, truncate_prompt_left=True)
    [result] = scorer.score_sync(
        scorer.plan([ItemInput("one two three four five", [" six"])], options)
    )
    assert result.truncated_prompt_tokens > 0
    first = result.tokens[1]
    assert first.segment is Segment.PROMPT and first.start > 0
    assert result.scored_prompt[first.start : first.end] == first.text


def test_token_ids_have_no_offsets_nor_characters(tokenizer: TextTokenizer) -> None:
    scorer = engine(tokenizer)
    items = [ItemInput([5, 6, 7], [[8, 9], "text"]), ItemInput("Warranty", [[10]])]
    results = scorer.score_sync(scorer.plan(items, ScoreOptions(token_details=True, pmi=True)))
    by_ids, by_text, text_prompt = results
    assert by_ids.conditional_logprob_per_char is None
    assert by_ids.conditional_logprob_per_byte is None
    assert by_ids.conditional_logprob_per_token == pytest.approx(by_ids.conditional_logprob / 2)
    assert all(t.start is None and t.end is None for t in by_ids.tokens)
    assert by_ids.pmi is not None  # ids are enough for PMI
    # A text completion after an id prompt: the completion has offsets, the prompt none.
    assert [t.start is None for t in by_text.tokens] == [True] * 4 + [False] * (
        by_text.completion_tokens
    )
    assert by_text.conditional_logprob_per_char == pytest.approx(
        by_text.conditional_logprob / len("text")
    )
    assert text_prompt.tokens[-1].start is None and text_prompt.tokens[1].start == 0


# A real server with the tiny model, against PyTorch.


@pytest.fixture(scope="module")
def client(tiny_server: ServerProcess):
    with ScoringClient(tiny_server.address, timeout=60) as client:
        yield client


PAIRS = [
    ("This License applies to any program ", "or other work"),
    ("the", "re"),  # a token merges across the boundary
    NON_ASCII,
    ("", "Everyone is permitted to copy"),  # empty prompt
    ("Free ", ""),  # the completion is only the moved whitespace
    ("Free", ""),  # empty completion
]


@pytest.mark.parametrize("add_bos", [None, False])
def test_pmi_and_normalized_scores_equal_pytorch(
    client: ScoringClient, tiny_torch, add_bos: bool | None
) -> None:
    model, hf_tokenizer = tiny_torch
    options = ScoreOptions(pmi=True, token_details=True, add_bos=add_bos)
    results = client.score([Item(p, [c]) for p, c in PAIRS], options)
    for (prompt, completion), result in zip(PAIRS, results, strict=True):
        expected = reference_score(
            model, hf_tokenizer, prompt, completion, None if add_bos is False else BOS
        )
        assert result.conditional_logprob == pytest.approx(expected.conditional, abs=TOLERANCE)
        # log P(y | prefix token): the same completion tokens after BOS alone; a first token
        # the conditional could not score (no BOS, no prompt) is left out of both.
        after_prefix, _, _ = sequence_logprobs(model, [BOS, *expected.completion_ids])
        skip = int(add_bos is False and not expected.prompt_ids and bool(expected.completion_ids))
        unconditional = float(np.sum(after_prefix[skip:]))
        assert result.unconditional_logprob == pytest.approx(unconditional, abs=TOLERANCE)
        assert result.pmi == pytest.approx(expected.conditional - unconditional, abs=TOLERANCE)
        scored = len(expected.completion_ids) - skip
        text = result.scored_completion
        for value, count in (
            (result.conditional_logprob_per_token, scored),
            (result.conditional_logprob_per_char, len(text)),
            (result.conditional_logprob_per_byte, len(text.encode("utf-8"))),
        ):
            if count:
                assert value == pytest.approx(expected.conditional / count, abs=TOLERANCE)
            else:
                assert value is None
        check_offsets(result)


def test_pmi_on_token_ids_equals_text(client: ScoringClient, tiny_torch) -> None:
    _, hf_tokenizer = tiny_torch
    prompt, completion = PAIRS[0]
    [by_text] = client.score([Item(prompt, [completion])], ScoreOptions(pmi=True))
    ids = hf_tokenizer(by_text.scored_completion, add_special_tokens=False)["input_ids"]
    prompt_ids = hf_tokenizer(by_text.scored_prompt, add_special_tokens=False)["input_ids"]
    [by_ids] = client.score([Item(prompt_ids, [ids])], ScoreOptions(pmi=True))
    assert by_ids.pmi == pytest.approx(by_text.pmi, abs=TOLERANCE)
    assert by_ids.conditional_logprob_per_char is None
    assert by_ids.scored_completion == ""


def test_top_k_still_refused_naming_the_field_with_pmi(client: ScoringClient) -> None:
    with pytest.raises(InvalidArgumentError) as error:
        client.score([Item("a", ["b"])], ScoreOptions(pmi=True, token_details=True, top_k=-1))
    assert "options.top_k" in error.value.field_violations


def test_cli_prints_and_writes_bits(tiny_server: ServerProcess, tmp_path: Path) -> None:
    prompt, completion = NON_ASCII
    flags = ["--prompt", prompt, "--completion", completion, "--pmi", "--unit", "bits"]
    table = subprocess.run(
        [LMSCORE, "score", "--server", tiny_server.address, *flags],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    with ScoringClient(tiny_server.address, timeout=60) as client:
        [result] = client.score([Item(prompt, [completion])], ScoreOptions(pmi=True))
    header, row = table.splitlines()[1:3]
    assert "log2 P(y|x)" in header and "PMI (bits)" in header
    numbers = row.rsplit('"', 1)[1].split()
    assert float(numbers[0]) == pytest.approx(result.conditional_logprob / math.log(2), abs=1e-4)
    assert float(numbers[3]) == pytest.approx(result.pmi / math.log(2), abs=1e-4)

    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
    output = tmp_path / "out.jsonl"
    flags = ["--input", str(source), "--output", str(output), "--pmi", "--unit", "bits"]
    subprocess.run(
        [LMSCORE, "score", "--server", tiny_server.address, *flags, "--token-details"],
        capture_output=True,
        timeout=60,
        check=True,
    )
    [line] = [json.loads(x) for x in output.read_text().splitlines()]
    assert line["scored_completion"] == result.scored_completion
    for name in (
        "joint_logprob",
        "marginal_logprob",
        "conditional_logprob",
        "conditional_logprob_per_token",
        "conditional_logprob_per_char",
        "conditional_logprob_per_byte",
        "unconditional_logprob",
        "pmi",
    ):
        assert line[name] == pytest.approx(getattr(result, name), abs=1e-9)
        assert line[f"{name}_bits"] == pytest.approx(line[name] / math.log(2), rel=1e-12)
    for token in line["tokens"]:
        if token["logprob"] is None:
            assert token["logprob_bits"] is None
        else:
            assert token["logprob_bits"] == pytest.approx(token["logprob"] / math.log(2))
        assert {"start", "end"} <= set(token)
