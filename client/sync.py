"""Blocking client. AsyncScoringClient (lmscore.client.aio) has the same surface for asyncio."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from lmscore.client import convert
from lmscore.client.base import ClientBase
from lmscore.client.channel import sync_channel
from lmscore.client.errors import error_from_rpc
from lmscore.client.retry import ResumableStream
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


class ScoringClient(ClientBase):
    __doc__ = "Client of an lmscore server. " + (ClientBase.__doc__ or "")

    _connect = staticmethod(sync_channel)

    def __enter__(self) -> ScoringClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _stream(
        self, call: Callable[..., Iterable[Any]], request: object, timeout: float | None
    ) -> Iterator[Any]:
        stream = ResumableStream(self.retry)
        while True:
            try:
                yield from filter(stream.is_new, call(request, **self._call_options(timeout)))
                return
            except grpc.RpcError as error:
                time.sleep(stream.retry_after(error))

    def iter_score(
        self,
        items: Sequence[Item],
        options: ScoreOptions | None = None,
        *,
        timeout: float | None = None,
    ) -> Iterator[ScoreResult]:
        """Results as the server streams them (not in input order)."""
        request = convert.build_request(items, options)
        yield from map(convert.result_from_pb, self._stream(self._stub.Score, request, timeout))

    def score(
        self,
        items: Sequence[Item],
        options: ScoreOptions | None = None,
        *,
        timeout: float | None = None,
    ) -> list[ScoreResult]:
        """One result per (item, completion), in input order."""
        return convert.in_input_order(list(self.iter_score(items, options, timeout=timeout)))

    def score_completions(
        self,
        prompt: TokenInput | None,
        completions: Sequence[TokenInput],
        options: ScoreOptions | None = None,
        *,
        timeout: float | None = None,
    ) -> list[ScoreResult]:
        """Score several completions of one prompt (e.g. multiple-choice answers)."""
        return self.score([Item(prompt, completions)], options, timeout=timeout)

    def score_labels(
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
        [result] = self.score([Item(prompt, [""])], chosen, timeout=timeout)
        return result.label_logprobs

    def iter_score_rolling(
        self,
        texts: Sequence[TokenInput],
        options: RollingOptions | None = None,
        *,
        timeout: float | None = None,
    ) -> Iterator[RollingResult]:
        """Whole-text log-likelihoods as the server streams them (not in input order)."""
        request = convert.rolling_request_to_pb(texts, options)
        stream = self._stream(self._stub.ScoreRolling, request, timeout)
        yield from map(convert.rolling_result_from_pb, stream)

    def score_rolling(
        self,
        texts: Sequence[TokenInput],
        options: RollingOptions | None = None,
        *,
        timeout: float | None = None,
    ) -> list[RollingResult]:
        """Log-likelihood, token count and perplexity of each whole text, in input order;
        texts longer than the context are scored in rolling windows (lm-eval's rule)."""
        results = self.iter_score_rolling(texts, options, timeout=timeout)
        return sorted(results, key=lambda r: r.text_index)

    def score_stream(
        self, requests: Iterable[ScoreRequest], *, timeout: float | None = None
    ) -> Iterator[ScoreResult]:
        """Many requests on one bidirectional stream; results carry request_index.
        Not retried: the requests iterable may not be replayable."""
        messages = (convert.request_to_pb(r) for r in requests)
        try:
            for message in self._stub.ScoreStream(messages, **self._call_options(timeout)):
                yield convert.result_from_pb(message)
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None

    def _unary(self, call: Callable[..., Any], request: object, timeout: float | None) -> Any:
        # A unary call seen as a one-message stream, so it shares the retry loop.
        as_stream = lambda *args, **kwargs: [call(*args, **kwargs)]  # noqa: E731
        [message] = self._stream(as_stream, request, timeout)
        return message

    def model_info(self, model: str = "", *, timeout: float | None = None) -> ModelInfo:
        """What the server says of `model` (empty: its first model); ModelNotFoundError for
        a name it does not serve."""
        request = pb.GetModelInfoRequest(model=model)
        return convert.model_info_from_pb(self._unary(self._stub.GetModelInfo, request, timeout))

    def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """Every model the server serves, the first being the one requests that name no
        model go to; each ModelInfo's `name` is what ScoreOptions.model selects it by."""
        response = self._unary(self._stub.ListModels, pb.ListModelsRequest(), timeout)
        return [convert.model_info_from_pb(message) for message in response.models]

    def is_server_ready(self, *, timeout: float = 1.0) -> bool:
        """True when the health service reports the server SERVING."""
        try:
            response = self._health.Check(
                health_pb2.HealthCheckRequest(), timeout=timeout, metadata=self._metadata
            )
        except grpc.RpcError:
            return False
        return response.status == health_pb2.HealthCheckResponse.SERVING

    def wait_until_ready(self, timeout: float = 60.0) -> None:
        """Block until the server is SERVING; ServerUnavailableError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not self.is_server_ready():
            if time.monotonic() > deadline:
                raise self._not_ready(timeout)
            time.sleep(0.1)
