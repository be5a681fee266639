"""Batch scoring of a JSONL file (`lmscore score --input`, or score_jsonl from Python):
several requests in flight, results written in input order, resumable, with a progress
bar and a summary (see BATCH_HELP).

The parts: lmscore.client.jsonl_input reads and checks the input and cuts it into requests,
lmscore.client.batch_requests scores one request, lmscore.client.jsonl_output writes and
repairs the output lines; this module runs the requests on a pool and writes in order."""

from __future__ import annotations

import dataclasses
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from lmscore.client.batch_requests import BatchScorer, BatchSettings, ChunkResult
from lmscore.client.errors import ScoringError
from lmscore.client.jsonl_input import (
    MAX_LINE_BYTES,
    MAX_REQUEST_INPUT_BYTES,
    Chunk,
    InputError,
    InputRecord,
    read_records,
)
from lmscore.client.jsonl_input import request_chunks as _chunks
from lmscore.client.jsonl_output import (
    UNITS,
    completed_results,
    result_record,
    to_bits,
    write_lines,
)
from lmscore.client.sync import ScoringClient
from lmscore.client.types import ScoreOptions

# The batch mode's names: `lmscore score` (client/cli.py) and scripts import them from here.
__all__ = [
    "BATCH_HELP",
    "DEFAULT_CONCURRENCY",
    "DEFAULT_ITEMS_PER_REQUEST",
    "MAX_LINE_BYTES",
    "UNITS",
    "BatchSettings",
    "BatchSummary",
    "InputError",
    "InputRecord",
    "result_record",
    "score_jsonl",
    "to_bits",
]

# Items per Score request.
DEFAULT_ITEMS_PER_REQUEST = 32
# Score requests in flight at once.
DEFAULT_CONCURRENCY = 4
# A run prints this many failed completions as they happen; all are in the output.
MAX_PRINTED_ERRORS = 10

_LINE_MIB = MAX_LINE_BYTES // 2**20
_REQUEST_MIB = MAX_REQUEST_INPUT_BYTES // 2**20
BATCH_HELP = f"""\
batch mode (--input):
  Output has one JSON line per (input record, completion), keyed by "index" (0-based
  record; blank lines are not records) and "completion_index". --concurrency requests
  run at once, but lines are written in input order, whole, flushed after each request.
  A completion the server rejects (e.g. a sequence longer than the context) gets the
  line {{"index", "completion_index", "line" (of the input), "error": {{"code",
  "message"}}}} instead; the run goes on and exits with 1. Any other failure (server
  down, bad option) stops the run at the first request it hits, after the lines before
  it; exit 1.
  Input lines are UTF-8, at most {_LINE_MIB} MiB each; a request takes up to --items-per-request
  records, fewer when their lines add up to over {_REQUEST_MIB} MiB. A bad input line (not UTF-8,
  not JSON, too long, fields missing) stops the run before any request; exit 2.
  --resume keeps the complete result lines of --output, cuts a torn last line, drops
  error lines (so they are retried) and appends what is missing; so after a resume that
  retried errors, sort by (index, completion_index) if order matters.
  A summary goes to standard error at the end. The progress bar (shown when standard
  error is a terminal) counts completions; its tok/s counts the tokens of each scored
  sequence, BOS + prompt + completion (a prompt once per completion).
"""


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

    def add(self, result: ChunkResult) -> None:
        self.completions += result.completions
        self.tokens += result.tokens
        self.errors += len(result.errors)

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
class _BatchJob:
    """What a batch run scores, on which server, and how."""

    client: ScoringClient
    records: Sequence[InputRecord]
    source: str  # the input's name, in messages
    settings: BatchSettings


class _InOrderPool:
    """Chunks scored on `concurrency` worker threads, handed back in input order. The
    workers run ahead of the writer by at most 2 * `concurrency` chunks, which bounds the
    results held in memory."""

    def __init__(
        self,
        score: Callable[[Chunk], ChunkResult],
        chunks: Iterator[Chunk],
        concurrency: int,
    ) -> None:
        self._score = score
        self._chunks = chunks
        self._window = 2 * concurrency
        self._pending: deque[tuple[Chunk, Future[ChunkResult]]] = deque()
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="lmscore-score")

    def next_in_order(self) -> tuple[Chunk, Future[ChunkResult]] | None:
        """The first chunk not yet handed back and its result to come; None when all were."""
        while len(self._pending) < self._window and (chunk := next(self._chunks, None)) is not None:
            self._pending.append((chunk, self._pool.submit(self._score, chunk)))
        return self._pending.popleft() if self._pending else None

    def close(self) -> None:
        """Cancels what has not started and waits for what has."""
        for _, future in self._pending:
            future.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)


class _Progress:
    """The progress bar (on a terminal only) and the first MAX_PRINTED_ERRORS error lines,
    printed as they are written."""

    def __init__(self, source: str, total: int) -> None:
        self._source = source
        self._bar = tqdm(
            total=total, desc="scoring", unit="completion", file=sys.stderr, disable=None
        )

    def advance(self, result: ChunkResult, summary: BatchSummary, elapsed_s: float) -> None:
        """After `result` was written and added to `summary`."""
        self._print_errors(result.errors, summary.errors - len(result.errors))
        postfix = f"tok/s={summary.tokens / max(elapsed_s, 1e-9):.0f}"
        if summary.errors:
            postfix += f", errors={summary.errors}"
        self._bar.set_postfix_str(postfix, refresh=False)
        self._bar.update(result.completions + len(result.errors))

    def _print_errors(self, errors: list[dict[str, Any]], printed_before: int) -> None:
        for number, error in enumerate(errors, printed_before + 1):
            if number <= MAX_PRINTED_ERRORS:
                self._bar.write(
                    f"{self._source}:{error['line']}: completion {error['completion_index']}: "
                    f"{error['error']['code']}: {error['error']['message']}",
                    file=sys.stderr,
                )
            elif number == MAX_PRINTED_ERRORS + 1:
                self._bar.write("(further errors only in the output)", file=sys.stderr)

    def close(self) -> None:
        self._bar.close()


def _missing_completions(
    records: Sequence[InputRecord], done: set[tuple[int, int]]
) -> list[tuple[int, list[int]]]:
    """(record index, completion indices not in `done`) of every record with any left."""
    todo = [
        (index, [c for c in range(len(record.item.completions)) if (index, c) not in done])
        for index, record in enumerate(records)
    ]
    return [(index, wanted) for index, wanted in todo if wanted]


def _score_records(
    batch: _BatchJob, out: TextIO, done: set[tuple[int, int]], summary: BatchSummary
) -> None:
    """Score every (record, completion) not in `done`, a chunk per request, `concurrency`
    requests at once; write the lines in input order. Fills `summary`; a failure that is
    not one completion's (ScoringError) stops at its chunk and sets summary.stopped."""
    settings = batch.settings
    todo = _missing_completions(batch.records, done)
    chunks = _chunks(todo, batch.records, settings.items_per_request)
    scorer = BatchScorer(batch.client, batch.records, settings)
    began = time.monotonic()
    pool = _InOrderPool(scorer.score, chunks, settings.concurrency)
    progress = _Progress(batch.source, total=sum(len(wanted) for _, wanted in todo))
    try:
        while (submitted := pool.next_in_order()) is not None:
            chunk, future = submitted
            try:
                result = future.result()
            except ScoringError as exc:
                summary.stopped = f"{batch.source}:{batch.records[chunk[0][0]].line}: {exc}"
                break
            write_lines(out, result.records)
            summary.add(result)
            progress.advance(result, summary, time.monotonic() - began)
    except KeyboardInterrupt:
        summary.stopped = "interrupted"
        batch.client.close()  # cancels the requests in flight rather than waiting for them
    finally:
        pool.close()
        progress.close()
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
    settings = BatchSettings(
        options or ScoreOptions(), items_per_request, concurrency, timeout, unit
    )
    with input_path.open("rb") as handle:
        records = list(read_records(handle, str(input_path), max_line_bytes))
    batch = _BatchJob(client, records, str(input_path), settings)
    summary = BatchSummary(items=len(records))
    if output_path is None:
        _score_records(batch, sys.stdout, set(), summary)
        return summary
    done, summary.retried = completed_results(output_path, records) if resume else (set(), 0)
    summary.skipped = len(done)
    with output_path.open("a" if resume else "w", encoding="utf-8") as out:
        _score_records(batch, out, done, summary)
    return summary
