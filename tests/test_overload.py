"""An overloaded server says when to come back (gRPC's retry pushback; HTTP's Retry-After),
and the project's clients wait that long and retry, where a request over a size limit is
not retried (issue 23)."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

from conftest import free_port, running_server
from lmscore.client import Item, ScoringClient, ScoringError
from lmscore.client.convert import build_request
from lmscore.client.retry import RETRY_PUSHBACK_KEY, RetryPolicy
from lmscore.v1 import scoring_pb2_grpc
from tiny_model import MAX_CONTEXT

# Enough work to keep the server's only admission slot busy for a while.
LONG = [Item(list(range(5, MAX_CONTEXT)), [[7]])] * 300


@dataclasses.dataclass(frozen=True)
class RecordingRetry(RetryPolicy):
    """Records each failure the client considered retrying."""

    failures: list[grpc.StatusCode] = dataclasses.field(default_factory=list)

    def retryable(self, error: grpc.RpcError) -> bool:  # type: ignore[override]
        self.failures.append(error.code())  # type: ignore[attr-defined]
        return super().retryable(error)


def busy(address: str) -> threading.Thread:
    """A thread holding the server's one admission slot with a long request."""

    def run() -> None:
        with ScoringClient(address, timeout=120) as client:
            client.score(LONG)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def wait_until_refused(address: str) -> grpc.RpcError:
    """The refusal a plain stub gets while the slot is taken (its metadata as sent)."""
    with grpc.insecure_channel(address) as channel:
        stub = scoring_pb2_grpc.ScorerStub(channel)
        for _ in range(200):
            try:
                list(stub.Score(build_request([Item("a", [" b"])], None)))
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    return error
            time.sleep(0.01)
    raise AssertionError("the server never refused")


def test_an_overloaded_server_pushes_back_and_clients_come_back(tiny_export: Path) -> None:
    http_port = free_port()
    flags = ("--max-concurrent-requests", "1", "--http-port", str(http_port))
    with running_server(tiny_export, *flags) as server:
        holder = busy(server.address)
        try:
            refused = wait_until_refused(server.address)
            assert dict(refused.trailing_metadata())[RETRY_PUSHBACK_KEY] == "250"
            assert "--max-concurrent-requests" in refused.details()

            request = urllib.request.Request(
                f"http://127.0.0.1:{http_port}/v1/completions",
                data=json.dumps({"prompt": "a"}).encode(),
                headers={"content-type": "application/json"},
            )
            with pytest.raises(urllib.error.HTTPError) as too_many:
                urllib.request.urlopen(request, timeout=30)
            assert too_many.value.code == 429
            assert too_many.value.headers["retry-after-ms"] == "250"
            assert too_many.value.headers["retry-after"] == "1"

            # The client retries after the pushback until the slot is free, and is served.
            retry = RecordingRetry(max_attempts=200, initial_backoff=0.01, max_backoff=0.02)
            began = time.monotonic()
            with ScoringClient(server.address, retry=retry, timeout=120) as client:
                [result] = client.score([Item("a", [" b"])])
            assert result.completion_tokens == 1
            refusals = retry.failures.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
            assert refusals >= 1
            # Each retry waited for the pushback, not for its own 10-20 ms backoff.
            assert time.monotonic() - began >= 0.25 * refusals
        finally:
            holder.join(timeout=120)


def test_a_request_over_a_size_limit_is_not_retried(tiny_export: Path) -> None:
    """RESOURCE_EXHAUSTED for a size limit comes without pushback: retrying cannot help."""
    with running_server(tiny_export, "--max-items-per-request", "2") as server:
        retry = RecordingRetry(max_attempts=5, initial_backoff=0.01)
        with (
            ScoringClient(server.address, retry=retry) as client,
            pytest.raises(ScoringError) as refused,
        ):
            client.score([Item("a", [" b"])] * 3)
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert retry.failures == [grpc.StatusCode.RESOURCE_EXHAUSTED]  # considered once
