"""`lmscore score --input`: a JSONL file scored with several requests in flight, written
in input order, resumable, with a progress bar and a summary (see BATCH_HELP)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TextIO

import grpc
from tqdm import tqdm

from lmscore.client.errors import ScoringError
from lmscore.client.sync import ScoringClient
from lmscore.client.types import Item, ScoreOptions, ScoreResult

# Items per Score request.
DEFAULT_ITEMS_PER_REQUEST = 32
# Score requests in flight at once.
DEFAULT_CONCURRENCY = 4
# A run prints this many failed completions as they happen; all are in the output.
MAX_PRINTED_ERRORS = 10

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
  --resume keeps the complete result lines of --output, cuts a torn last line, drops
  error lines (so they are retried) and appends what is missing; so after a resume that
  retried errors, sort by (index, completion_index) if order matters.
  A summary goes to standard error at the end. The progress bar (shown when standard
  error is a terminal) counts completions; its tok/s counts the tokens of each scored
  sequence, BOS + prompt + completion (a prompt once per completion).
"""


class InputError(ValueError):
    pass


def score_options(args: argparse.Namespace) -> ScoreOptions:
    return ScoreOptions(
        token_details=args.token_details,
        top_k=args.top_k,
        marginal=args.marginal,
        truncate_prompt_left=args.truncate_prompt_left,
        add_bos=False if args.no_bos else None,
    )


@dataclasses.dataclass(frozen=True)
class InputRecord:
    line: int  # 1-based line number in the input file
    item: Item
    id: Any


def read_records(lines: Iterator[str], source: str) -> Iterator[InputRecord]:
    """One InputRecord per non-blank JSONL line; InputError names the line and the field."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{source}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: not JSON ({exc.msg})") from None
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
        yield InputRecord(number, Item(prompt, completions), record.get("id"))


def read_items(lines: Iterator[str], source: str) -> Iterator[tuple[Item, Any]]:
    """(item, id) per non-blank JSONL line; InputError names the line and the field."""
    for record in read_records(lines, source):
        yield record.item, record.id


def result_record(result: ScoreResult, index: int, item_id: Any, token_details: bool) -> dict:
    record: dict[str, Any] = {"index": index, "completion_index": result.completion_index}
    if item_id is not None:
        record["id"] = item_id
    record.update(
        joint_logprob=result.joint_logprob,
        marginal_logprob=result.marginal_logprob,
        conditional_logprob=result.conditional_logprob,
        greedy=result.greedy,
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        truncated_prompt_tokens=result.truncated_prompt_tokens,
        first_token_scored=result.first_token_scored,
    )
    if token_details:
        record["tokens"] = [
            {
                "id": t.id,
                "text": t.text,
                "segment": t.segment,
                "logprob": t.logprob,
                "rank": t.rank,
                "top": [{"id": x.id, "text": x.text, "logprob": x.logprob} for x in t.top],
            }
            for t in result.tokens
        ]
    return record


def _chunks(records: Sequence[Any], size: int) -> Iterator[tuple[int, Sequence[Any]]]:
    for start in range(0, len(records), size):
        yield start, records[start : start + size]


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


# A chunk: (record index, completion indices to score) per item of one request.
Chunk = Sequence[tuple[int, Sequence[int]]]


def _item_error(exc: ScoringError) -> bool:
    """The server rejected something in the items (not an option, not the server's state):
    smaller requests can find which completion, and the others still score."""
    return exc.code in (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    ) and any(field.split("[", 1)[0] == "items" for field in exc.field_violations)


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
        args: argparse.Namespace,
    ) -> None:
        self.client = client
        self.records = records
        self.options = score_options(args)
        self.timeout = args.timeout
        self.token_details = args.token_details

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
            scored.append(result_record(result, index, self.records[index].id, self.token_details))
            tokens += int(result.bos_added) + result.prompt_tokens + result.completion_tokens
        return ChunkResult(scored, len(scored), [], tokens)

    def error_record(self, index: int, completion: int, exc: ScoringError) -> dict[str, Any]:
        record: dict[str, Any] = {"index": index, "completion_index": completion}
        if self.records[index].id is not None:
            record["id"] = self.records[index].id
        # The violation's field names the one-completion request; its description is the news.
        message = next(iter(exc.field_violations.values()), exc.message)
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


def score_file(
    client: ScoringClient,
    args: argparse.Namespace,
    records: Sequence[InputRecord],
    out: TextIO,
    done: set[tuple[int, int]],
    summary: BatchSummary,
) -> BatchSummary:
    """Score every (record, completion) not in `done`, a chunk per request, --concurrency
    requests at once; write the lines in input order. Fills and returns `summary`; a
    failure that is not one completion's (ScoringError) stops at its chunk and sets
    summary.stopped."""
    todo = [
        (index, [c for c in range(len(record.item.completions)) if (index, c) not in done])
        for index, record in enumerate(records)
    ]
    todo = [(index, wanted) for index, wanted in todo if wanted]
    total = sum(len(wanted) for _, wanted in todo)
    chunks = (chunk for _, chunk in _chunks(todo, args.items_per_request))
    scorer = BatchScorer(client, records, args)
    # Chunks submitted and not yet written, in input order: the workers run ahead of the
    # writer by at most this many, which bounds the results held in memory.
    window = 2 * args.concurrency
    pending: deque[tuple[Chunk, Future[ChunkResult]]] = deque()
    began = time.monotonic()
    pool = ThreadPoolExecutor(args.concurrency, thread_name_prefix="lmscore-score")
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
                summary.stopped = f"{args.input}:{record.line}: {exc}"
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
                        f"{args.input}:{error['line']}: completion {error['completion_index']}: "
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
        client.close()  # cancels the requests in flight rather than waiting for them
    finally:
        for _, future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        summary.elapsed_s = time.monotonic() - began
    return summary


def run_batch(client: ScoringClient, args: argparse.Namespace) -> int:
    with args.input.open(encoding="utf-8") as handle:
        records = list(read_records(handle, str(args.input)))
    summary = BatchSummary(items=len(records))
    if args.output is None:
        score_file(client, args, records, sys.stdout, set(), summary)
    else:
        done, summary.retried = (
            completed_results(args.output, records) if args.resume else (set(), 0)
        )
        summary.skipped = len(done)
        with args.output.open("a" if args.resume else "w", encoding="utf-8") as out:
            score_file(client, args, records, out, done, summary)
    print(summary.format(), file=sys.stderr)
    if args.summary_json is not None:
        args.summary_json.write_text(json.dumps(summary.as_dict(), indent=2) + "\n")
    again = f"; rerun with --output {args.output} --resume to continue" if args.output else ""
    if summary.stopped == "interrupted":
        print(f"lmscore score: interrupted{again}", file=sys.stderr)
        return 130
    if summary.stopped is not None:
        print(f"lmscore score: stopped at {summary.stopped}{again}", file=sys.stderr)
        return 1
    if summary.errors:
        where = f"lines of {args.output}" if args.output else "output lines"
        retry = "; rerun with --resume to retry them" if args.output else ""
        print(
            f"lmscore score: {summary.errors} completions failed (their {where} have "
            f'"error"){retry}',
            file=sys.stderr,
        )
        return 1
    return 0
