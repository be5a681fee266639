"""The stimuli of `lmscore surprisal` (lmscore.client.surprisal): a CSV or TSV table with an
item, a condition and a sentence a row (and optionally the context before the sentence),
or plain text, one sentence a line. Region markers in a sentence cut it into regions
numbered from 1; they are removed before scoring. Every check fails with a StimulusError
whose one line names the file and line."""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path

FORMATS = ("auto", "csv", "tsv", "text")
# What a table's extension says it is; any other file is told by its first line.
_FORMAT_BY_SUFFIX = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".txt": "text"}
_DELIMITERS = {"csv": ",", "tsv": "\t"}


class StimulusError(ValueError):
    """A stimuli file that cannot be scored as it is; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class Stimulus:
    line: int  # 1-based line of the input where its row starts
    item: str
    condition: str  # "" for plain text, or a table without a condition column
    context: str  # the discourse before the sentence, scored as the prompt ("" for none)
    words: tuple[str, ...]  # the sentence's whitespace-separated words, markers removed
    regions: tuple[int, ...]  # each word's region, from 1

    @property
    def sentence(self) -> str:
        """What is scored: the words joined by single spaces."""
        return " ".join(self.words)


@dataclasses.dataclass(frozen=True)
class StimulusColumns:
    """The table's column names. The optional ones, when None, are used where the table has
    a column of their default name; when named, the table must have them."""

    item: str = "item"
    sentence: str = "sentence"
    condition: str | None = None  # default name "condition"
    context: str | None = None  # default name "context"


def split_regions(sentence: str, marker: str, where: str) -> tuple[list[str], list[int]]:
    """The words of `sentence` and the region of each, cut at every `marker` (no marker: one
    region). StimulusError for an empty sentence, an empty region (a marker at either end,
    or two with only whitespace between) and a marker inside a word."""
    parts = sentence.split(marker) if marker else [sentence]
    if not sentence.replace(marker or " ", " ").split():
        raise StimulusError(f"{where}: empty sentence")
    words: list[str] = []
    regions: list[int] = []
    for number, part in enumerate(parts, 1):
        part_words = part.split()
        if not part_words:
            raise StimulusError(
                f"{where}: region {number} is empty (a region marker {marker!r} at the start or "
                "end of the sentence, or two markers with no word between)"
            )
        words += part_words
        regions += [number] * len(part_words)
    for number, (before, after) in enumerate(itertools.pairwise(parts), 1):
        if before[-1:].strip() and after[:1].strip():
            joined = f"{before.split()[-1]}{marker}{after.split()[0]}"
            raise StimulusError(
                f"{where}: region marker {marker!r} inside the word {joined!r} (after region "
                f"{number}); put whitespace on one side of it"
            )
    return words, regions


def detect_format(path: Path, first_line: str, sentence_column: str) -> str:
    """ "csv", "tsv" or "text": by the extension, else a table when its first line (the
    header) names the sentence column."""
    if (known := _FORMAT_BY_SUFFIX.get(path.suffix.lower())) is not None:
        return known
    for name, delimiter in _DELIMITERS.items():
        header = next(csv.reader([first_line], delimiter=delimiter), [])
        if sentence_column in (cell.strip() for cell in header):
            return name
    return "text"


def _column(header: Sequence[str], name: str, flag: str, where: str, required: bool) -> int:
    """The index of column `name`; -1 when the table lacks it and it is not `required`."""
    for index, cell in enumerate(header):
        if cell.strip() == name:
            return index
    if not required:
        return -1
    raise StimulusError(
        f"{where}: no column {name!r} (columns: {', '.join(repr(c) for c in header)}); "
        f"name it with {flag}"
    )


def _one_line(value: str, what: str, where: str) -> str:
    """An item or condition, which the output's rows hold: on one line."""
    if "\n" in value or "\r" in value:
        raise StimulusError(f"{where}: the {what} {value!r} has a line break")
    return value


def _cell(row: Sequence[str], index: int) -> str:
    """A row's cell, stripped ("" for a column the table lacks or the row is short of)."""
    return row[index].strip() if 0 <= index < len(row) else ""


def _table_stimuli(
    text: str, delimiter: str, columns: StimulusColumns, marker: str, source: str
) -> Iterator[Stimulus]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = next(reader, None)
    if header is None:
        raise StimulusError(f"{source}: empty file")
    where = f"{source}:1"
    item = _column(header, columns.item, "--item-column", where, True)
    sentence = _column(header, columns.sentence, "--sentence-column", where, True)
    condition = _column(
        header,
        columns.condition or "condition",
        "--condition-column",
        where,
        columns.condition is not None,
    )
    context = _column(
        header,
        columns.context or "context",
        "--context-column",
        where,
        columns.context is not None,
    )
    previous = reader.line_num
    for row in reader:
        start, previous = previous + 1, reader.line_num
        where = f"{source}:{start}"
        if not any(cell.strip() for cell in row):
            continue
        if not _cell(row, item):
            raise StimulusError(f"{where}: empty item (column {header[item]!r})")
        words, regions = split_regions(_cell(row, sentence), marker, where)
        yield Stimulus(
            start,
            _one_line(_cell(row, item), "item", where),
            _one_line(_cell(row, condition), "condition", where),
            # As written: a context ending in a line break keeps it before the sentence.
            row[context] if 0 <= context < len(row) and row[context].strip() else "",
            tuple(words),
            tuple(regions),
        )


def _text_stimuli(text: str, marker: str, source: str) -> Iterator[Stimulus]:
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            words, regions = split_regions(line, marker, f"{source}:{number}")
            yield Stimulus(number, str(number), "", "", tuple(words), tuple(regions))


def read_stimuli(
    path: Path,
    columns: StimulusColumns = StimulusColumns(),
    marker: str = "|",
    input_format: str = "auto",
) -> list[Stimulus]:
    """Every stimulus of the file, in order. StimulusError for a file that is not UTF-8, a
    missing column, an empty item or sentence, a bad region, or an (item, condition) given
    twice (each names one stimulus of the output)."""
    source = str(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")  # a spreadsheet's byte-order mark dropped
    except UnicodeDecodeError as exc:
        raise StimulusError(f"{source}: not UTF-8 (byte offset {exc.start})") from None
    if input_format == "auto":
        input_format = detect_format(path, text.partition("\n")[0], columns.sentence)
    if input_format == "text":
        stimuli = list(_text_stimuli(text, marker, source))
    else:
        delimiter = _DELIMITERS[input_format]
        stimuli = list(_table_stimuli(text, delimiter, columns, marker, source))
    if not stimuli:
        raise StimulusError(f"{source}: no stimuli")
    first_line: dict[tuple[str, str], int] = {}
    for stimulus in stimuli:
        key = (stimulus.item, stimulus.condition)
        if key in first_line:
            raise StimulusError(
                f"{source}:{stimulus.line}: item {key[0]!r} condition {key[1]!r} again (first "
                f"on line {first_line[key]})"
            )
        first_line[key] = stimulus.line
    return stimuli
