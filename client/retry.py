"""Retry with exponential backoff, on UNAVAILABLE only (the server is down or restarting), and
resuming a result stream that a dying replica cut off mid-way."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator

import grpc

from lmscore.v1 import scoring_pb2 as pb


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 4
    initial_backoff: float = 0.2
    max_backoff: float = 2.0
    multiplier: float = 2.0

    def delays(self) -> Iterator[float]:
        """Seconds to wait before attempts 2..max_attempts, with full jitter."""
        backoff = self.initial_backoff
        for _ in range(self.max_attempts - 1):
            yield random.uniform(0, backoff)
            backoff = min(backoff * self.multiplier, self.max_backoff)

    @staticmethod
    def retryable(error: grpc.RpcError) -> bool:
        return error.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]


NO_RETRY = RetryPolicy(max_attempts=1)


def resume_key(message: object) -> tuple[int, ...] | None:
    """Which result a streamed message is, so that a call replayed after UNAVAILABLE mid-stream
    (its replica died) yields only the results not yielded yet. Replaying is safe: scoring is a
    read-only call whose every result is computed on its own, whichever replica computes it.
    None: a message that cannot be told apart from others (the call is not resumed)."""
    if isinstance(message, pb.ScoreResult):
        return (message.request_index, message.item_index, message.completion_index)
    if isinstance(message, pb.RollingResult):
        return (message.text_index,)
    return None
