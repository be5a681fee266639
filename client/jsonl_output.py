"""The output of a batch run (lmscore.client.batch): one JSON line per (input record,
completion), a result or an error, and the repair of an earlier run's output for --resume."""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

from lmscore.client.jsonl_input import InputError, InputRecord
from lmscore.v1.results import ScoreResult

# ScoreResult fields a result line leaves out: its place is "index" and "completion_index"
# (of the input record), and the prompt and BOS flag are in the input already. The scored
# completion stays: the whitespace rule may have changed it, and token offsets index it.
_NOT_IN_LINES = {"item_index", "request_id", "request_index", "bos_added"}
_NOT_IN_LINES |= {"scored_prompt", "tokens"}
# Fields only a request with pmi fills: left out of the line without it.
_PMI_FIELDS = ("unconditional_logprob", "pmi")
# Lists only a request with words / prompt_words fills: left out when empty.
_WORD_FIELDS = ("words", "prompt_words")
# Lists only candidate labels and distribution_positions fill: left out when empty.
_RESEARCH_LISTS = ("label_logprobs", "distributions")
# Log-probs in nats that --unit bits gives again in bits, as NAME_bits = NAME / ln 2.
BITS_FIELDS = (
    "joint_logprob",
    "marginal_logprob",
    "conditional_logprob",
    "conditional_logprob_per_token",
    "conditional_logprob_per_char",
    "conditional_logprob_per_byte",
    *_PMI_FIELDS,
)
UNITS = ("nats", "bits")


def to_bits(nats: float | None) -> float | None:
    """A natural-log value in bits (log base 2); None stays None."""
    return None if nats is None else nats / math.log(2)


def _line_key(index: int, completion: int, item_id: Any) -> dict[str, Any]:
    """Where a line belongs: the input record and completion, and the record's id if any."""
    line: dict[str, Any] = {"index": index, "completion_index": completion}
    if item_id is not None:
        line["id"] = item_id
    return line


def result_record(
    result: ScoreResult, index: int, item_id: Any, token_details: bool, unit: str = "nats"
) -> dict:
    """The output line of `result` for input record `index`; with `unit` "bits", every
    log-prob also in bits (BITS_FIELDS, and each token's logprob) beside its nats field."""
    record = _line_key(index, result.completion_index, item_id)
    values = dataclasses.asdict(result)
    for name in _PMI_FIELDS:
        if values[name] is None:
            del values[name]
    record.update((k, v) for k, v in values.items() if k not in _NOT_IN_LINES)
    # Words only where asked; prompt words index the scored prompt, which then comes along.
    for name in (*_WORD_FIELDS, *_RESEARCH_LISTS):
        if not record[name]:
            del record[name]
    for distribution in record.get("distributions", ()):
        # bytes as the proto3 JSON mapping writes them (and the HTTP routes do): base64.
        distribution["logprobs"] = base64.b64encode(distribution["logprobs"]).decode("ascii")
    if "prompt_words" in record:
        record["scored_prompt"] = result.scored_prompt
    bits = unit == "bits"
    if bits:
        record.update((f"{k}_bits", to_bits(record[k])) for k in BITS_FIELDS if k in record)
        for word in (w for name in _WORD_FIELDS for w in record.get(name, ())):
            word["logprob_bits"] = to_bits(word["logprob"])
            word["logprob_uncorrected_bits"] = to_bits(word["logprob_uncorrected"])
            if word["entropy"] is not None:
                word["entropy_bits"] = to_bits(word["entropy"])
        if "label_logprobs" in record:
            record["label_logprobs_bits"] = [to_bits(v) for v in record["label_logprobs"]]
    if token_details:
        record["tokens"] = values["tokens"]
        if bits:
            for token in record["tokens"]:
                token["logprob_bits"] = to_bits(token["logprob"])
                if token["entropy"] is not None:
                    token["entropy_bits"] = to_bits(token["entropy"])
    return record


def error_record(
    record: InputRecord, index: int, completion: int, code: str, message: str
) -> dict[str, Any]:
    """The output line of a completion the server rejected: where it belongs, the input line
    it came from, and the status `code` (its name) with `message`."""
    line = _line_key(index, completion, record.id)
    line["line"] = record.line
    line["error"] = {"code": code, "message": message}
    return line


def write_lines(out: TextIO, lines: Iterable[dict[str, Any]]) -> None:
    """`lines` as JSON lines, whole, flushed at the end."""
    for line in lines:
        out.write(json.dumps(line, ensure_ascii=False) + "\n")
    out.flush()


def _replace_atomically(path: Path, lines: list[bytes]) -> None:
    temporary = path.with_name(path.name + ".resume-tmp")
    with temporary.open("wb") as handle:
        handle.writelines(lines)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _output_key(
    line: bytes, where: str, records: Sequence[InputRecord]
) -> tuple[tuple[int, int], bool]:
    """(index, completion_index) of a line of an earlier run's output, and whether it is an
    error line. InputError when the line is not ours or names a record or id that the input
    lacks."""
    try:
        parsed = json.loads(line)
        key = (int(parsed["index"]), int(parsed["completion_index"]))
    except (ValueError, KeyError, TypeError):
        raise InputError(f"{where}: not a result line of lmscore score") from None
    index, completion = key
    if not (
        0 <= index < len(records)
        and 0 <= completion < len(records[index].item.completions)
        and parsed.get("id") == records[index].id
    ):
        raise InputError(
            f"{where}: result of record {index} completion {completion}"
            f"{'' if parsed.get('id') is None else ' id ' + json.dumps(parsed['id'])}, "
            "which the input does not have; is this the output of another input?"
        )
    return key, "error" in parsed


def completed_results(
    path: Path, records: Sequence[InputRecord]
) -> tuple[set[tuple[int, int]], int]:
    """For --resume: (index, completion_index) of every complete result line of an earlier
    run's output, and how many error lines it had. A torn last line (the run was killed
    while writing it) is cut off the file; error lines are dropped from it (so they are
    retried), rewriting it atomically. InputError when a line is not ours or names a record
    or id that the input lacks (another input's output)."""
    if not path.exists():
        return set(), 0
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1  # everything after the last newline is a torn line
    lines = data[:keep].splitlines(keepends=True)
    done: set[tuple[int, int]] = set()
    kept: list[bytes] = []
    errors = 0
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        key, is_error = _output_key(line, f"{path}:{number}", records)
        if is_error:
            errors += 1
            continue
        done.add(key)
        kept.append(line)
    if len(kept) < len(lines):  # error or blank lines to drop
        _replace_atomically(path, kept)
    elif keep < len(data):
        with path.open("r+b") as handle:
            handle.truncate(keep)
    return done, errors
