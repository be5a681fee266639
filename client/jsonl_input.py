"""The input of a batch run (lmscore.client.batch): JSONL lines read and checked into
records, and the records cut into requests that fit the server's message size."""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from collections.abc import Iterator, Sequence
from typing import Any, BinaryIO

from lmscore.client.types import Item
from lmscore.v1.limits import DEFAULT_MAX_MESSAGE_BYTES

# Longest input line (bytes, newline excluded): a request holding a longer line cannot fit
# the server's default message size. A longer line is an input error, found while reading,
# before any request.
MAX_LINE_BYTES = DEFAULT_MAX_MESSAGE_BYTES
# A request takes records while their lines add up to at most this many bytes (and at least
# one record): half the server's default message size, so requests of several long lines fit.
MAX_REQUEST_INPUT_BYTES = DEFAULT_MAX_MESSAGE_BYTES // 2


class InputError(ValueError):
    """A bad input line, or an output to resume that is not this input's; the message names
    the file and line."""


@dataclasses.dataclass(frozen=True)
class InputRecord:
    line: int  # 1-based line number in the input file
    item: Item
    id: Any
    size: int = 0  # bytes of the input line, which bound its share of a request


def _read_line(handle: BinaryIO, where: str, max_line_bytes: int) -> tuple[str, int] | None:
    r"""The next line of a file opened in binary (None at its end), decoded, and its size in
    bytes. Lines end at b"\n" only: a "\r" inside one (JSON whitespace) does not start
    another. At most `max_line_bytes` + 1 bytes are read for a line that is too long; the
    bytes are dropped on return, so only the text is held while it is parsed."""
    line = handle.readline(max_line_bytes + 1)
    if not line:
        return None
    if len(line.removesuffix(b"\n")) > max_line_bytes:
        mib = f" ({max_line_bytes // 2**20} MiB)" if max_line_bytes % 2**20 == 0 else ""
        raise InputError(
            f"{where}: line longer than the limit of {max_line_bytes} bytes{mib} per input line"
        )
    try:
        return line.decode("utf-8"), len(line)
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{where}: not UTF-8 (byte 0x{line[exc.start]:02x} at offset {exc.start} of the line)"
        ) from None


# A lone surrogate (JSON's "\ud800" escape, say) has no UTF-8 form: protobuf cannot send it.
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _lone_surrogate(value: Any) -> str | None:
    """The first lone surrogate in the strings (keys included) of a parsed JSON value."""
    if isinstance(value, str):
        found = None if value.isascii() else _SURROGATE.search(value)
        return found.group() if found else None
    if isinstance(value, dict):
        value = [part for pair in value.items() for part in pair]
    if isinstance(value, list):
        for part in value:
            if (found := _lone_surrogate(part)) is not None:
                return found
    return None


def _record(parsed: Any, where: str, number: int, size: int) -> InputRecord:
    """The InputRecord of input line `number`, parsed from JSON; InputError says what is
    wrong when it is not a record."""
    if not isinstance(parsed, dict):
        raise InputError(f"{where}: expected a JSON object")
    prompt = parsed.get("prompt", "")
    if not isinstance(prompt, str):
        raise InputError(f"{where}: 'prompt' must be a string")
    if ("completion" in parsed) == ("completions" in parsed):
        raise InputError(f"{where}: give exactly one of 'completion' and 'completions'")
    completions = parsed["completions"] if "completions" in parsed else [parsed["completion"]]
    if not isinstance(completions, list) or not all(isinstance(c, str) for c in completions):
        raise InputError(f"{where}: completions must be strings")
    if not completions:
        raise InputError(f"{where}: 'completions' must hold at least one string")
    item_id = parsed.get("id")
    named = "completions" if "completions" in parsed else "completion"
    for name, value in (("prompt", prompt), (named, completions), ("id", item_id)):
        if (surrogate := _lone_surrogate(value)) is not None:
            raise InputError(
                f"{where}: {name!r} holds a lone surrogate (\\u{ord(surrogate):04x}), "
                "which is not UTF-8"
            )
    return InputRecord(number, Item(prompt, completions), item_id, size)


def read_records(
    handle: BinaryIO, source: str, max_line_bytes: int = MAX_LINE_BYTES
) -> Iterator[InputRecord]:
    """One InputRecord per non-blank line of the JSONL file `handle`, opened in binary.
    InputError names the line (1-based) and what is wrong: not UTF-8, longer than
    `max_line_bytes`, not JSON, or not a record."""
    for number in itertools.count(1):
        where = f"{source}:{number}"
        read = _read_line(handle, where, max_line_bytes)
        if read is None:
            return
        text, size = read
        del read
        if not text.strip():
            continue
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: not JSON ({exc.msg})") from None
        del text  # the parsed strings are the only copy kept
        yield _record(parsed, where, number, size)


# A chunk: (record index, completion indices to score) per item of one request.
Chunk = Sequence[tuple[int, Sequence[int]]]


def request_chunks(
    todo: Sequence[tuple[int, Sequence[int]]],
    records: Sequence[InputRecord],
    items: int,
    max_bytes: int = MAX_REQUEST_INPUT_BYTES,
) -> Iterator[Chunk]:
    """`todo` ((record index, completions) pairs) cut into requests of at most `items`
    records whose input lines add up to at most `max_bytes` (a longer record goes alone)."""
    chunk: list[tuple[int, Sequence[int]]] = []
    size = 0
    for entry in todo:
        record_size = records[entry[0]].size
        if chunk and (len(chunk) == items or size + record_size > max_bytes):
            yield chunk
            chunk, size = [], 0
        chunk.append(entry)
        size += record_size
    if chunk:
        yield chunk
