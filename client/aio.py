"""asyncio client: the same surface as ScoringClient, every call awaitable."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from lmscore.client import convert
from lmscore.client.base import ClientBase
from lmscore.client.channel import async_channel
from lmscore.client.errors import error_from_rpc
from lmscore.client.retry import ResumableStream
from lmscore.client.sync import ScoringClient
from lmscore.client.types import (
    Item,
    ModelInfo,
    RollingOptions,
    ScoreOptions,
    ScoreRequest,
    TokenInput,
)
from lmscore.v1 import scoring_pb2 as pb
from lmscore.v1.results import RollingResult, ScoreResult


class AsyncScoringClient(ClientBase):
    __doc__ = "asyncio twin of lmscore.client.ScoringClient. " + (ClientBase.__doc__ or "")

    _connect = staticmethod(async_channel)

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

    async def _stream(
        self, call: Callable[..., AsyncIterator[Any]], request: object, timeout: float | None
    ) -> AsyncIterator[Any]:
        stream = ResumableStream(self.retry)
        while True:
            try:
                async for message in call(request, **self._call_options(timeout)):
                    if stream.is_new(message):
                        yield message
                return
            except grpc.RpcError as error:
                await asyncio.sleep(stream.retry_after(error))

    async def iter_score(
        self,
        items: Sequence[Item],
        options: ScoreOptions | None = None,
        *,
        timeout: float | None = None,
    ) -> AsyncIterator[ScoreResult]:
        request = convert.build_request(items, options)
        async for message in self._stream(self._stub.Score, request, timeout):
            yield convert.result_from_pb(message)

    async def score(
        self,
        items: Sequence[Item],
        options: ScoreOptions | None = None,
        *,
        timeout: float | None = None,
    ) -> list[ScoreResult]:
        results = [r async for r in self.iter_score(items, options, timeout=timeout)]
        return convert.in_input_order(results)

    async def score_completions(
        self,
        prompt: TokenInput | None,
        completions: Sequence[TokenInput],
        options: ScoreOptions | None = None,
        *,
        timeout: float | None = None,
    ) -> list[ScoreResult]:
        return await self.score([Item(prompt, completions)], options, timeout=timeout)

    async def score_labels(
        self,
        prompt: TokenInput | None,
        labels: Sequence[str] | Sequence[int],
        options: ScoreOptions | None = None,
        *,
        timeout: float | None = None,
    ) -> tuple[float, ...]:
        """log P(label | prompt) of each candidate label (strings of one token each, or
        token ids), in order, read in one pass after the prompt."""
        chosen = convert.label_options(labels, options)
        [result] = await self.score([Item(prompt, [""])], chosen, timeout=timeout)
        return result.label_logprobs

    async def iter_score_rolling(
        self,
        texts: Sequence[TokenInput],
        options: RollingOptions | None = None,
        *,
        timeout: float | None = None,
    ) -> AsyncIterator[RollingResult]:
        request = convert.rolling_request_to_pb(texts, options)
        async for message in self._stream(self._stub.ScoreRolling, request, timeout):
            yield convert.rolling_result_from_pb(message)

    async def score_rolling(
        self,
        texts: Sequence[TokenInput],
        options: RollingOptions | None = None,
        *,
        timeout: float | None = None,
    ) -> list[RollingResult]:
        results = [r async for r in self.iter_score_rolling(texts, options, timeout=timeout)]
        return sorted(results, key=lambda r: r.text_index)

    async def score_stream(
        self, requests: Iterable[ScoreRequest], *, timeout: float | None = None
    ) -> AsyncIterator[ScoreResult]:
        call = self._stub.ScoreStream(
            (convert.request_to_pb(r) for r in requests), **self._call_options(timeout)
        )
        try:
            async for message in call:
                yield convert.result_from_pb(message)
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None

    async def _unary(
        self, call: Callable[..., Awaitable[Any]], request: object, timeout: float | None
    ) -> Any:
        # A unary call seen as a one-message stream, so it shares the retry loop.
        async def as_stream(request: object, **options: Any) -> AsyncIterator[Any]:
            yield await call(request, **options)

        messages = [m async for m in self._stream(as_stream, request, timeout)]
        return messages[0]

    async def model_info(self, model: str = "", *, timeout: float | None = None) -> ModelInfo:
        request = pb.GetModelInfoRequest(model=model)
        message = await self._unary(self._stub.GetModelInfo, request, timeout)
        return convert.model_info_from_pb(message)

    async def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        response = await self._unary(self._stub.ListModels, pb.ListModelsRequest(), timeout)
        return [convert.model_info_from_pb(message) for message in response.models]

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
                raise self._not_ready(timeout)
            await asyncio.sleep(0.1)


# The twins document each call once, on the blocking client.
for _name, _method in vars(AsyncScoringClient).items():
    if callable(_method) and not _name.startswith("_") and _method.__doc__ is None:
        _method.__doc__ = getattr(ScoringClient, _name).__doc__
