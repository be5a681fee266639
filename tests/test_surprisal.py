"""`lmscore surprisal STIMULI` (issue 24): stimuli files read into items, conditions, contexts
and regions; bad input refused in one line; the words, regions and plot written from the
server's word scores on the tiny model, in bits and nats, resumed after a cut; and the
default model's words against minicons' own beginning-of-word correction (e2e)."""

from __future__ import annotations

import copy
import csv
import math
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_packaging import BLOCK_HEAVY, run_python

from conftest import LMSCORE, ServerProcess, running_server
from lmscore.client import Item, ScoreOptions, ScoringClient
from lmscore.client.stimuli import StimulusColumns, StimulusError, read_stimuli
from reference import _byte_level_decoder

REPOSITORY = Path(__file__).resolve().parent.parent
GARDEN_PATH_STIMULI = REPOSITORY / "docs" / "garden_path_stimuli.csv"

# Two items in two conditions, with a context column, quotes, non-ASCII and regions.
TABLE = [
    ["item", "condition", "context", "sentence"],
    ["1", "ambiguous", "", "The old | man | the boat."],
    ["1", "unambiguous", "", "The old people | man | the boat."],
    ["2", "ambiguous", "She said:", 'While "Jo" hunted | the deer | ran away.'],
    ["2", "unambiguous", "She said:\n", "While Jo hunted, | the deer | ran away."],
]


def write_table(path: Path, rows: list[list[str]], delimiter: str = ",") -> Path:
    with path.open("w", encoding="utf-8", newline="") as handle:
        csv.writer(handle, delimiter=delimiter, lineterminator="\n").writerows(rows)
    return path


def lmscore_surprisal(server: ServerProcess | None, *args: str) -> subprocess.CompletedProcess[str]:
    address = server.address if server else "127.0.0.1:9"  # never reached: bad input first
    return subprocess.run(
        [LMSCORE, "surprisal", "--server", address, *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def read_tsv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def number(cell: str) -> float | None:
    return float(cell) if cell else None


# Reading the stimuli.


def test_a_table_gives_items_conditions_contexts_and_regions(tmp_path: Path) -> None:
    stimuli = read_stimuli(write_table(tmp_path / "s.csv", TABLE))
    assert [(s.item, s.condition, s.line) for s in stimuli] == [
        ("1", "ambiguous", 2),
        ("1", "unambiguous", 3),
        ("2", "ambiguous", 4),
        ("2", "unambiguous", 5),  # its context's quoted newline spans lines 5 and 6
    ]
    assert stimuli[0].words == ("The", "old", "man", "the", "boat.")
    assert stimuli[0].regions == (1, 1, 2, 3, 3)
    assert stimuli[2].sentence == 'While "Jo" hunted the deer ran away.'
    assert stimuli[2].regions == (1, 1, 1, 2, 2, 3, 3)
    assert [s.context for s in stimuli] == ["", "", "She said:", "She said:\n"]

    # The same as TSV without an extension (told by its header), with other column names
    # and another marker; and plain text, one stimulus a line.
    renamed = [["id", "cond", "text"]] + [[r[0], r[1], r[3].replace("|", "/")] for r in TABLE[1:]]
    path = write_table(tmp_path / "stimuli", renamed, "\t")
    columns = StimulusColumns(item="id", sentence="text", condition="cond")
    again = read_stimuli(path, columns, marker="/")
    assert [(s.item, s.condition, s.words, s.regions) for s in again] == [
        (s.item, s.condition, s.words, s.regions) for s in stimuli
    ]
    assert all(s.context == "" for s in again)
    text = tmp_path / "lines.txt"
    text.write_text("The old | man the boat.\n\nThe horse raced past the barn fell.\n")
    first, second = read_stimuli(text)
    assert (first.item, first.condition, first.regions) == ("1", "", (1, 1, 2, 2, 2))
    assert (second.item, second.regions) == ("3", (1,) * 7)
    assert read_stimuli(text, marker="")[0].words[2] == "|"


BAD_INPUTS = [
    ([["item", "condition", "text"], ["1", "a", "The boat."]], [], "no column 'sentence'"),
    (
        [["item", "sentence"], ["1", "The boat."]],
        ["--context-column", "story"],
        "no column 'story'",
    ),
    ([["item", "condition", "sentence"], ["1", "a", "  |  "]], [], ":2: empty sentence"),
    ([["item", "condition", "sentence"], ["", "a", "The boat."]], [], ":2: empty item"),
    (
        [["item", "condition", "sentence"], ["1", "a", "The old | man | the boat. |"]],
        [],
        ":2: region 4 is empty",
    ),
    (
        [["item", "condition", "sentence"], ["1", "a", "The || old man"]],
        [],
        ":2: region 2 is empty",
    ),
    (
        [["item", "condition", "sentence"], ["1", "a", "The old|man the boat."]],
        [],
        ":2: region marker '|' inside the word 'old|man'",
    ),
    (
        [["item", "condition", "sentence"], ["1", "a", "The boat."], ["1", "a", "A boat."]],
        [],
        ":3: item '1' condition 'a' again (first on line 2)",
    ),
]


@pytest.mark.parametrize(("rows", "flags", "message"), BAD_INPUTS)
def test_bad_input_is_one_line_naming_it_and_exit_2(
    rows: list[list[str]], flags: list[str], message: str, tmp_path: Path
) -> None:
    source = write_table(tmp_path / "bad.csv", rows)
    with pytest.raises(StimulusError, match=re.escape(message)):
        read_stimuli(
            source,
            StimulusColumns(context="story" if flags else None),
        )
    run = lmscore_surprisal(None, str(source), *flags)
    assert run.returncode == 2
    [line] = run.stderr.splitlines()
    assert line.startswith(f"lmscore surprisal: {source}") and message in line
    assert not (tmp_path / "bad.surprisal.tsv").exists()


def test_the_command_imports_without_matplotlib_numpy_or_torch() -> None:
    blocked = {"matplotlib", "numpy", "torch", "onnxruntime", "transformers", "minicons"}
    code = BLOCK_HEAVY.format(BLOCKED=blocked) + (
        "import lmscore.cli, lmscore.client.surprisal\n"
        "lmscore.cli.build_parser().parse_args(['surprisal', 'stimuli.csv'])\n"
        "print('ok')\n"
    )
    result = run_python(code)
    assert result.stdout.strip() == "ok", result.stderr


# Against a server with the tiny model.


@pytest.fixture(scope="module")
def client(tiny_server: ServerProcess) -> Iterator[ScoringClient]:
    with ScoringClient(tiny_server.address, timeout=60) as client:
        yield client


def test_words_regions_and_plot_are_the_servers_word_scores(
    tiny_server: ServerProcess, client: ScoringClient, tmp_path: Path
) -> None:
    source = write_table(tmp_path / "stimuli.csv", TABLE)
    run = lmscore_surprisal(tiny_server, str(source), "--units", "nats", "--no-entropy")
    assert run.returncode == 0, run.stderr
    words_path = tmp_path / "stimuli.surprisal.tsv"
    rows = read_tsv(words_path)
    stimuli = read_stimuli(source)
    # The sentence is scored as the completion of its context (a space between them unless
    # the context ends with whitespace), words asked.
    items = [
        Item(s.context or None, [(" " if s.context[-1:] == ":" else "") + s.sentence])
        for s in stimuli
    ]
    results = client.score(items, ScoreOptions(words=True))
    expected = [
        (s.item, s.condition, str(region), str(index), word.text, -word.logprob, -uncorrected)
        for s, result in zip(stimuli, results, strict=True)
        for index, (word, region, uncorrected) in enumerate(
            zip(
                result.words,
                s.regions,
                [w.logprob_uncorrected for w in result.words],
                strict=True,
            ),
            1,
        )
    ]
    assert len(rows) == len(expected) == sum(len(s.words) for s in stimuli)
    for row, want in zip(rows, expected, strict=True):
        assert [row[k] for k in ("item", "condition", "region", "word_index", "word")] == [
            *want[:5]
        ]
        assert float(row["surprisal_nats"]) == pytest.approx(want[5], abs=1e-5)
        assert float(row["surprisal_uncorrected_nats"]) == pytest.approx(want[6], abs=1e-5)
        assert row["entropy_nats"] == ""  # --no-entropy

    # The region table: the sums of its words, one row per item, condition and region.
    regions = read_tsv(tmp_path / "stimuli.surprisal.regions.tsv")
    keys = list(dict.fromkeys((r["item"], r["condition"], r["region"]) for r in rows))
    assert [(r["item"], r["condition"], r["region"]) for r in regions] == keys
    for region in regions:
        mine = [
            r
            for r in rows
            if (r["item"], r["condition"], r["region"])
            == tuple(region[k] for k in ("item", "condition", "region"))
        ]
        assert region["text"] == " ".join(r["word"] for r in mine)
        assert int(region["words"]) == len(mine)
        assert float(region["surprisal_nats"]) == pytest.approx(
            sum(float(r["surprisal_nats"]) for r in mine), abs=1e-5
        )
    assert (tmp_path / "stimuli.surprisal.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Bits: the same words, every number divided by ln 2.
    bits_path = tmp_path / "bits.tsv"
    run = lmscore_surprisal(tiny_server, str(source), "-o", str(bits_path), "--no-plot")
    assert run.returncode == 0, run.stderr
    bits = read_tsv(bits_path)
    for row, nats in zip(bits, rows, strict=True):
        assert float(row["surprisal_bits"]) == pytest.approx(
            float(nats["surprisal_nats"]) / math.log(2), abs=1e-5
        )
    assert (tmp_path / "bits.regions.tsv").exists() and not (tmp_path / "bits.png").exists()


def test_without_bos_or_context_the_first_word_has_no_surprisal(
    tiny_server: ServerProcess, client: ScoringClient, tmp_path: Path
) -> None:
    source = tmp_path / "lines.txt"
    source.write_text("The old | man the boat.\nThe horse | raced past the barn fell.\n")
    output = tmp_path / "out.tsv"
    run = lmscore_surprisal(tiny_server, str(source), "-o", str(output), "--no-bos")
    assert run.returncode == 0, run.stderr
    rows = read_tsv(output)
    assert [r["item"] for r in rows] == ["1"] * 5 + ["2"] * 7
    assert {r["condition"] for r in rows} == {""}
    firsts = [r for r in rows if r["word_index"] == "1"]
    assert [r["surprisal_bits"] for r in firsts] == ["", ""]
    assert all(r["surprisal_bits"] for r in rows if r["word_index"] != "1")
    regions = read_tsv(tmp_path / "out.regions.tsv")
    assert [r["surprisal_bits"] == "" for r in regions] == [True, False, True, False]
    # The tiny model's tokenizer adds BOS: by default the first word has a score.
    run = lmscore_surprisal(tiny_server, str(source), "-o", str(output))
    assert all(r["surprisal_bits"] for r in read_tsv(output))


def test_resume_keeps_the_whole_stimuli_and_scores_the_rest(
    tiny_server: ServerProcess, tmp_path: Path
) -> None:
    lines = [
        " ".join(["The old man", "the boat", "ran past", "the barn"][: 1 + i % 4]) + f" {i}."
        for i in range(30)
    ]
    source = tmp_path / "many.txt"
    source.write_text("\n".join(lines) + "\n")
    output = tmp_path / "many.tsv"
    flags = [str(source), "-o", str(output), "--items-per-request", "4", "--no-plot"]
    run = lmscore_surprisal(tiny_server, *flags)
    assert run.returncode == 0, run.stderr
    full = output.read_bytes()
    regions = (tmp_path / "many.regions.tsv").read_bytes()
    rows = full.splitlines(keepends=True)

    # A killed run: 11 stimuli whole, the 12th cut after one of its words, a torn line.
    header, *body = rows
    kept = [r for r in body if int(r.split(b"\t")[0]) <= 11]
    twelfth = [r for r in body if r.split(b"\t")[0] == b"12"]
    output.write_bytes(header + b"".join(kept) + twelfth[0] + twelfth[1][:7])
    (tmp_path / "many.regions.tsv").unlink()
    run = lmscore_surprisal(tiny_server, *flags, "--resume")
    assert run.returncode == 0, run.stderr
    assert "(11 already in" in run.stderr
    resumed = read_tsv(output)
    assert [(r["item"], r["word_index"]) for r in resumed] == [
        (r["item"], r["word_index"]) for r in read_tsv_bytes(full)
    ]
    for row, want in zip(resumed, read_tsv_bytes(full), strict=True):
        assert number(row["surprisal_bits"]) == pytest.approx(
            number(want["surprisal_bits"]), abs=1e-4
        )
    assert (tmp_path / "many.regions.tsv").read_bytes().count(b"\n") == regions.count(b"\n")

    # Another input, or other units, is not resumed into this output.
    other = tmp_path / "other.txt"
    other.write_text("A different sentence.\n")
    run = lmscore_surprisal(tiny_server, str(other), "-o", str(output), "--resume")
    assert run.returncode == 2
    assert "is this the output of another input?" in run.stderr
    run = lmscore_surprisal(tiny_server, *flags, "--resume", "--units", "nats")
    assert run.returncode == 2 and "not the header this run writes" in run.stderr
    assert len(read_tsv(output)) == len(resumed)  # left as it was


def test_a_stimulus_the_server_refuses_stops_the_run_naming_its_line(
    tiny_server: ServerProcess, tmp_path: Path
) -> None:
    source = tmp_path / "long.txt"
    too_long = " ".join(["word"] * 200)  # over the tiny model's 96-token context
    source.write_text(f"The old man the boat.\nThe horse fell.\n{too_long}\nThe end.\n")
    output = tmp_path / "long.tsv"
    run = lmscore_surprisal(tiny_server, str(source), "-o", str(output), "--items-per-request", "2")
    assert run.returncode == 1
    [line] = [line for line in run.stderr.splitlines() if "warning" not in line]
    assert line.startswith(f"lmscore surprisal: {source}: line 3 (item '3'): INVALID_ARGUMENT")
    assert line.endswith(f"rerun with --resume to go on after the stimuli {output} holds")
    assert {row["item"] for row in read_tsv(output)} == {"1", "2"}  # the request before it


def read_tsv_bytes(data: bytes) -> list[dict[str, str]]:
    return list(csv.DictReader(data.decode("utf-8").splitlines(), delimiter="\t"))


def test_entropy_is_the_servers_entropy_before_each_word(
    tiny_server: ServerProcess, client: ScoringClient, tmp_path: Path
) -> None:
    source = write_table(tmp_path / "stimuli.csv", TABLE)
    run = lmscore_surprisal(tiny_server, str(source), "--no-plot")
    assert run.returncode == 0, run.stderr
    assert "warning" not in run.stderr
    rows = read_tsv(tmp_path / "stimuli.surprisal.tsv")
    stimuli = read_stimuli(source)
    items = [
        Item(s.context or None, [(" " if s.context[-1:] == ":" else "") + s.sentence])
        for s in stimuli
    ]
    results = client.score(items, ScoreOptions(words=True, entropy=True))
    entropies = [w.entropy for result in results for w in result.words]
    assert len(rows) == len(entropies) and all(e is not None for e in entropies)
    for row, entropy in zip(rows, entropies, strict=True):
        assert float(row["entropy_bits"]) == pytest.approx(entropy / math.log(2), abs=1e-5)
    regions = read_tsv(tmp_path / "stimuli.surprisal.regions.tsv")
    first_words: dict[tuple[str, str, str], dict[str, str]] = {}
    for row in rows:
        first_words.setdefault((row["item"], row["condition"], row["region"]), row)
    assert len(regions) == len(first_words) == 3 * len(stimuli)
    for region in regions:
        first = first_words[(region["item"], region["condition"], region["region"])]
        assert region["entropy_before_bits"] == first["entropy_bits"]


# The default model against minicons (e2e).


@pytest.mark.e2e
def test_default_model_words_equal_minicons_given_the_same_word_starts(
    exported_default: Path, torch_default, tmp_path: Path
) -> None:
    """minicons' IncrementalLMScorer.word_score_tokenized(bow_correction=True, bos_token=True)
    on the same weights in PyTorch, its word-start set replaced by lmscore's (the export's
    word_starts.npy), against `lmscore surprisal --bos` on the garden-path stimuli: every word
    within 1e-4 nats. BOS on both sides: minicons prepends the tokenizer's BOS text
    (<|im_start|>), lmscore --bos its BOS id; without BOS minicons' spans start a token late.
    Stock minicons (only Ġ tokens begin a word) differs where a newline or EOS is likely."""
    import numpy as np
    from minicons.scorer import IncrementalLMScorer

    model, tokenizer = torch_default
    output = tmp_path / "words.tsv"
    with running_server("default") as server:
        flags = [str(GARDEN_PATH_STIMULI), "-o", str(output), "--bos", "--units", "nats"]
        run = lmscore_surprisal(server, *flags, "--no-plot", "--no-entropy")
    assert run.returncode == 0, run.stderr
    rows = read_tsv(output)
    stimuli = read_stimuli(GARDEN_PATH_STIMULI)

    scorer = IncrementalLMScorer(model, tokenizer=copy.deepcopy(tokenizer))
    stock_starts = set(scorer.bow_subword_idx)
    word_starts = np.load(exported_default / "word_starts.npy")
    sentences = [s.sentence for s in stimuli]

    def minicons_logprobs() -> list[float]:
        scored = scorer.word_score_tokenized(
            sentences, str.split, bow_correction=True, bos_token=True
        )
        assert [w for sentence in scored for w, _ in sentence] == [r["word"] for r in rows]
        return [float(logprob) for sentence in scored for _, logprob in sentence]

    stock = minicons_logprobs()
    scorer.bow_subwords = {i: bool(starts) for i, starts in enumerate(word_starts)}
    scorer.bow_subword_idx = np.flatnonzero(word_starts).tolist()
    same = minicons_logprobs()
    ours = [-float(r["surprisal_nats"]) for r in rows]
    assert max(abs(a - b) for a, b in zip(ours, same, strict=True)) < 1e-4

    # The two sets: lmscore's holds minicons' and adds EOS and the tokens that begin with
    # whitespace other than a space; stock minicons moves words by tenths of a nat here.
    extra = set(np.flatnonzero(word_starts).tolist()) - stock_starts
    assert stock_starts <= set(np.flatnonzero(word_starts).tolist())
    assert tokenizer.eos_token_id in extra
    pieces = tokenizer.convert_ids_to_tokens(sorted(extra - {tokenizer.eos_token_id}))
    byte_of = _byte_level_decoder()
    texts = [bytes(byte_of[c] for c in piece).decode("utf-8", "replace") for piece in pieces]
    starts = {text[0] for text in texts}
    assert {"\n", "\t", "\xa0"} <= starts  # newline, tab, no-break space
    assert all(c.isspace() and c != " " for c in starts), starts
    moved = [abs(a - b) for a, b in zip(ours, stock, strict=True)]
    assert 0.01 < max(moved) < 0.5
