"""Batch scoring of a JSONL file (`lmscore score --input`, or score_jsonl from Python):
several requests in flight, results written in input order, resumable, with a progress
bar and a summary (see BATCH_HELP)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import grpc
from tqdm import tqdm

from lmscore.client.errors import ScoringError
from lmscore.client.sync import ScoringClient
from lmscore.client.types import Item, ScoreOptions
from lmscore.v1.results import ScoreResult

# Items per Score request.
DEFAULT_ITEMS_PER_REQUEST = 32
# Score requests in flight at once.
DEFAULT_CONCURRENCY = 4
# A run prints this many failed completions as they happen; all are in the output.
MAX_PRINTED_ERRORS = 10
# Longest input line (bytes, newline excluded): the server's default gRPC message size
# (`lmscore serve --max-message-bytes`), which a request holding a longer line cannot fit.
# A longer line is an input error, found while reading, before any request.
MAX_LINE_BYTES = 16 * 1024 * 1024
# A request takes records while their lines add up to at most this many bytes (and at least
# one record): half the server's default message size, so requests of several long lines fit.
MAX_REQUEST_INPUT_BYTES = 8 * 1024 * 1024

BATCH_HELP = """\
batch mode (--input):
  Output has one JSON line per (input record, completion), keyed by "index" (0-based
  record; blank lines are not records) and "completion_index". --concurrency requests
  run at once, but lines are written in input order, whole, flushed after each request.
  A completion the server rejects (e.g. a sequence longer than the context) gets the
  line {"index", "completion_index", "line" (of the input), "error": {"code",
  "message"}} instead; the run goes on and exits with 1. Any other failure (server
  down, bad option) stops the run at the first request it hits, after the lines before
  it; exit 1.
  Input lines are UTF-8, at most 16 MiB each; a request takes up to --items-per-request
  records, fewer when their lines add up to over 8 MiB. A bad input line (not UTF-8,
  not JSON, too long, fields missing) stops the run before any request; exit 2.
  --resume keeps the complete result lines of --output, cuts a torn last line, drops
  error lines (so they are retried) and appends what is missing; so after a resume that
  retried errors, sort by (index, completion_index) if order matters.
  A summary goes to standard error at the end. The progress bar (shown when standard
  error is a terminal) counts completions; its tok/s counts the tokens of each scored
  sequence, BOS + prompt + completion (a prompt once per completion).
"""


class InputError(ValueError):
    pass


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
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: not JSON ({exc.msg})") from None
        del text  # the parsed strings are the only copy kept
        if not isinstance(record, dict):
            raise InputError(f"{where}: expected a JSON object")
        prompt = record.get("prompt", "")
        if not isinstance(prompt, str):
            raise InputError(f"{where}: 'prompt' must be a string")
        if ("completion" in record) == ("completions" in record):
            raise InputError(f"{where}: give exactly one of 'completion' and 'completions'")
        completions = record["completions"] if "completions" in record else [record["completion"]]
        if not isinstance(completions, list) or not all(isinstance(c, str) for c in completions):
            raise InputError(f"{where}: completions must be strings")
        if not completions:
            raise InputError(f"{where}: 'completions' must hold at least one string")
        item_id = record.get("id")
        named = "completions" if "completions" in record else "completion"
        for name, value in (("prompt", prompt), (named, completions), ("id", item_id)):
            if (surrogate := _lone_surrogate(value)) is not None:
                raise InputError(
                    f"{where}: {name!r} holds a lone surrogate (\\u{ord(surrogate):04x}), "
                    "which is not UTF-8"
                )
        yield InputRecord(number, Item(prompt, completions), item_id, size)


# ScoreResult fields a result line leaves out: its place is "index" and "completion_index"
# (of the input record), and the prompt and BOS flag are in the input already. The scored
# completion stays: the whitespace rule may have changed it, and token offsets index it.
_NOT_IN_LINES = {"item_index", "request_id", "request_index", "bos_added"}
_NOT_IN_LINES |= {"scored_prompt", "tokens"}
# Fields only a request with pmi fills: left out of the line without it.
_PMI_FIELDS = ("unconditional_logprob", "pmi")
# Lists only a request with words / prompt_words fills: left out when empty.
_WORD_FIELDS = ("words", "prompt_words")
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


def result_record(
    result: ScoreResult, index: int, item_id: Any, token_details: bool, unit: str = "nats"
) -> dict:
    """The output line of `result` for input record `index`; with `unit` "bits", every
    log-prob also in bits (BITS_FIELDS, and each token's logprob) beside its nats field."""
    record: dict[str, Any] = {"index": index, "completion_index": result.completion_index}
    if item_id is not None:
        record["id"] = item_id
    values = dataclasses.asdict(result)
    for name in _PMI_FIELDS:
        if values[name] is None:
            del values[name]
    record.update((k, v) for k, v in values.items() if k not in _NOT_IN_LINES)
    # Words only where asked; prompt words index the scored prompt, which then comes along.
    for name in _WORD_FIELDS:
        if not record[name]:
            del record[name]
    if "prompt_words" in record:
        record["scored_prompt"] = result.scored_prompt
    bits = unit == "bits"
    if bits:
        record.update((f"{k}_bits", to_bits(record[k])) for k in BITS_FIELDS if k in record)
        for word in (w for name in _WORD_FIELDS for w in record.get(name, ())):
            word["logprob_bits"] = to_bits(word["logprob"])
            word["logprob_uncorrected_bits"] = to_bits(word["logprob_uncorrected"])
    if token_details:
        record["tokens"] = values["tokens"]
        if bits:
            for token in record["tokens"]:
                token["logprob_bits"] = to_bits(token["logprob"])
    return record


# A chunk: (record index, completion indices to score) per item of one request.
Chunk = Sequence[tuple[int, Sequence[int]]]


def _chunks(
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
        try:
            record = json.loads(line)
            key = (int(record["index"]), int(record["completion_index"]))
        except (ValueError, KeyError, TypeError):
            raise InputError(f"{path}:{number}: not a result line of lmscore score") from None
        index, completion = key
        if not (
            0 <= index < len(records)
            and 0 <= completion < len(records[index].item.completions)
            and record.get("id") == records[index].id
        ):
            raise InputError(
                f"{path}:{number}: result of record {index} completion {completion}"
                f"{'' if record.get('id') is None else ' id ' + json.dumps(record['id'])}, "
                "which the input does not have; is this the output of another input?"
            )
        if "error" in record:
            errors += 1
            continue
        done.add(key)
        kept.append(line)
    if len(kept) < len(lines):  # error or blank lines to drop
        temporary = path.with_name(path.name + ".resume-tmp")
        with temporary.open("wb") as handle:
            handle.writelines(kept)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    elif keep < len(data):
        with path.open("r+b") as handle:
            handle.truncate(keep)
    return done, errors


def _too_large(exc: ScoringError) -> bool:
    """gRPC refused the request as larger than the server's message size (--max-message-
    bytes; gRPC's own status, with no field named): smaller requests may fit."""
    return (
        exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        and not exc.field_violations
        and "larger than max" in exc.message
    )


def _item_error(exc: ScoringError) -> bool:
    """The server rejected something in the items (not an option, not the server's state):
    smaller requests can find which completion, and the others still score."""
    return _too_large(exc) or (
        exc.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
        and any(field.split("[", 1)[0] == "items" for field in exc.field_violations)
    )


@dataclasses.dataclass(frozen=True)
class ChunkResult:
    records: list[dict[str, Any]]  # in (index, completion_index) order
    completions: int  # scored
    errors: list[dict[str, Any]]  # the error records among `records`
    tokens: int  # BOS + prompt + completion of every scored sequence


class BatchScorer:
    """Scores chunks (on worker threads, sharing the client's channel)."""

    def __init__(
        self,
        client: ScoringClient,
        records: Sequence[InputRecord],
        options: ScoreOptions,
        timeout: float | None,
        unit: str = "nats",
    ) -> None:
        self.client = client
        self.records = records
        self.options = options
        self.timeout = timeout
        self.unit = unit

    def score(self, chunk: Chunk) -> ChunkResult:
        items = [
            Item(
                self.records[index].item.prompt,
                [self.records[index].item.completions[c] for c in wanted],
            )
            for index, wanted in chunk
        ]
        try:
            results = self.client.score(items, self.options, timeout=self.timeout)
        except ScoringError as exc:
            if not _item_error(exc):
                raise
            # Split until the rejected completions are alone; the rest still score.
            if len(chunk) > 1:
                parts = [self.score([entry]) for entry in chunk]
            elif len(chunk[0][1]) > 1:
                index, wanted = chunk[0]
                parts = [self.score([(index, [c])]) for c in wanted]
            else:
                error = self.error_record(chunk[0][0], chunk[0][1][0], exc)
                return ChunkResult([error], 0, [error], 0)
            return ChunkResult(
                [r for part in parts for r in part.records],
                sum(part.completions for part in parts),
                [e for part in parts for e in part.errors],
                sum(part.tokens for part in parts),
            )
        scored = []
        tokens = 0
        for result in results:
            index, wanted = chunk[result.item_index]
            result = dataclasses.replace(result, completion_index=wanted[result.completion_index])
            item_id = self.records[index].id
            scored.append(
                result_record(result, index, item_id, self.options.token_details, self.unit)
            )
            tokens += int(result.bos_added) + result.prompt_tokens + result.completion_tokens
        return ChunkResult(scored, len(scored), [], tokens)

    def error_record(self, index: int, completion: int, exc: ScoringError) -> dict[str, Any]:
        record: dict[str, Any] = {"index": index, "completion_index": completion}
        if self.records[index].id is not None:
            record["id"] = self.records[index].id
        # The violation's field names the one-completion request; its description is the news.
        message = next(iter(exc.field_violations.values()), exc.message)
        if _too_large(exc):
            message += " (a request of this completion alone is over the server's message size)"
        record["line"] = self.records[index].line
        record["error"] = {"code": exc.code.name, "message": message}
        return record


@dataclasses.dataclass
class BatchSummary:
    items: int = 0  # records in the input
    completions: int = 0  # scored (and written) by this run
    errors: int = 0  # error lines written by this run
    skipped: int = 0  # already in --output (--resume)
    retried: int = 0  # error lines of --output dropped by --resume, so scored again
    tokens: int = 0  # BOS + prompt + completion of each scored sequence
    elapsed_s: float = 0.0
    stopped: str | None = None  # why the run stopped before the end

    def as_dict(self) -> dict[str, Any]:
        rate = self.elapsed_s or float("inf")
        return {
            **dataclasses.asdict(self),
            "elapsed_s": round(self.elapsed_s, 3),
            "completions_per_s": round(self.completions / rate, 2),
            "tokens_per_s": round(self.tokens / rate, 1),
        }

    def format(self) -> str:
        numbers = self.as_dict()
        resumed = f", {self.skipped} skipped by --resume" if self.skipped else ""
        retried = f" ({self.retried} retried)" if self.retried else ""
        return (
            f"summary: {self.items} items, {self.completions} completions scored{retried}, "
            f"{self.errors} errors{resumed}; {self.tokens} tokens in {self.elapsed_s:.1f} s: "
            f"{numbers['completions_per_s']:.1f} completions/s, "
            f"{numbers['tokens_per_s']:.0f} tokens/s"
        )


@dataclasses.dataclass(frozen=True)
class _Run:
    """One batch run: what to score and how."""

    client: ScoringClient
    records: Sequence[InputRecord]
    source: str  # the input's name, in messages
    options: ScoreOptions
    items_per_request: int
    concurrency: int
    timeout: float | None
    unit: str = "nats"


def _score_records(
    run: _Run, out: TextIO, done: set[tuple[int, int]], summary: BatchSummary
) -> None:
    """Score every (record, completion) not in `done`, a chunk per request, `concurrency`
    requests at once; write the lines in input order. Fills `summary`; a failure that is
    not one completion's (ScoringError) stops at its chunk and sets summary.stopped."""
    records = run.records
    todo = [
        (index, [c for c in range(len(record.item.completions)) if (index, c) not in done])
        for index, record in enumerate(records)
    ]
    todo = [(index, wanted) for index, wanted in todo if wanted]
    total = sum(len(wanted) for _, wanted in todo)
    chunks = _chunks(todo, records, run.items_per_request)
    scorer = BatchScorer(run.client, records, run.options, run.timeout, run.unit)
    # Chunks submitted and not yet written, in input order: the workers run ahead of the
    # writer by at most this many, which bounds the results held in memory.
    window = 2 * run.concurrency
    pending: deque[tuple[Chunk, Future[ChunkResult]]] = deque()
    began = time.monotonic()
    pool = ThreadPoolExecutor(run.concurrency, thread_name_prefix="lmscore-score")
    bar = tqdm(total=total, desc="scoring", unit="completion", file=sys.stderr, disable=None)
    try:
        while True:
            while len(pending) < window and (chunk := next(chunks, None)) is not None:
                pending.append((chunk, pool.submit(scorer.score, chunk)))
            if not pending:
                break
            chunk, future = pending.popleft()
            try:
                result = future.result()
            except ScoringError as exc:
                record = records[chunk[0][0]]
                summary.stopped = f"{run.source}:{record.line}: {exc}"
                break
            for line in result.records:
                out.write(json.dumps(line, ensure_ascii=False) + "\n")
            out.flush()
            summary.completions += result.completions
            summary.tokens += result.tokens
            for error in result.errors:
                summary.errors += 1
                if summary.errors <= MAX_PRINTED_ERRORS:
                    bar.write(
                        f"{run.source}:{error['line']}: completion {error['completion_index']}: "
                        f"{error['error']['code']}: {error['error']['message']}",
                        file=sys.stderr,
                    )
                elif summary.errors == MAX_PRINTED_ERRORS + 1:
                    bar.write("(further errors only in the output)", file=sys.stderr)
            elapsed = time.monotonic() - began
            postfix = f"tok/s={summary.tokens / max(elapsed, 1e-9):.0f}"
            if summary.errors:
                postfix += f", errors={summary.errors}"
            bar.set_postfix_str(postfix, refresh=False)
            bar.update(result.completions + len(result.errors))
    except KeyboardInterrupt:
        summary.stopped = "interrupted"
        run.client.close()  # cancels the requests in flight rather than waiting for them
    finally:
        for _, future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        summary.elapsed_s = time.monotonic() - began


def score_jsonl(
    client: ScoringClient,
    input_path: Path,
    output_path: Path | None = None,
    *,
    options: ScoreOptions | None = None,
    items_per_request: int = DEFAULT_ITEMS_PER_REQUEST,
    concurrency: int = DEFAULT_CONCURRENCY,
    timeout: float | None = None,
    resume: bool = False,
    max_line_bytes: int = MAX_LINE_BYTES,
    unit: str = "nats",
) -> BatchSummary:
    """Score the JSONL file `input_path` on `client`'s server and write one result line per
    (record, completion) to `output_path` (standard output when None), in input order (see
    BATCH_HELP). `resume` keeps the complete result lines of `output_path` and scores what
    is missing. `unit` "bits" adds every log-prob in bits too (result_record).
    InputError, before any request, for a bad input line (not UTF-8, longer
    than `max_line_bytes`, not JSON, not a record), or an output that is not this input's.
    The summary says what was scored; `stopped` is set when the run ended early."""
    if resume and output_path is None:
        raise ValueError("resume needs an output path")
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {list(UNITS)}, got {unit!r}")
    with input_path.open("rb") as handle:
        records = list(read_records(handle, str(input_path), max_line_bytes))
    run = _Run(
        client,
        records,
        str(input_path),
        options or ScoreOptions(),
        items_per_request,
        concurrency,
        timeout,
        unit,
    )
    summary = BatchSummary(items=len(records))
    if output_path is None:
        _score_records(run, sys.stdout, set(), summary)
        return summary
    done, summary.retried = completed_results(output_path, records) if resume else (set(), 0)
    summary.skipped = len(done)
    with output_path.open("a" if resume else "w", encoding="utf-8") as out:
        _score_records(run, out, done, summary)
    return summary
