"""`lmscore surprisal STIMULI`: per-word surprisal of a stimuli file (lmscore.client.stimuli)
on a server, beginning-of-word corrected (docs/research.md), for psycholinguistics.

Writes three files: a TSV with one row per word (surprisal, its uncorrected sum, the
entropy before the word), a TSV with one row per region (lmscore.client.surprisal_regions)
and a PNG of the mean surprisal per region by condition. Resumable: with --resume the words
of the stimuli already in the output are kept and scoring goes on after them.
Needs only the client install; the plot needs matplotlib (lmscore[research])."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import math
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

from lmscore.client.cli import add_connection_arguments, connection, positive_int
from lmscore.client.errors import InvalidArgumentError, ScoringError
from lmscore.client.stimuli import (
    FORMATS,
    Stimulus,
    StimulusColumns,
    StimulusError,
    read_stimuli,
)
from lmscore.client.surprisal_regions import region_rows, write_plot, write_regions
from lmscore.client.sync import ScoringClient
from lmscore.client.types import Item, ScoreOptions
from lmscore.v1.results import ScoreResult

UNITS = ("bits", "nats")
# Stimuli per Score request: the server batches them together.
DEFAULT_ITEMS_PER_REQUEST = 32
# The option that asks for Word.entropy, which a server without it refuses naming.
ENTROPY_FIELD = "options.entropy"

EPILOG = """\
input:
  A CSV or TSV table (by its extension, .csv .tsv .txt, or else by a first line that names
  the sentence column) with a header row: item, sentence, and optionally condition and
  context (names set by --*-column). The context is the discourse before the sentence,
  scored as the prompt: the sentence's words are scored given it (joined by a space
  unless it ends with whitespace). Or plain text, one sentence a line (item: the line
  number, no condition). Region markers (--region-marker, default "|") cut a sentence
  into regions numbered from 1; they are removed and the words joined by single spaces
  before scoring. A missing column, an empty item, sentence or region, a marker inside a
  word, or an (item, condition) given twice: one line naming it, exit 2.
output (TSV, UTF-8):
  OUTPUT: item, condition, region, word_index (from 1), word, surprisal_UNITS
  (beginning-of-word corrected), surprisal_uncorrected_UNITS (its tokens' sum),
  entropy_UNITS (the next-token entropy before the word, at its first token). Empty
  cells where there is no number: the first word of a sentence with no context and no
  BOS (nothing before it), or entropy from a server that does not compute it.
  OUTPUT's name with .regions.tsv for its extension: one row per item, condition and region: its
  words, its text, the sums of both surprisals (empty when a word has none) and the
  entropy before its first word. OUTPUT.png: the mean region surprisal by condition,
  error bars one standard error over items (needs matplotlib; --no-plot skips it).
  Rows are written a stimulus at a time; --resume keeps the stimuli an earlier run of
  the same input wrote whole, cuts a torn one, and scores the rest.
"""


@dataclasses.dataclass(frozen=True)
class SurprisalSettings:
    """How the stimuli are scored and written: built once from the flags."""

    options: ScoreOptions
    units: str  # "bits" or "nats"
    items_per_request: int
    timeout: float | None

    @property
    def header(self) -> list[str]:
        u = self.units
        return [
            "item",
            "condition",
            "region",
            "word_index",
            "word",
            f"surprisal_{u}",
            f"surprisal_uncorrected_{u}",
            f"entropy_{u}",
        ]

    def value(self, nats: float | None, negate: bool) -> str:
        """A cell: `nats` (negated for a surprisal) in the run's units; "" for None."""
        if nats is None:
            return ""
        value = -nats if negate else nats
        if self.units == "bits":
            value /= math.log(2)
        return f"{value:.6f}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("stimuli", type=Path, help="CSV, TSV or plain-text stimuli file")
    add_connection_arguments(parser)
    parser.add_argument(
        "--output",
        "-o",
        type=Path,
        help="the words TSV (default: STIMULI with .surprisal.tsv for its extension)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the stimuli --output already holds whole and score only the rest",
    )
    parser.add_argument("--format", choices=FORMATS, default="auto", help="the input's format")
    parser.add_argument("--item-column", default="item", metavar="NAME")
    parser.add_argument("--condition-column", metavar="NAME", help="(default: condition, if any)")
    parser.add_argument("--sentence-column", default="sentence", metavar="NAME")
    parser.add_argument("--context-column", metavar="NAME", help="(default: context, if any)")
    parser.add_argument(
        "--region-marker",
        default="|",
        metavar="TEXT",
        help='cuts a sentence into regions (default: "%(default)s"; "" for one region)',
    )
    parser.add_argument(
        "--units",
        "--unit",
        choices=UNITS,
        default="bits",
        help="of surprisal and entropy (default: %(default)s)",
    )
    parser.add_argument(
        "--bos",
        dest="add_bos",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="prepend the BOS token, or not (default: as the model's tokenizer does); "
        "without BOS or context a sentence's first word has no surprisal",
    )
    parser.add_argument(
        "--no-entropy", action="store_true", help="leave the entropy column empty (not asked)"
    )
    parser.add_argument("--no-plot", action="store_true", help="write no PNG")
    parser.add_argument(
        "--items-per-request",
        type=positive_int,
        default=DEFAULT_ITEMS_PER_REQUEST,
        metavar="N",
        help="stimuli sent per request (default: %(default)s)",
    )


def word_rows(
    stimulus: Stimulus, result: ScoreResult, settings: SurprisalSettings
) -> list[list[str]]:
    """The output rows of one stimulus's words. StimulusError when the server's words are
    not the sentence's (a control token written in the text splits a word)."""
    words = [w for w in result.words if w.text]  # a trailing "" word only after whitespace
    if tuple(w.text for w in words) != stimulus.words:
        raise StimulusError(
            f"line {stimulus.line}: the server's words {[w.text for w in words]} are not the "
            f"sentence's {list(stimulus.words)}"
        )
    return [
        [
            stimulus.item,
            stimulus.condition,
            str(region),
            str(index),
            word.text,
            settings.value(word.logprob, negate=True),
            settings.value(word.logprob_uncorrected, negate=True),
            settings.value(word.entropy, negate=False),  # nats, at the word's first token
        ]
        for index, (word, region) in enumerate(zip(words, stimulus.regions, strict=True), 1)
    ]


def _item(stimulus: Stimulus) -> Item:
    """The sentence as the completion of its context: joined by a space unless the context
    ends with whitespace (which the server's rule moves into the completion)."""
    if not stimulus.context:
        return Item(None, [stimulus.sentence])
    space = "" if stimulus.context[-1].isspace() else " "
    return Item(stimulus.context, [space + stimulus.sentence])


def _tsv(rows: Sequence[Sequence[str]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, delimiter="\t", lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def _parse_row(line: str) -> list[str]:
    return next(csv.reader([line], delimiter="\t"))


class _Scorer:
    """Scores chunks of stimuli; stops asking for entropy, with one warning, when the
    server refuses it."""

    def __init__(self, client: ScoringClient, settings: SurprisalSettings) -> None:
        self.client = client
        self.settings = settings

    def score(self, chunk: Sequence[Stimulus]) -> list[ScoreResult]:
        options = self.settings.options
        try:
            return self.client.score(
                [_item(s) for s in chunk], options, timeout=self.settings.timeout
            )
        except InvalidArgumentError as exc:
            if not options.entropy or ENTROPY_FIELD not in exc.field_violations:
                raise _named(exc, chunk) from None
            _warn(
                f"the server gives no entropy ({exc.field_violations[ENTROPY_FIELD]}); "
                "the entropy column stays empty"
            )
            self.settings = dataclasses.replace(
                self.settings, options=dataclasses.replace(options, entropy=False)
            )
            return self.score(chunk)


def _named(exc: ScoringError, chunk: Sequence[Stimulus]) -> ScoringError:
    """`exc`, its message led by the input line of the first stimulus it names (items[i])."""
    field = next((f for f in exc.field_violations if f.startswith("items[")), None)
    if field is not None:
        stimulus = chunk[int(field[len("items[") :].split("]", 1)[0])]
        exc.args = (f"line {stimulus.line} (item {stimulus.item!r}): {exc}",)
    return exc


def _warn(message: str) -> None:
    tqdm.write(f"lmscore surprisal: warning: {message}", file=sys.stderr)


def _chunks(stimuli: Sequence[Stimulus], size: int) -> Iterator[Sequence[Stimulus]]:
    for start in range(0, len(stimuli), size):
        yield stimuli[start : start + size]


def score_stimuli(
    client: ScoringClient, stimuli: Sequence[Stimulus], out: TextIO, settings: SurprisalSettings
) -> None:
    """Score `stimuli` and write their rows to `out`, a request of `items_per_request` at a
    time, flushed after each. ScoringError (its message naming the stimulus's line when the
    server named one) or StimulusError stops the run after the rows written."""
    scorer = _Scorer(client, settings)
    entropy_seen = False
    with tqdm(total=len(stimuli), desc="surprisal", unit="stimulus", disable=None) as bar:
        for chunk in _chunks(stimuli, settings.items_per_request):
            results = scorer.score(chunk)
            rows = [
                row
                for stimulus, result in zip(chunk, results, strict=True)
                for row in word_rows(stimulus, result, settings)
            ]
            entropy_seen = entropy_seen or any(row[-1] for row in rows)  # its last column
            out.write(_tsv(rows))
            out.flush()
            bar.update(len(chunk))
    if scorer.settings.options.entropy and not entropy_seen:
        _warn("the server returned no entropy (an older server?); the entropy column is empty")


def completed_stimuli(path: Path, stimuli: Sequence[Stimulus], header: Sequence[str]) -> int:
    """For --resume: how many of `stimuli`, from the first, an earlier run's `path` holds
    whole. Rows after them (a stimulus cut short by a killed run, a torn last line) are cut
    off the file. StimulusError when the file's header or rows are not this run's."""
    data = path.read_bytes() if path.exists() else b""
    lines = data.splitlines(keepends=True)
    if not lines:
        return 0
    if lines[0].decode("utf-8", "replace").rstrip("\r\n").split("\t") != list(header):
        raise StimulusError(
            f"{path}:1: not the header this run writes ({' '.join(header)}); another --units, "
            "or not an output of lmscore surprisal?"
        )
    kept = len(lines[0])  # bytes of the whole stimuli so far
    number = 1  # lines read
    done = 0
    for stimulus in stimuli:
        expected = [
            [stimulus.item, stimulus.condition, str(region), str(index), word]
            for index, (word, region) in enumerate(
                zip(stimulus.words, stimulus.regions, strict=True), 1
            )
        ]
        group = lines[number : number + len(expected)]
        whole = [line for line in group if line.endswith(b"\n")]
        for offset, (line, want) in enumerate(zip(whole, expected, strict=False)):
            if _parse_row(line.decode("utf-8"))[:5] != want:
                raise StimulusError(
                    f"{path}:{number + offset + 1}: not the row of word {want[3]} of item "
                    f"{stimulus.item!r} condition {stimulus.condition!r} (line "
                    f"{stimulus.line}); is this the output of another input?"
                )
        if len(whole) < len(expected):
            break
        kept += sum(len(line) for line in group)
        number += len(group)
        done += 1
    if done == len(stimuli) and number < len(lines):
        raise StimulusError(f"{path}:{number + 1}: a row after the input's last stimulus")
    if kept < len(data):
        with path.open("r+b") as handle:
            handle.truncate(kept)
    return done


def _paths(args: argparse.Namespace) -> tuple[Path, Path, Path]:
    """The words TSV, the regions TSV and the PNG."""
    words = args.output or args.stimuli.with_suffix(".surprisal.tsv")
    stem = words.with_suffix("") if words.suffix else words
    return words, stem.with_name(stem.name + ".regions.tsv"), stem.with_name(stem.name + ".png")


def _settings(args: argparse.Namespace) -> SurprisalSettings:
    options = ScoreOptions(
        words=True, entropy=not args.no_entropy, add_bos=args.add_bos, model=args.model
    )
    return SurprisalSettings(options, args.units, args.items_per_request, args.timeout)


def run(args: argparse.Namespace) -> int:
    words_path, regions_path, plot_path = _paths(args)
    try:
        columns = StimulusColumns(
            args.item_column, args.sentence_column, args.condition_column, args.context_column
        )
        stimuli = read_stimuli(args.stimuli, columns, args.region_marker, args.format)
        settings = _settings(args)
        done = completed_stimuli(words_path, stimuli, settings.header) if args.resume else 0
    except (StimulusError, OSError) as exc:
        print(f"lmscore surprisal: {exc}", file=sys.stderr)
        return 2
    try:
        client = ScoringClient(args.server, timeout=args.timeout, **connection(args, os.environ))
    except ValueError as exc:
        print(f"lmscore surprisal: --server: {exc}", file=sys.stderr)
        return 2
    again = f"; rerun with --resume to go on after the stimuli {words_path} holds"
    try:
        with client, words_path.open("a" if done else "w", encoding="utf-8") as out:
            if not done:
                out.write(_tsv([settings.header]))
            score_stimuli(client, stimuli[done:], out, settings)
    except (ScoringError, StimulusError) as exc:
        print(f"lmscore surprisal: {args.stimuli}: {exc}{again}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"lmscore surprisal: interrupted{again}", file=sys.stderr)
        return 130
    regions = region_rows(words_path, settings.units)
    write_regions(regions_path, regions, settings.units)
    written = [words_path, regions_path]
    if not args.no_plot:
        try:
            write_plot(plot_path, regions, settings.units, title=args.stimuli.name)
            written.append(plot_path)
        except ModuleNotFoundError as exc:
            _warn(f"no plot: missing {exc.name!r}; install lmscore[research]")
    resumed = f" ({done} already in {words_path})" if done else ""
    print(
        f"lmscore surprisal: {len(stimuli)} stimuli{resumed}; wrote "
        + ", ".join(map(str, written)),
        file=sys.stderr,
    )
    return 0
