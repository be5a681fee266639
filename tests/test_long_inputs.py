"""Long inputs: fused attention in the export, chunked prefill equal to one pass (and to
PyTorch), a deadline that stops a long run between chunks while other requests interleave,
and memory that comes back after a burst.

The tiny sliding-window model checks the rules fast (a window of 16 tokens, sequences of
150); the default model checks them at a realistic size (1,500-8,000 tokens)."""

from __future__ import annotations

import asyncio
import re
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import free_port, rss_mb, running_server
from lmscore.client import Item, ScoringClient
from lmscore.client import ScoreOptions as ClientOptions
from lmscore.export.attention import FUSED_DOMAIN, FUSED_OP
from lmscore.export.manifest import TOKENIZER_NAME, Manifest
from lmscore.server.config import EngineSettings
from lmscore.server.engine import ScoringEngine
from lmscore.server.requests import ItemInput, ModelFacts
from lmscore.server.runtime import OnnxCausalLM
from lmscore.server.tokenization import TextTokenizer
from lmscore.v1 import scoring_pb2 as pb
from lmscore.v1 import scoring_pb2_grpc
from lmscore.v1.options import RollingOptions, ScoreOptions
from reference import sequence_logprobs
from tiny_model import SLIDING_WINDOW, build_sliding_window_model_dir

TOLERANCE = 1e-4
LICENSE = Path("/usr/share/common-licenses/GPL-3")


def engine_for(model_dir: Path, runtime: OnnxCausalLM, **settings: int) -> ScoringEngine:
    manifest = Manifest.read(model_dir)
    facts = ModelFacts(
        max_context=manifest.max_context,
        vocab_size=manifest.vocab_size,
        bos_token_id=manifest.bos_token_id,
        eos_token_id=manifest.eos_token_id,
    )
    tokenizer = TextTokenizer(model_dir / TOKENIZER_NAME)
    return ScoringEngine(runtime, tokenizer, facts, EngineSettings(**settings))


def fused_nodes(model_dir: Path) -> int:
    import onnx

    graph = onnx.load(str(model_dir / "model.onnx"), load_external_data=False).graph
    return sum(1 for n in graph.node if n.op_type == FUSED_OP and n.domain == FUSED_DOMAIN)


def scored_rows(engine: ScoringEngine, items: list[ItemInput]) -> list[tuple[float, ...]]:
    """(joint, marginal, conditional, every token's log-prob) of each result."""
    plan = engine.plan(items, ScoreOptions(token_details=True))
    return [
        (
            r.joint_logprob,
            r.marginal_logprob,
            r.conditional_logprob,
            *(t.logprob for t in r.tokens[1:]),
        )
        for r in engine.score_sync(plan)
    ]


def rolling_logprobs(engine: ScoringEngine, text: str, window: int) -> list[float]:
    plan = engine.plan_rolling([text], RollingOptions(max_window_tokens=window))

    async def run() -> list[float]:
        return [r.logprob async for r in engine.score_rolling(plan)]

    return asyncio.run(run())


def assert_rows_close(got: list[tuple[float, ...]], want: list[tuple[float, ...]]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert len(a) == len(b)
        np.testing.assert_allclose(a, b, atol=TOLERANCE, rtol=0)


@pytest.fixture(scope="module")
def sliding_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from lmscore.export.convert import export_model

    hf_dir = build_sliding_window_model_dir(tmp_path_factory.mktemp("sliding-hf") / "mistral")
    output = tmp_path_factory.mktemp("sliding-onnx") / "mistral"
    export_model(str(hf_dir), output, progress=False)
    return hf_dir, output


def test_export_fuses_attention_in_every_layer(tiny_export: Path, sliding_export) -> None:
    for model_dir in (tiny_export, sliding_export[1]):
        manifest = Manifest.read(model_dir)
        assert manifest.layers == 2
        assert manifest.fused_attention_layers == 2 == fused_nodes(model_dir)


def test_sliding_window_chunked_prefill_equals_one_pass_and_pytorch(sliding_export) -> None:
    from transformers import AutoModelForCausalLM

    hf_dir, model_dir = sliding_export
    runtime = OnnxCausalLM(model_dir)
    one_pass = engine_for(model_dir, runtime, prefill_chunk_tokens=0, min_prefix_reuse_tokens=1)
    ids = one_pass.tokenizer.encode(LICENSE.read_text())[:150]
    items = [
        ItemInput(ids[:90], [ids[90:149]]),  # one full pass of 150 tokens with BOS
        ItemInput(ids[:120], [ids[120:140], ids[120:123], ids[120:149]]),  # prefix reuse
        ItemInput(ids[5:30], [ids[30:60]]),  # short: batched with the long rows
    ]
    plan = one_pass.plan(items, ScoreOptions())
    assert plan.prefix_groups and plan.full_passes
    want = scored_rows(one_pass, items)
    text = re.sub(r"\s+", " ", LICENSE.read_text()[:3000])
    rolling_want = rolling_logprobs(one_pass, text, window=100)

    # PyTorch on the same weights, sliding window and all: the one-pass figures.
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    assert model.config.sliding_window == SLIDING_WINDOW
    bos = [Manifest.read(model_dir).bos_token_id]
    pairs = [(items[0], 0), (items[1], 0), (items[1], 1), (items[1], 2), (items[2], 0)]
    for row, (item, completion) in zip(want, pairs, strict=True):
        sequence = bos + list(item.prompt) + list(item.completions[completion])
        logprobs, _, _ = sequence_logprobs(model, sequence)
        assert row[0] == pytest.approx(float(logprobs.sum()), abs=TOLERANCE)
        np.testing.assert_allclose(row[3:], logprobs, atol=TOLERANCE, rtol=0)

    for chunk in (7, 32, 50):
        chunked = engine_for(
            model_dir, runtime, prefill_chunk_tokens=chunk, min_prefix_reuse_tokens=1
        )
        assert_rows_close(scored_rows(chunked, items), want)
        np.testing.assert_allclose(
            rolling_logprobs(chunked, text, window=100), rolling_want, atol=TOLERANCE, rtol=0
        )
        assert chunked.stats().chunk_runs > 0


# --- the default model, at realistic sizes -------------------------------------------------


@pytest.mark.e2e
def test_default_model_chunked_prefill_equals_one_pass_and_pytorch(
    exported_default: Path, torch_default
) -> None:
    model, _ = torch_default
    assert fused_nodes(exported_default) == Manifest.read(exported_default).layers == 30
    runtime = OnnxCausalLM(exported_default)
    one_pass = engine_for(exported_default, runtime, prefill_chunk_tokens=0)
    ids = one_pass.tokenizer.encode(LICENSE.read_text())[:1700]
    items = [
        ItemInput(ids[:1200], [ids[1200:1500]]),  # 1,501 tokens in one full pass
        # A 1,600-token prompt shared by three completions: prefix reuse.
        ItemInput(ids[:1600], [ids[1600:1610], ids[1600:1630], ids[1600:1700]]),
    ]
    assert one_pass.plan(items, ScoreOptions()).prefix_groups
    want = scored_rows(one_pass, items)
    logprobs, _, _ = sequence_logprobs(model, [1, *ids[:1500]])
    assert want[0][0] == pytest.approx(float(logprobs.sum()), abs=1e-3)
    np.testing.assert_allclose(want[0][3:], logprobs, atol=1e-3, rtol=0)
    for chunk in (100, 256, 700):
        chunked = engine_for(exported_default, runtime, prefill_chunk_tokens=chunk)
        assert_rows_close(scored_rows(chunked, items), want)
        assert chunked.stats().chunk_runs >= 1500 // chunk


def scrape(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    return 0.0


@pytest.mark.e2e
def test_deadline_stops_a_long_run_between_chunks_while_others_interleave(
    exported_default: Path,
) -> None:
    """8,000 token ids (within the context), a 4 s deadline: DEADLINE_EXCEEDED, the run
    stopped at a chunk boundary (chunks counted), a short request and health checks from
    other clients answered meanwhile, and the model idle again right after."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    metrics_port = free_port()
    flags = ("--prefill-chunk-tokens", "128", "--metrics-port", str(metrics_port))
    long_ids = [int(t) for t in np.random.default_rng(0).integers(100, 49000, 8000)]
    with running_server("default", *flags) as server:
        channel = grpc.insecure_channel(server.address)
        stub = scoring_pb2_grpc.ScorerStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        request = pb.ScoreRequest(
            items=[
                pb.ScoreItem(
                    prompt_token_ids=pb.TokenIds(ids=long_ids[:10]),
                    completions=[pb.Completion(token_ids=pb.TokenIds(ids=long_ids[10:]))],
                )
            ]
        )
        outcome: dict[str, object] = {}

        def long_call() -> None:
            began = time.monotonic()
            try:
                list(stub.Score(request, timeout=4.0))
            except grpc.RpcError as exc:
                outcome["code"] = exc.code()
            outcome["seconds"] = time.monotonic() - began

        caller = threading.Thread(target=long_call)
        caller.start()
        time.sleep(1.0)
        health_seconds = []
        with ScoringClient(server.address) as client:
            began = time.monotonic()
            short = client.score([Item("The licensee", [" may copy"])])
            short_seconds = time.monotonic() - began
            while caller.is_alive():
                began = time.monotonic()
                health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                health_seconds.append(time.monotonic() - began)
                time.sleep(0.05)
            caller.join()
            assert outcome["code"] == grpc.StatusCode.DEADLINE_EXCEEDED
            # The run stops at its next chunk: within about one chunk of the deadline.
            time.sleep(1.5)
            began = time.monotonic()
            client.score([Item("The licensee", [" may copy"])])
            after_seconds = time.monotonic() - began
        channel.close()
        chunks = scrape(metrics_port, "lmscore_prefill_chunks_total")
        abandoned = scrape(metrics_port, "lmscore_runs_abandoned_total")
    assert short[0].completion_tokens == 2 and short_seconds < 2.0
    assert max(health_seconds) < 0.5
    assert after_seconds < 1.0
    assert abandoned == 1
    assert 0 < chunks < 8000 // 128  # stopped part way: not every chunk ran


@pytest.mark.e2e
@pytest.mark.parametrize("flags", [(), ("--no-cpu-arena",)], ids=["arena", "no-arena"])
def test_memory_comes_back_after_a_burst_of_large_requests(
    exported_default: Path, flags: tuple[str, ...]
) -> None:
    """After four concurrent requests of 8 x 1,000 tokens each, RSS falls back to within
    20 % of the warmed-up figure: the heap trimmed, and ONNX Runtime's arena shrunk."""
    ids = [int(t) for t in np.random.default_rng(1).integers(100, 49000, 1000)]
    large = [Item(ids[: 10 + i], [ids[10 + i : 1000]]) for i in range(8)]
    with running_server("default", *flags) as server, ScoringClient(server.address) as client:
        client.score([Item("Warm", [" up"])])
        time.sleep(1.5)
        baseline = rss_mb(server.process.pid)

        async def burst() -> None:
            from lmscore.client import AsyncScoringClient

            async with AsyncScoringClient(server.address) as aclient:
                await asyncio.gather(*(aclient.score(large) for _ in range(4)))

        asyncio.run(burst())
        time.sleep(2.5)  # idle: the model thread trims the heap
        after = rss_mb(server.process.pid)
    assert after <= 1.2 * baseline, f"RSS {after:.0f} MB after the burst, {baseline:.0f} before"


def sporadic_batch(seed: int, vocabulary: int = 49_000) -> list[Item]:
    """The sporadic-traffic tests' batch: 8 items of 100 random prompt ids and 28 completion
    ids (1,024 positions), ids below `vocabulary`."""
    ids = [int(t) for t in np.random.default_rng(seed).integers(100, vocabulary, 8 * 128)]
    return [
        Item(ids[i * 128 : i * 128 + 100], [ids[i * 128 + 100 : (i + 1) * 128]]) for i in range(8)
    ]


@pytest.mark.e2e
def test_sporadic_batches_keep_their_memory_until_the_hold_ends(exported_default: Path) -> None:
    """A batch every 2 s (issue 23): the first one's memory goes back after it (a burst:
    nothing before needed as much), the next one's is kept through the idle gap for the batch
    after it, and all of it goes back once the server has been idle for --memory-hold."""
    hold = 5.0
    batch = sporadic_batch(2)
    flags = ("--memory-hold", str(hold))
    with running_server("default", *flags) as server, ScoringClient(server.address) as client:
        client.score([Item("Warm", [" up"])])
        time.sleep(1.5)
        baseline = rss_mb(server.process.pid)
        client.score(batch)
        time.sleep(2.0)
        after_first = rss_mb(server.process.pid)
        client.score(batch)
        time.sleep(2.0)
        held = rss_mb(server.process.pid)
        time.sleep(hold + 1.0)
        after_hold = rss_mb(server.process.pid)
    figures = f"RSS {baseline:.0f} MB warmed up, {after_first:.0f}, {held:.0f}, {after_hold:.0f}"
    assert after_first <= 1.2 * baseline, figures
    assert held > baseline + 300, figures  # the head's buffers of 1,024 tokens: ~0.8 GB
    assert after_hold <= 1.2 * baseline, figures


@pytest.mark.e2e
def test_without_a_hold_every_batch_gives_its_memory_back(exported_default: Path) -> None:
    """--memory-hold 0 (a tight memory limit): each batch's arena goes back after it, the
    third as the first. (Once, only the first did: the arena's next region, as large as a
    batch's buffers, also held results the batcher or the shrinking run still referenced.)"""
    batch = sporadic_batch(3)
    with (
        running_server("default", "--memory-hold", "0") as server,
        ScoringClient(server.address) as client,
    ):
        client.score([Item("Warm", [" up"])])
        time.sleep(1.5)
        baseline = rss_mb(server.process.pid)
        after = []
        for _ in range(3):
            client.score(batch)
            time.sleep(2.0)
            after.append(rss_mb(server.process.pid))
    assert max(after) <= 1.2 * baseline, f"RSS {baseline:.0f} MB warmed up, then {after}"


@pytest.mark.e2e
def test_two_models_taking_turns_each_keep_their_memory_until_the_hold_ends(
    exported_default: Path, exported_gemma: Path
) -> None:
    """Sporadic batches to two models of one server in turn (SmolLM2, then Gemma-3 with its
    262,144 words): their arenas are separate but their RSS is one. By the fourth round
    neither model's batch memory goes back between its visits (Gemma-3's first batch grows
    RSS by less than its next ones, so the hold takes its third); all of it goes back once
    both models have been idle for --memory-hold."""
    hold = 15.0
    batches = {"": sporadic_batch(4), "gemma": sporadic_batch(5, vocabulary=260_000)}
    flags = ("--model", f"gemma={exported_gemma}", "--memory-hold", str(hold))
    with running_server("default", *flags) as server, ScoringClient(server.address) as client:
        for model in batches:
            client.score([Item("Warm", [" up"])], ClientOptions(model=model))
        time.sleep(1.5)
        baseline = rss_mb(server.process.pid)
        after = []
        for _ in range(4):
            for model, items in batches.items():
                client.score(items, ClientOptions(model=model))
                time.sleep(1.5)
                after.append(rss_mb(server.process.pid))
        time.sleep(hold + 1.0)
        after_hold = rss_mb(server.process.pid)
    figures = f"RSS {baseline:.0f} MB warmed up, {[round(mb) for mb in after]}, {after_hold:.0f}"
    # Round 4: both arenas kept (Gemma-3's ~1 GB for 1,024 positions, SmolLM2's ~0.25 GB).
    assert min(after[6:]) > baseline + 1000, figures
    assert after_hold <= 1.2 * baseline, figures


def test_a_big_vocabulary_bounds_the_positions_of_a_run(tiny_export: Path) -> None:
    """--max-logits-bytes: a batch whose [tokens, vocab] scores would exceed it runs in chunks
    of positions (here 40 tokens of the 512-word vocabulary), with the one-pass numbers."""
    runtime = OnnxCausalLM(tiny_export)
    shapes: list[tuple[int, int]] = []

    class Recording:
        def score(self, input_ids, *args, **kwargs):  # type: ignore[no-untyped-def]
            shapes.append(input_ids.shape)
            return runtime.score(input_ids, *args, **kwargs)

        def shrink_arena(self) -> bool:
            return runtime.shrink_arena()

    ids = TextTokenizer(tiny_export / TOKENIZER_NAME).encode(LICENSE.read_text())
    items = [
        ItemInput(ids[i * 70 : i * 70 + 30], [ids[i * 70 + 30 : i * 70 + 60]]) for i in range(4)
    ]
    unbounded = engine_for(tiny_export, runtime, prefill_chunk_tokens=0)
    bounded = engine_for(
        tiny_export, Recording(), prefill_chunk_tokens=0, max_logits_bytes=4 * 512 * 40
    )  # type: ignore[arg-type]
    assert bounded.max_run_tokens == 40
    assert_rows_close(scored_rows(bounded, items), scored_rows(unbounded, items))
    assert shapes and all(rows * width <= 40 for rows, width in shapes)
    assert bounded.stats().chunk_runs > 0
