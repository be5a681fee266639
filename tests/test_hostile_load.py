"""Hostile load on a real server: a second server on the same port, idle streams, huge
texts, response amplification, cancelled calls in the metrics. Each case took the server
out of service, or misled its operator, before the fix."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from conftest import LMSCORE, free_port, running_server
from lmscore.client import Item, ScoreOptions, ScoringClient, ScoringError
from lmscore.client.convert import build_request
from lmscore.server.app import load_model
from lmscore.server.config import EngineSettings, ServerConfig
from lmscore.server.planning import response_bytes
from lmscore.server.requests import ItemInput
from lmscore.server.servicer import _result_message
from lmscore.v1 import scoring_pb2 as pb
from lmscore.v1 import scoring_pb2_grpc

SCORE = "/lmscore.v1.Scorer/Score"


def serve_exits(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [LMSCORE, "serve", *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_a_second_server_on_a_used_port_exits_with_one_line(tiny_export: Path) -> None:
    metrics_port = free_port()
    with running_server(tiny_export, "--metrics-port", str(metrics_port)) as first:
        began = time.monotonic()
        second = serve_exits("--model", str(tiny_export), "--port", str(first.port))
        seconds = time.monotonic() - began
        third = serve_exits(
            "--model", str(tiny_export), "--port", str(free_port()), "--metrics-port",
            str(metrics_port),
        )  # fmt: skip
        with ScoringClient(first.address) as client:
            assert client.score([Item("still", [" serving"])])[0].completion_tokens > 0
    for run, port in ((second, first.port), (third, metrics_port)):
        assert run.returncode != 0
        assert "Traceback" not in run.stderr
        lines = run.stderr.strip().splitlines()
        assert lines[-1].startswith("lmscore serve: cannot ") and str(port) in lines[-1]
    assert seconds < 30  # it fails binding, before loading the model


def test_idle_streams_hold_no_slot_and_time_out(tiny_export: Path) -> None:
    """64 ScoreStreams that send nothing (the concurrency limit) leave Score working;
    an idle stream is ended after --stream-idle-timeout."""
    flags = ("--max-concurrent-requests", "64", "--stream-idle-timeout", "3")
    with running_server(tiny_export, *flags) as server:

        async def run() -> tuple[list[grpc.StatusCode], int]:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = scoring_pb2_grpc.ScorerStub(channel)
                never = asyncio.Event()

                async def nothing():
                    await never.wait()
                    yield pb.ScoreRequest()  # never reached

                streams = [stub.ScoreStream(nothing()) for _ in range(64)]
                await asyncio.sleep(0.5)
                request = pb.ScoreRequest(
                    items=[pb.ScoreItem(prompt="Hello", completions=[pb.Completion(text=" x")])]
                )
                results = [r async for r in stub.Score(request, timeout=10)]
                codes = []
                for stream in streams:
                    try:
                        async for _ in stream:
                            pass
                    except grpc.aio.AioRpcError as exc:
                        codes.append(exc.code())
                return codes, len(results)

        codes, scored = asyncio.run(run())
    assert scored == 1
    assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * 64


def test_health_answers_while_a_15_mb_prompt_is_refused(tiny_export: Path) -> None:
    with running_server(tiny_export, "--max-message-bytes", str(32 * 2**20)) as server:
        channel = grpc.insecure_channel(server.address)
        health = health_pb2_grpc.HealthStub(channel)
        seconds: list[float] = []
        stop = threading.Event()

        def probe() -> None:
            while not stop.is_set():
                began = time.monotonic()
                health.Check(health_pb2.HealthCheckRequest(), timeout=10)
                seconds.append(time.monotonic() - began)
                time.sleep(0.02)

        prober = threading.Thread(target=probe)
        prober.start()
        try:
            with ScoringClient(server.address) as client:
                for _ in range(3):
                    with pytest.raises(ScoringError) as error:
                        client.score(
                            [Item("word " * 3_000_000, [" end"])],
                            ScoreOptions(truncate_prompt_left=True),
                        )
                    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
                    assert "1048576" in error.value.field_violations["items[0].prompt"]
                # A text within the limit (1 MB) is tokenized off the event loop.
                results = client.score(
                    [Item("word " * 200_000, [" one", " two"])],
                    ScoreOptions(truncate_prompt_left=True),
                )
        finally:
            stop.set()
            prober.join()
            channel.close()
    assert [r.truncated_prompt_tokens > 0 for r in results] == [True, True]
    assert len(seconds) > 10 and max(seconds) < 0.5


def test_request_id_cap_and_response_budget(tiny_export: Path) -> None:
    metrics_port = free_port()
    flags = ("--max-response-bytes", "200000", "--metrics-port", str(metrics_port))
    with running_server(tiny_export, *flags) as server, ScoringClient(server.address) as client:
        channel = grpc.insecure_channel(server.address)
        stub = scoring_pb2_grpc.ScorerStub(channel)
        request = build_request([Item("a", [" b"])], None)
        request.request_id = "r" * 257
        with pytest.raises(grpc.RpcError) as rpc_error:
            list(stub.Score(request, timeout=10))
        assert rpc_error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert rpc_error.value.details().startswith("request_id: 257 bytes exceed the limit of 256")
        request.request_id = "r" * 256
        assert [r.request_id for r in stub.Score(request, timeout=10)] == ["r" * 256]
        channel.close()
        # 256 completions with token details and top-20: megabytes out for kilobytes in.
        amplifying = [Item("The licensee may", [f" copy {i}" for i in range(256)])]
        with pytest.raises(ScoringError) as error:
            client.score(amplifying, ScoreOptions(token_details=True, top_k=20))
        assert error.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit of 200000 bytes" in error.value.field_violations["items"]
        runs = scrape(metrics_port, "lmscore_batch_sequences_count")
        # The same without token details fits.
        assert len(client.score(amplifying)) == 256
    assert runs == 1  # the accepted request_id call's run: the refused request ran nothing


def scrape(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    )


def test_response_estimate_follows_the_real_messages(tiny_export: Path) -> None:
    """The budget's estimate against the serialized results, with and without details."""
    loaded = load_model(ServerConfig(model_dir=tiny_export, engine=EngineSettings()))
    items = [
        ItemInput("The licensee may copy", [" the Program", " nothing at all, ever"]),
        ItemInput("Ünïcödé prompt ", ["ωμέγα", ""]),
    ]
    try:
        for options in (
            ScoreOptions(),
            ScoreOptions(token_details=True, top_k=5),
            ScoreOptions(token_details=True, pmi=True),
        ):
            plan = loaded.engine.plan(items, options, request_id="run-42")
            request = pb.ScoreRequest(request_id="run-42")
            actual = sum(
                _result_message(r, request, 0).ByteSize() for r in loaded.engine.score_sync(plan)
            )
            estimate = response_bytes(plan, "run-42")
            assert actual <= estimate <= 3 * actual, (options, actual, estimate)
    finally:
        loaded.engine.close()


def test_cancelled_calls_are_counted_as_cancelled(tiny_export: Path) -> None:
    metrics_port = free_port()
    flags = ("--max-batch-tokens", "32", "--metrics-port", str(metrics_port))
    items = [Item(f"Item {i} of many says", [f" number {i} is here"]) for i in range(200)]
    with running_server(tiny_export, *flags) as server:
        channel = grpc.insecure_channel(server.address)
        call = scoring_pb2_grpc.ScorerStub(channel).Score(build_request(items, None))
        next(call)
        call.cancel()
        channel.close()
        time.sleep(1.0)
        cancelled = scrape_labeled(metrics_port, "lmscore_requests_total", SCORE, "CANCELLED")
        ok = scrape_labeled(metrics_port, "lmscore_requests_total", SCORE, "OK")
    assert (cancelled, ok) == (1, 0)


def scrape_labeled(port: int, name: str, method: str, code: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and {"method": method, "code": code}.items() <= sample.labels.items()
    )
