"""Blocking client. AsyncScoringClient (lmscore.client.aio) has the same surface for asyncio."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lmscore.client.channel import TlsOptions, auth_metadata, sync_channel
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


class ScoringClient:
    """Client of an lmscore server. `target`: HOST:PORT, several replicas as IP:PORT,IP:PORT,...
    or dns:///NAME:PORT (calls spread over every address, round_robin). `timeout` (seconds) is
    the default deadline of every call; each call may pass its own. Calls retry on UNAVAILABLE
    only; a stream cut mid-way is replayed and yields only the results it had not yielded."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        token: str | None = None,
        tls: TlsOptions | None = None,
        channel: grpc.Channel | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self._channel = channel or sync_channel(target, tls)
        self._metadata = auth_metadata(token)
        self._stub = scoring_pb2_grpc.ScorerStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

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

    def _deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def _stream(
        self, call: object, request: object, timeout: float | None
    ) -> Iterator[pb.ScoreResult]:
        delays = self.retry.delays()
        # A replica that dies mid-stream: replay the call (round_robin sends it to another
        # replica) and skip the results already yielded.
        done: set[tuple[int, ...]] = set()
        while True:
            resumable = True
            try:
                for message in call(
                    request, timeout=self._deadline(timeout), metadata=self._metadata
                ):  # type: ignore[operator]
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
                time.sleep(delay)

    def iter_score(
        self,
        items: Sequence[Item],
        options: ScoreOptions | None = None,
        *,
        timeout: float | None = None,
    ) -> Iterator[ScoreResult]:
        """Results as the server streams them (not in input order)."""
        request = build_request(items, options)
        for message in self._stream(self._stub.Score, request, timeout):
            yield result_from_pb(message)

    def score(
        self,
        items: Sequence[Item],
        options: ScoreOptions | None = None,
        *,
        timeout: float | None = None,
    ) -> list[ScoreResult]:
        """One result per (item, completion), in input order."""
        return in_input_order(list(self.iter_score(items, options, timeout=timeout)))

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

    def iter_score_rolling(
        self,
        texts: Sequence[TokenInput],
        options: RollingOptions | None = None,
        *,
        timeout: float | None = None,
    ) -> Iterator[RollingResult]:
        """Whole-text log-likelihoods as the server streams them (not in input order)."""
        request = rolling_request_to_pb(texts, options)
        for message in self._stream(self._stub.ScoreRolling, request, timeout):
            yield rolling_result_from_pb(message)

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
        messages = (request_to_pb(r) for r in requests)
        try:
            for message in self._stub.ScoreStream(
                messages, timeout=self._deadline(timeout), metadata=self._metadata
            ):
                yield result_from_pb(message)
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        [message] = self._stream(
            _as_stream(self._stub.GetModelInfo), pb.GetModelInfoRequest(), timeout
        )
        return model_info_from_pb(message)

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
                raise ServerUnavailableError(
                    grpc.StatusCode.UNAVAILABLE, f"{self.target} not ready after {timeout:g} s"
                )
            time.sleep(0.1)


def _as_stream(unary: Callable[..., object]) -> Callable[..., Iterator[object]]:
    """A unary call seen as a one-message stream, so it shares the retry loop."""

    def call(request: object, **kwargs: Any) -> Iterator[object]:
        yield unary(request, **kwargs)

    return call
