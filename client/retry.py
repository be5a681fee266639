"""Retry with exponential backoff on UNAVAILABLE (the server is down or restarting) and on
RESOURCE_EXHAUSTED that says when to come back (an overloaded server's retry pushback, not a
request over a size limit), and resuming a result stream that a dying replica cut off
mid-way."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator

import grpc

from lmscore.client.errors import error_from_rpc
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
        code = error.code()  # type: ignore[attr-defined]
        if code == grpc.StatusCode.UNAVAILABLE:
            return True
        return code == grpc.StatusCode.RESOURCE_EXHAUSTED and pushback_seconds(error) is not None


# The metadata key of gRPC's retry pushback: how long an overloaded server asks clients to wait.
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"


def pushback_seconds(error: grpc.RpcError) -> float | None:
    """The wait an overloaded server asked for, in seconds; None when it asked none."""
    trailing = getattr(error, "trailing_metadata", None)
    for key, value in (trailing() if callable(trailing) else None) or ():
        if key == RETRY_PUSHBACK_KEY:
            try:
                return max(0.0, int(value) / 1000)
            except ValueError:
                return None
    return None


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


class ResumableStream:
    """The retry and resume rule of one streaming call, for ScoringClient and
    AsyncScoringClient alike (they only loop over the attempts): a call that fails with
    UNAVAILABLE is replayed after a backoff (round_robin sends it to another replica), and
    the replay yields only the results not yielded yet. Any other failure, or one after a
    message that resume_key cannot tell apart, raises its ScoringError."""

    def __init__(self, policy: RetryPolicy) -> None:
        self._policy = policy
        self._delays = policy.delays()
        self._yielded: set[tuple[int, ...]] = set()
        self._resumable = True

    def is_new(self, message: object) -> bool:
        """Whether to yield `message`: False for a result an earlier attempt yielded."""
        key = resume_key(message)
        if key is None:
            self._resumable = False
            return True
        if key in self._yielded:
            return False
        self._yielded.add(key)
        return True

    def retry_after(self, error: grpc.RpcError) -> float:
        """Seconds to wait before replaying the call; raises `error` as a ScoringError when
        the call is not to be replayed."""
        delay = next(self._delays, None)
        if not self._resumable or delay is None or not self._policy.retryable(error):
            raise error_from_rpc(error) from None
        # No sooner than the server asked: retrying at once only adds refusals.
        return max(delay, pushback_seconds(error) or 0.0)
