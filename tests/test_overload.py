"""An overloaded server queues what it can (--max-waiting-requests) and says when to come
back for the rest (gRPC's retry pushback; HTTP's Retry-After), and the project's clients
wait that long and retry, where a request over a size limit is not retried (issue 23)."""

from __future__ import annotations

import dataclasses
import json
import math
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

from conftest import free_port, running_server
from lmscore.client import Item, ScoreOptions, ScoringClient, ScoringError
from lmscore.client.convert import build_request
from lmscore.client.retry import RETRY_PUSHBACK_KEY, RetryPolicy
from lmscore.server.servicer import MAX_RETRY_PUSHBACK_MS, MIN_RETRY_PUSHBACK_MS, AnswerRate
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
    flags = (
        "--max-concurrent-requests",
        "1",
        "--max-waiting-requests",
        "0",
        "--http-port",
        str(http_port),
    )
    with running_server(tiny_export, *flags) as server:
        holder = busy(server.address)
        try:
            refused = wait_until_refused(server.address)
            pushback_ms = int(dict(refused.trailing_metadata())[RETRY_PUSHBACK_KEY])
            assert MIN_RETRY_PUSHBACK_MS <= pushback_ms <= MAX_RETRY_PUSHBACK_MS
            assert "--max-concurrent-requests" in refused.details()

            request = urllib.request.Request(
                f"http://127.0.0.1:{http_port}/v1/completions",
                data=json.dumps({"prompt": "a"}).encode(),
                headers={"content-type": "application/json"},
            )
            with pytest.raises(urllib.error.HTTPError) as too_many:
                urllib.request.urlopen(request, timeout=30)
            assert too_many.value.code == 429
            retry_after_ms = int(too_many.value.headers["retry-after-ms"])
            assert retry_after_ms >= MIN_RETRY_PUSHBACK_MS
            assert too_many.value.headers["retry-after"] == str(math.ceil(retry_after_ms / 1000))

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


def test_requests_past_the_limit_wait_for_a_slot_in_order(tiny_export: Path) -> None:
    """One slot, room for one to wait: the second request waits and is answered after the
    first; a third is refused naming --max-waiting-requests; a waiting request whose
    deadline passes leaves the wait, and the next one takes its place."""
    flags = ("--max-concurrent-requests", "1", "--max-waiting-requests", "1")
    # 600 different sequences with token details: seconds of work on the tiny model.
    sequences = [[(i + 3 * j) % 250 + 5 for j in range(MAX_CONTEXT - 6)] for i in range(600)]
    hold_items = [Item(ids, [[7]]) for ids in sequences]
    hold = build_request(hold_items, ScoreOptions(token_details=True, top_k=5))
    small = build_request([Item("a", [" b"])], None)
    with (
        running_server(tiny_export, *flags) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        stub = scoring_pb2_grpc.ScorerStub(channel)
        holding = stub.Score(hold, timeout=120)
        next(holding)
        finished: list[str] = []

        def waiter() -> None:
            with ScoringClient(server.address, timeout=120) as client:
                client.score([Item("a", [" b"])])
            finished.append("waiter")

        thread = threading.Thread(target=waiter)
        thread.start()
        time.sleep(1.5)  # the waiter has connected and taken the place to wait
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Score(small, timeout=60))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-waiting-requests 1" in refused.value.details()
        assert finished == []
        assert len(list(holding)) == len(hold_items) - 1
        finished.append("holder")
        thread.join(timeout=120)
        assert finished == ["holder", "waiter"]

        # A waiting call past its deadline leaves the wait; the next one waits instead.
        holding = stub.Score(hold, timeout=120)
        next(holding)
        with pytest.raises(grpc.RpcError) as expired:
            list(stub.Score(small, timeout=0.5))
        assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        answered: list[int] = []
        thread = threading.Thread(
            target=lambda: answered.extend(
                r.completion_tokens for r in stub.Score(small, timeout=120)
            )
        )
        thread.start()
        time.sleep(0.5)
        assert answered == []  # waiting, not refused
        list(holding)
        thread.join(timeout=120)
        assert answered == [1]


def test_pushback_is_the_time_the_calls_ahead_take_at_the_recent_rate() -> None:
    """An overloaded server asks a client back when the calls ahead of it should be done:
    their number over the answer rate of the last seconds, within 250 ms and 30 s; without
    a rate to go by (fewer than 8 answers lately), the least."""
    rate = AnswerRate()
    assert rate.pushback_ms(ahead=320) == MIN_RETRY_PUSHBACK_MS
    for _ in range(50):  # 10 answers a second over the 5 s window
        rate.answered()
    assert rate.pushback_ms(ahead=64) == 6400
    assert rate.pushback_ms(ahead=1) == MIN_RETRY_PUSHBACK_MS
    assert rate.pushback_ms(ahead=100_000) == MAX_RETRY_PUSHBACK_MS
