"""The requests of a batch run (lmscore.client.batch): its settings, and one chunk of input
records scored as one Score request, split when the server rejects an item so that only the
rejected completions get error lines."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import grpc

from lmscore.client.errors import ScoringError
from lmscore.client.jsonl_input import Chunk, InputRecord
from lmscore.client.jsonl_output import error_record, result_record
from lmscore.client.sync import ScoringClient
from lmscore.client.types import Item, ScoreOptions
from lmscore.v1.results import ScoreResult


@dataclasses.dataclass(frozen=True)
class BatchSettings:
    """How a batch run scores: built once from score_jsonl's arguments, passed down."""

    options: ScoreOptions
    items_per_request: int
    concurrency: int  # requests in flight at once
    timeout: float | None  # seconds per request; None: the client's
    unit: str  # "nats", or "bits" to add every log-prob in bits too (result_record)


def over_message_size(exc: ScoringError) -> bool:
    """gRPC refused the request as larger than the server's message size (--max-message-
    bytes): smaller requests may fit. gRPC itself sends this status, with no BadRequest
    detail, and the same code without one also means the server's queue is full; only its
    message ("... larger than max ...") tells the two apart."""
    return (
        exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        and not exc.field_violations
        and "larger than max" in exc.message
    )


def rejects_an_item(exc: ScoringError) -> bool:
    """The server rejected something in the items (its BadRequest names a field under
    `items`, or the request was over the message size), not an option or the server's
    state: smaller requests can find which completion, and the others still score."""
    return over_message_size(exc) or (
        exc.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
        and any(field.split("[", 1)[0] == "items" for field in exc.field_violations)
    )


def _error_message(exc: ScoringError) -> str:
    """What an error line says about a one-completion request the server rejected."""
    # The violation's field names the one-completion request; its description is the news.
    message = next(iter(exc.field_violations.values()), exc.message)
    if over_message_size(exc):
        message += " (a request of this completion alone is over the server's message size)"
    return message


@dataclasses.dataclass(frozen=True)
class ChunkResult:
    records: list[dict[str, Any]]  # in (index, completion_index) order
    completions: int  # scored
    errors: list[dict[str, Any]]  # the error records among `records`
    tokens: int  # BOS + prompt + completion of every scored sequence

    @staticmethod
    def joined(parts: Sequence[ChunkResult]) -> ChunkResult:
        return ChunkResult(
            [r for part in parts for r in part.records],
            sum(part.completions for part in parts),
            [e for part in parts for e in part.errors],
            sum(part.tokens for part in parts),
        )


class BatchScorer:
    """Scores chunks (on worker threads, sharing the client's channel)."""

    def __init__(
        self, client: ScoringClient, records: Sequence[InputRecord], settings: BatchSettings
    ) -> None:
        self.client = client
        self.records = records
        self.settings = settings

    def score(self, chunk: Chunk) -> ChunkResult:
        """The lines of `chunk`'s completions. ScoringError for a failure that is not one
        completion's (server down, a bad option)."""
        try:
            results = self.client.score(
                self._items(chunk), self.settings.options, timeout=self.settings.timeout
            )
        except ScoringError as exc:
            if not rejects_an_item(exc):
                raise
            return self._score_split(chunk, exc)
        return self._result_lines(chunk, results)

    def _items(self, chunk: Chunk) -> list[Item]:
        return [
            Item(
                self.records[index].item.prompt,
                [self.records[index].item.completions[c] for c in wanted],
            )
            for index, wanted in chunk
        ]

    def _score_split(self, chunk: Chunk, exc: ScoringError) -> ChunkResult:
        """`chunk`, which the server rejected for `exc`, split until the rejected completions
        are alone; the rest still score."""
        if len(chunk) > 1:
            return ChunkResult.joined([self.score([entry]) for entry in chunk])
        index, wanted = chunk[0]
        if len(wanted) > 1:
            return ChunkResult.joined([self.score([(index, [c])]) for c in wanted])
        error = error_record(
            self.records[index], index, wanted[0], exc.code.name, _error_message(exc)
        )
        return ChunkResult([error], 0, [error], 0)

    def _result_lines(self, chunk: Chunk, results: Sequence[ScoreResult]) -> ChunkResult:
        lines = []
        tokens = 0
        for result in results:
            index, wanted = chunk[result.item_index]
            result = dataclasses.replace(result, completion_index=wanted[result.completion_index])
            lines.append(
                result_record(
                    result,
                    index,
                    self.records[index].id,
                    self.settings.options.token_details,
                    self.settings.unit,
                )
            )
            tokens += int(result.bos_added) + result.prompt_tokens + result.completion_tokens
        return ChunkResult(lines, len(lines), [], tokens)
