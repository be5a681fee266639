"""asyncio client: the same surface as ScoringClient, every call awaitable."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lmscore.client.channel import TlsOptions, async_channel, auth_metadata
from lmscore.client.convert import (
    build_request,
    in_input_order,
    model_info_from_pb,
    request_to_pb,
    result_from_pb,
    rolling_request_to_pb,
    rolling_result_from_pb,
)
from lmscore.client.errors import ServerUnavailableError, error_from_rpc
from lmscore.client.retry import RetryPolicy, resume_key
from lmscore.client.types import (
    Item,
    ModelInfo,
    RollingOptions,
    RollingResult,
    ScoreOptions,
    ScoreRequest,
    ScoreResult,
    TokenInput,
)
from lmscore.v1 import scoring_pb2 as pb
from lmscore.v1 import scoring_pb2_grpc


class AsyncScoringClient:
    """asyncio twin of lmscore.client.ScoringClient (same arguments, same results)."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        token: str | None = None,
        tls: TlsOptions | None = None,
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self._channel = channel or async_channel(target, tls)
        self._metadata = auth_metadata(token)
        self._stub = scoring_pb2_grpc.ScorerStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def __aenter__(self) -> AsyncScoringClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    def _deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    async def _stream(
        self, call: Callable[..., Any], request: object, timeout: float | None
    ) -> AsyncIterator[Any]:
        delays = self.retry.delays()
        # A replica that dies mid-stream: replay the call (round_robin sends it to another
        # replica) and skip the results already yielded.
        done: set[tuple[int, ...]] = set()
        while True:
            resumable = True
            try:
                async for message in call(
                    request, timeout=self._deadline(timeout), metadata=self._metadata
                ):
                    key = resume_key(message)
                    if key in done:
                        continue
                    if key is None:
                        resumable = False
                    else:
                        done.add(key)
                    yield message
                return
            except grpc.RpcError as error:
                delay = next(delays, None)
                if not resumable or delay is None or not self.retry.retryable(error):
                    raise error_from_rpc(error) from None
                await asyncio.sleep(delay)

    async def iter_score(
        self,
        items: Sequence[Item],
        options: ScoreOptions | None = None,
        *,
        timeout: float | None = None,
    ) -> AsyncIterator[ScoreResult]:
        """Results as the server streams them (not in input order)."""
        request = build_request(items, options)
        async for message in self._stream(self._stub.Score, request, timeout):
            yield result_from_pb(message)

    async def score(
        self,
        items: Sequence[Item],
        options: ScoreOptions | None = None,
        *,
        timeout: float | None = None,
    ) -> list[ScoreResult]:
        """One result per (item, completion), in input order."""
        return in_input_order([r async for r in self.iter_score(items, options, timeout=timeout)])

    async def score_completions(
        self,
        prompt: TokenInput | None,
        completions: Sequence[TokenInput],
        options: ScoreOptions | None = None,
        *,
        timeout: float | None = None,
    ) -> list[ScoreResult]:
        return await self.score([Item(prompt, completions)], options, timeout=timeout)

    async def iter_score_rolling(
        self,
        texts: Sequence[TokenInput],
        options: RollingOptions | None = None,
        *,
        timeout: float | None = None,
    ) -> AsyncIterator[RollingResult]:
        """Whole-text log-likelihoods as the server streams them (not in input order)."""
        request = rolling_request_to_pb(texts, options)
        async for message in self._stream(self._stub.ScoreRolling, request, timeout):
            yield rolling_result_from_pb(message)

    async def score_rolling(
        self,
        texts: Sequence[TokenInput],
        options: RollingOptions | None = None,
        *,
        timeout: float | None = None,
    ) -> list[RollingResult]:
        """Log-likelihood, token count and perplexity of each whole text, in input order."""
        results = [r async for r in self.iter_score_rolling(texts, options, timeout=timeout)]
        return sorted(results, key=lambda r: r.text_index)

    async def score_stream(
        self, requests: Iterable[ScoreRequest], *, timeout: float | None = None
    ) -> AsyncIterator[ScoreResult]:
        """Many requests on one bidirectional stream; results carry request_index. Not retried."""
        call = self._stub.ScoreStream(
            (request_to_pb(r) for r in requests),
            timeout=self._deadline(timeout),
            metadata=self._metadata,
        )
        try:
            async for message in call:
                yield result_from_pb(message)
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None

    async def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        messages = [
            m
            async for m in self._stream(
                _as_stream(self._stub.GetModelInfo), pb.GetModelInfoRequest(), timeout
            )
        ]
        return model_info_from_pb(messages[0])

    async def is_server_ready(self, *, timeout: float = 1.0) -> bool:
        try:
            response = await self._health.Check(
                health_pb2.HealthCheckRequest(), timeout=timeout, metadata=self._metadata
            )
        except grpc.RpcError:
            return False
        return response.status == health_pb2.HealthCheckResponse.SERVING

    async def wait_until_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not await self.is_server_ready():
            if time.monotonic() > deadline:
                raise ServerUnavailableError(
                    grpc.StatusCode.UNAVAILABLE, f"{self.target} not ready after {timeout:g} s"
                )
            await asyncio.sleep(0.1)


def _as_stream(unary: Callable[..., Awaitable[Any]]) -> Callable[..., AsyncIterator[Any]]:
    async def call(request: object, **kwargs: Any) -> AsyncIterator[Any]:
        yield await unary(request, **kwargs)

    return call
