"""Retry with exponential backoff, on UNAVAILABLE only (the server is down or restarting)."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator

import grpc


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
