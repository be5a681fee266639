"""Scale-out: one client, three replicas on loopback. round_robin spreads the calls (each
replica's metrics show its share), and a replica SIGKILLed mid-run loses no result."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import ServerProcess, free_port
from lmscore.client import AsyncScoringClient, Item, RetryPolicy, ScoreResult, ScoringClient
from lmscore.client.channel import grpc_target
from lmscore.v1 import scoring_pb2 as pb

SCORE = "/lmscore.v1.Scorer/Score"
SMALL = [[Item(f"Request {r} says", [f" number {r}", " nothing"])] for r in range(30)]
# Several model runs per request (--max-batch-tokens 64), so results stream over time.
MEDIUM = [
    [Item(f"Request {r}, item {i} says", [f" number {i}", " nothing at all"]) for i in range(6)]
    for r in range(60)
]
# Long enough (--max-batch-tokens 32: ~150 model runs) to still be streaming when killed.
LARGE = [Item(f"Item {i} of the batch says", [f" number {i} is here"]) for i in range(300)]


@dataclasses.dataclass
class Replica:
    server: ServerProcess
    metrics_port: int

    def scrape(self, name: str, **labels: str) -> float:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and labels.items() <= sample.labels.items()
        )

    def score_calls(self) -> float:
        return self.scrape("lmscore_requests_total", method=SCORE, code="OK")


@contextlib.contextmanager
def three_replicas(model_dir: Path, *extra: str) -> Iterator[list[Replica]]:
    replicas: list[Replica] = []
    try:
        for _ in range(3):  # all three load the model at the same time
            port = free_port()
            server = ServerProcess(model_dir, "--metrics-port", str(port), *extra)
            replicas.append(Replica(server, port))
        for replica in replicas:
            replica.server.wait_ready()
        yield replicas
    finally:
        for replica in replicas:
            replica.server.stop()


def target(replicas: list[Replica]) -> str:
    return ",".join(r.server.address for r in replicas)


@dataclasses.dataclass(frozen=True)
class CountingRetry(RetryPolicy):
    """Records every failure the client considered retrying."""

    failures: list[grpc.StatusCode] = dataclasses.field(default_factory=list)

    def retryable(self, error: grpc.RpcError) -> bool:  # type: ignore[override]
        self.failures.append(error.code())  # type: ignore[attr-defined]
        return super().retryable(error)


def assert_same(results: list[ScoreResult], reference: list[ScoreResult]) -> None:
    """Complete, no duplicate, and the scores of the single-server reference."""

    def keys(rs: list[ScoreResult]) -> list[tuple[int, int, int, int]]:
        return [
            (r.item_index, r.completion_index, r.prompt_tokens, r.completion_tokens) for r in rs
        ]

    def scores(rs: list[ScoreResult]) -> list[float]:
        return [x for r in rs for x in (r.joint_logprob, r.marginal_logprob, r.conditional_logprob)]

    results = sorted(results, key=lambda r: (r.item_index, r.completion_index))
    assert keys(results) == keys(reference)
    assert scores(results) == pytest.approx(scores(reference), abs=1e-9)


def test_targets_naming_several_replicas() -> None:
    assert grpc_target("127.0.0.1:1,127.0.0.2:2") == "ipv4:127.0.0.1:1,127.0.0.2:2"
    assert grpc_target("[::1]:1, [::1]:2") == "ipv6:[::1]:1,[::1]:2"
    for unchanged in ["localhost:50051", "dns:///lmscore.ns.svc.cluster.local:50051", "ipv4:a,b"]:
        assert grpc_target(unchanged) == unchanged
    for bad in ["host-a:1,host-b:1", "127.0.0.1:1,[::1]:1", "127.0.0.1:1,127.0.0.1"]:
        with pytest.raises(ValueError):
            grpc_target(bad)


class Cut(grpc.RpcError):
    """UNAVAILABLE, as when the replica serving the stream dies."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "Socket closed"


def test_a_stream_cut_mid_way_is_replayed_without_repeats() -> None:
    calls: list[int] = []

    def messages() -> Iterator[pb.ScoreResult]:
        calls.append(1)
        yield from (pb.ScoreResult(item_index=i) for i in range(2))
        if len(calls) < 3:
            raise Cut()
        yield pb.ScoreResult(item_index=2)

    async def async_call(request: object, **_: object) -> AsyncIterator[pb.ScoreResult]:
        for message in messages():
            yield message

    retry = RetryPolicy(initial_backoff=0.01)
    with ScoringClient("127.0.0.1:1", retry=retry) as client:
        got = client._stream(lambda request, **_: messages(), None, None)
        assert [m.item_index for m in got] == [0, 1, 2] and len(calls) == 3

    async def run() -> list[int]:
        async with AsyncScoringClient("127.0.0.1:1", retry=retry) as client:
            return [m.item_index async for m in client._stream(async_call, None, None)]

    calls.clear()
    assert asyncio.run(run()) == [0, 1, 2] and len(calls) == 3


def test_load_spreads_and_a_killed_replica_loses_no_result(tiny_export: Path) -> None:
    with three_replicas(tiny_export, "--max-batch-tokens", "64") as replicas:
        with ScoringClient(replicas[0].server.address) as single:
            reference = [single.score(items) for items in MEDIUM]
        before = [r.score_calls() for r in replicas]
        retry = CountingRetry()
        with ScoringClient(target(replicas), retry=retry, timeout=60) as client:
            client.wait_until_ready()
            for items in SMALL:
                client.score(items)
            served = [r.score_calls() - b for r, b in zip(replicas, before, strict=True)]
            assert sum(served) == len(SMALL) and min(served) >= len(SMALL) / 5, served

            # Six threads keep requests in flight on every replica; one dies a third of the way.
            results: dict[int, list[ScoreResult]] = {}
            errors: list[Exception] = []
            todo = iter(range(len(MEDIUM)))
            lock = threading.Lock()
            third_done = threading.Event()

            def work() -> None:
                while True:
                    with lock:
                        index = next(todo, None)
                    if index is None:
                        return
                    try:
                        scored = client.score(MEDIUM[index])
                    except Exception as exc:
                        errors.append(exc)
                        return
                    with lock:
                        results[index] = scored
                        if len(results) == len(MEDIUM) // 3:
                            third_done.set()

            threads = [threading.Thread(target=work) for _ in range(6)]
            for thread in threads:
                thread.start()
            assert third_done.wait(timeout=60)
            replicas[1].server.process.kill()
            for thread in threads:
                thread.join(timeout=60)
        assert errors == []
        assert retry.failures and set(retry.failures) == {grpc.StatusCode.UNAVAILABLE}
        assert sorted(results) == list(range(len(MEDIUM)))
        for index, scored in results.items():
            assert_same(scored, reference[index])


def test_async_client_resumes_streams_cut_mid_way(tiny_export: Path) -> None:
    with three_replicas(tiny_export, "--max-batch-tokens", "32") as replicas:
        with ScoringClient(replicas[0].server.address) as single:
            reference = single.score(LARGE)
        before = [r.score_calls() for r in replicas]
        retry = CountingRetry()

        async def run() -> list[list[ScoreResult]]:
            async with AsyncScoringClient(target(replicas), retry=retry, timeout=60) as client:
                await client.wait_until_ready()
                for items in SMALL:
                    await client.score(items)
                served = [r.score_calls() - b for r, b in zip(replicas, before, strict=True)]
                assert sum(served) == len(SMALL) and min(served) >= len(SMALL) / 5, served

                # round_robin puts one stream on each replica; each has sent a result when
                # replica 1 dies, so one stream is cut mid-way and must resume elsewhere.
                streams = [client.iter_score(LARGE) for _ in replicas]
                firsts = [await stream.__anext__() for stream in streams]
                assert [r.scrape("lmscore_requests_in_flight") for r in replicas] == [1, 1, 1]
                replicas[1].server.process.kill()
                return [
                    [first, *[r async for r in stream]]
                    for first, stream in zip(firsts, streams, strict=True)
                ]

        for results in asyncio.run(run()):
            assert_same(results, reference)
        assert retry.failures and set(retry.failures) == {grpc.StatusCode.UNAVAILABLE}
