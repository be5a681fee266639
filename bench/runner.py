"""`lmscore bench`: every path measured side by side in one run, reported as ratios.

Paths: PyTorch eager on the same weights (what lm-eval's HFLM does), ONNX
Runtime in-process (the engine without gRPC), the full gRPC path through the
client (a real `lmscore serve` process), the same server's HTTP port (the Score RPC
as JSON, OpenAI's /v1/completions, and lm-eval's local-completions on a
multiple-choice task beside `lmscore eval`), and the quantized variant when one is
exported. Each timing is repeated after a warm-up; the report gives median, min
and max. The paths run one after another, never at the same time, so they do
not compete for the cores.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from lmscore.bench import overload
from lmscore.bench.after_idle import measure_after_idle, server_calls
from lmscore.bench.harness import (
    ServerUnderTest,
    Timing,
    as_client_item,
    cpu_description,
    percentile,
    pytorch_runs,
    timed,
    token_ids,
)
from lmscore.bench.http_paths import LM_EVAL, SCORING, HttpScorer
from lmscore.bench.lm_eval_wall import measure_lm_eval
from lmscore.bench.workloads import Workloads, build_workloads
from lmscore.client import Item, ScoringClient
from lmscore.client import ScoreOptions as ClientOptions
from lmscore.export.manifest import Manifest, model_bytes
from lmscore.server.app import load_model, warm_up
from lmscore.server.config import MEMORY_HOLD_S, ServerConfig
from lmscore.server.engine import ScoringEngine
from lmscore.server.requests import ItemInput
from lmscore.v1.options import ScoreOptions


def _sequence(item: ItemInput) -> list[int]:
    """An item's prompt and first completion as one list of token ids."""
    prompt = [] if item.prompt is None else token_ids(item.prompt)
    return prompt + token_ids(item.completions[0])


def _in_process(engine: ScoringEngine, items: list[ItemInput], options: ScoreOptions) -> list:
    return engine.score_sync(engine.plan(items, options))


def measure_in_process(engine: ScoringEngine, work: Workloads, repeats: int) -> dict[str, Any]:
    options = ScoreOptions()
    batch = timed(lambda: _in_process(engine, work.batch, options), repeats)
    naive_options = ScoreOptions(marginal_mode="separate_pass")
    completions = list(work.choice.completions)

    def naive() -> list:
        # Without prefix reuse: per completion, a joint pass over [x, y] and a marginal pass
        # over x.
        return [
            _in_process(engine, [ItemInput(work.choice.prompt, [c])], naive_options)[0]
            for c in completions
        ]

    def reuse() -> list:
        return _in_process(engine, [work.choice], options)

    naive_timing = timed(naive, max(1, repeats // 2))
    # Each run from an empty prefix cache: the figure is prefix reuse within one request.
    reuse_timing = timed(lambda: (engine.reset_prefix_cache(), reuse()), repeats)
    max_diff = max(
        abs(a.conditional_logprob - b.conditional_logprob)
        for a, b in zip(naive(), reuse(), strict=True)
    )
    latencies = timed(lambda: _in_process(engine, [work.short_pair], options), 50, warmup=5)
    return {
        "few_shot": measure_few_shot(engine, work),
        "batch": batch.summary(work.batch_tokens),
        "choice_naive": naive_timing.summary(),
        "choice_prefix_reuse": reuse_timing.summary(),
        "choice_speedup": naive_timing.median / reuse_timing.median,
        "choice_max_abs_diff": max_diff,
        "short_pair_p50_ms": 1000 * percentile(latencies.seconds, 50),
        "short_pair_p99_ms": 1000 * percentile(latencies.seconds, 99),
    }


def measure_few_shot(engine: ScoringEngine, work: Workloads) -> dict[str, Any]:
    """The 5-shot workload one question per request, with the prefix cache off, then on
    (empty at the start): seconds of each, their ratio and the largest difference."""
    budget = engine.prefix_cache_budget or 256 * 2**20

    def run_all() -> list:
        return [_in_process(engine, [item], ScoreOptions()) for item in work.few_shot]

    phases: dict[str, Any] = {}
    for label, max_bytes in (("off", 0), ("on", budget)):
        engine.reset_prefix_cache(max_bytes)
        hits_before = engine.stats().prefix_cache_hits
        began = time.perf_counter()
        results = run_all()
        phases[label] = {
            "seconds": time.perf_counter() - began,
            "results": results,
            "hits": engine.stats().prefix_cache_hits - hits_before,
        }
    engine.reset_prefix_cache(budget)
    max_diff = max(
        abs(a.conditional_logprob - b.conditional_logprob)
        for x, y in zip(phases["off"]["results"], phases["on"]["results"], strict=True)
        for a, b in zip(x, y, strict=True)
    )
    return {
        "requests": len(work.few_shot),
        "seconds_cache_off": phases["off"]["seconds"],
        "seconds_cache_on": phases["on"]["seconds"],
        "speedup": phases["off"]["seconds"] / phases["on"]["seconds"],
        "cache_hits": phases["on"]["hits"],
        "max_abs_diff": max_diff,
    }


def measure_pytorch(
    runs: tuple[Callable[[], float], Callable[[], float]], work: Workloads, repeats: int
) -> dict[str, Any]:
    run_batch, run_pair = runs
    latencies = timed(run_pair, 50, warmup=5)
    return {
        "batch": timed(run_batch, repeats).summary(work.batch_tokens),
        "short_pair_p50_ms": 1000 * percentile(latencies.seconds, 50),
    }


def measure_side_by_side(
    paths: dict[str, Callable[[], object]], repeats: int, units: float
) -> dict[str, dict[str, float]]:
    """Each path in turn, the order rotated every round: the machine's drift over a run
    falls on every path alike, so their ratios hold. Each turn runs its path twice and
    times the second run: the first after a switch from another process or library runs
    slower (caches, page faults), which a server under steady load does not pay. An untimed
    round comes first: a path's first two runs of a shape allocate (ONNX Runtime's memory
    pattern takes a block of its own on the second run, ~0.8 GB of page faults for the
    batch in a fresh server), so without it the first turn's timed run is one of them."""
    names = list(paths)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for name in names:
        paths[name]()
    for round_ in range(repeats):
        turn = round_ % len(names)
        for name in names[turn:] + names[:turn]:
            paths[name]()
            began = time.perf_counter()
            paths[name]()
            seconds[name].append(time.perf_counter() - began)
    return {name: Timing(seconds[name]).summary(units) for name in names}


# Before each call of the paired short-pair measurement: the other path's ONNX Runtime
# threads, which spin for a while after a run, have stopped, so neither path's call runs
# against the other's spinning threads on the same cores.
PAIR_PAUSE_S = 0.05


def measure_short_pair(
    engine: ScoringEngine, client: ScoringClient, work: Workloads, calls: int = 50
) -> dict[str, float]:
    """The short pair in-process and through gRPC, alternately, after a pause each: the
    overhead is the median of the per-pair differences, so that the machine's drift over a
    run falls on both sides alike."""
    pair = [as_client_item(work.short_pair)]
    options = ScoreOptions()
    in_process: list[float] = []
    through_grpc: list[float] = []
    for call in range(calls + 5):  # the first 5 warm up
        time.sleep(PAIR_PAUSE_S)
        began = time.perf_counter()
        _in_process(engine, [work.short_pair], options)
        local = time.perf_counter() - began
        time.sleep(PAIR_PAUSE_S)
        began = time.perf_counter()
        client.score(pair)
        remote = time.perf_counter() - began
        if call >= 5:
            in_process.append(local)
            through_grpc.append(remote)
    differences = [r - local for r, local in zip(through_grpc, in_process, strict=True)]
    return {
        "calls": calls,
        "in_process_p50_ms": 1000 * percentile(in_process, 50),
        "grpc_p50_ms": 1000 * percentile(through_grpc, 50),
        "grpc_p99_ms": 1000 * percentile(through_grpc, 99),
        "overhead_p50_ms": 1000 * percentile(differences, 50),
    }


def measure_short_pair_http(
    client: ScoringClient, http: HttpScorer, model: str, work: Workloads, calls: int = 50
) -> dict[str, float]:
    """The short pair through gRPC, the JSON Score route and /v1/completions (its text as one
    prompt, echoed with log-probs), one after another on one server, the order rotated every
    round: an HTTP path's overhead is the median of its per-round differences from gRPC, so
    that the machine's drift falls on every path alike."""
    pair = [as_client_item(work.short_pair)]
    paths: dict[str, Callable[[], object]] = {
        "grpc": functools.partial(client.score, pair),
        "json": functools.partial(http.score, pair),
        "completions": functools.partial(http.complete, model, work.short_pair_text, SCORING),
    }
    names = list(paths)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for call in range(calls + 5):  # the first 5 warm up
        turn = call % len(names)
        for name in names[turn:] + names[:turn]:
            began = time.perf_counter()
            paths[name]()
            if call >= 5:
                seconds[name].append(time.perf_counter() - began)
    result: dict[str, float] = {"calls": calls}
    for name, values in seconds.items():
        result[f"{name}_p50_ms"] = 1000 * percentile(values, 50)
        result[f"{name}_p99_ms"] = 1000 * percentile(values, 99)
    for name in ("json", "completions"):
        differences = [h - g for h, g in zip(seconds[name], seconds["grpc"], strict=True)]
        result[f"{name}_overhead_p50_ms"] = 1000 * percentile(differences, 50)
    return result


def server_batch_paths(
    client: ScoringClient, http: HttpScorer, model: str, work: Workloads
) -> dict[str, Callable[[], object]]:
    """The batch through one server: gRPC; gRPC with each token's log-prob and best
    alternative (what /v1/completions' echo with logprobs 1 computes besides, apart from
    the transport); the Score RPC as JSON; /v1/completions with the 8 items' token ids as
    its prompts, echoed (max_tokens 0), and as lm-eval sends them."""
    items = [as_client_item(item) for item in work.batch]
    sequences = [_sequence(item) for item in work.batch]
    details = ClientOptions(token_details=True, top_k=1)
    return {
        "grpc": functools.partial(client.score, items),
        "grpc_token_details": functools.partial(client.score, items, details),
        "http_json": functools.partial(http.score, items),
        "http_completions": functools.partial(http.complete, model, sequences, SCORING),
        "http_completions_lm_eval": functools.partial(http.complete, model, sequences, LM_EVAL),
    }


def measure_grpc(
    model_dir: Path,
    work: Workloads,
    repeats: int,
    concurrency: int,
    engine: ScoringEngine | None = None,
    pytorch_batch: Callable[[], object] | None = None,
    lm_eval_root: Path | None = None,
) -> dict[str, Any]:
    """The full gRPC path, on three servers in turn: the default one (the prefix cache off,
    HTTP on too), one without cross-request batching, and one with --low-memory. `engine`:
    the same model in-process, and `pytorch_batch`, PyTorch's batch run: with them, the
    batch runs side by side with gRPC's and the short pair is measured paired.
    `lm_eval_root`: the repository with lm-eval's task files, None to leave lm-eval out."""
    result = measure_default_server(
        model_dir, work, repeats, concurrency, engine, pytorch_batch, lm_eval_root
    )
    result.update(measure_unbatched_server(model_dir, work, concurrency))
    result["concurrency_speedup"] = (
        result["concurrent_batched"]["pairs_per_s"] / result["concurrent_unbatched"]["pairs_per_s"]
    )
    result["low_memory"] = measure_low_memory_server(model_dir, work, repeats)
    return result


def measure_default_server(
    model_dir: Path,
    work: Workloads,
    repeats: int,
    concurrency: int,
    engine: ScoringEngine | None,
    pytorch_batch: Callable[[], object] | None,
    lm_eval_root: Path | None = None,
) -> dict[str, Any]:
    """`lmscore serve` with its defaults but the prefix cache off: the multiple-choice figure
    is reuse within one request, as the in-process one (the few-shot workload measures the
    cache). Its start, memory, batch (beside the other paths and its own HTTP port),
    latencies and concurrency; then the HTTP port's latencies and lm-eval through it."""
    with ServerUnderTest(model_dir, "--prefix-cache-bytes", "0", http=True) as server:
        with (
            ScoringClient(server.address, timeout=600) as client,
            HttpScorer(server.http_port) as http,
        ):
            model = client.model_info().name
            server_paths = server_batch_paths(client, http, model, work)
            paths = dict(server_paths)
            if engine is not None:
                paths["ort"] = functools.partial(_in_process, engine, work.batch, ScoreOptions())
            if pytorch_batch is not None:
                paths["pytorch"] = pytorch_batch
            side_by_side = measure_side_by_side(paths, repeats, work.batch_tokens)
            choice = timed(lambda: client.score([as_client_item(work.choice)]), repeats)
            pair = [as_client_item(work.short_pair)]
            latencies = timed(lambda: client.score(pair), 50, warmup=5)
        result = {
            "cold_start_s": server.cold_start_s,
            "rss_held_bytes": server.rss_bytes(),
            "peak_rss_bytes": server.peak_rss_bytes(),
            "batch": side_by_side["grpc"],
            "batch_side_by_side": side_by_side,
            "choice_prefix_reuse": choice.summary(),
            "short_pair_p50_ms": 1000 * percentile(latencies.seconds, 50),
            "short_pair_p99_ms": 1000 * percentile(latencies.seconds, 99),
            "concurrent_batched": measure_concurrency(server.address, work, concurrency),
        }
        if engine is not None:
            with ScoringClient(server.address, timeout=600) as client:
                result["short_pair_paired"] = measure_short_pair(engine, client, work)
        print("answered rate at capacity and under 5x overload ...", file=sys.stderr)
        result["overload"] = overload.measure(server.address, OVERLOAD_CAPACITY_CLIENTS)
        print("timing requests after idle (3 s, 15 s) ...", file=sys.stderr)
        with ScoringClient(server.address, timeout=600) as client:
            own = {server.process.pid, os.getpid()}
            result["after_idle"] = measure_after_idle(server_calls(client, work), own)
        with (
            ScoringClient(server.address, timeout=600) as client,
            HttpScorer(server.http_port) as http,
        ):
            short_pair = measure_short_pair_http(client, http, model, work)
        # The batch through the server's other paths, as tokens/s and against gRPC's.
        http_rates = {name: side_by_side[name] for name in server_paths if name != "grpc"}
        result["http"] = {
            "short_pair": short_pair,
            "batch": http_rates,
            "batch_ratio_to_grpc": {
                name: rate["rate_median"] / side_by_side["grpc"]["rate_median"]
                for name, rate in http_rates.items()
            },
        }
        if lm_eval_root is not None:
            print("timing lm-eval: local-completions over HTTP, lmscore eval ...", file=sys.stderr)
            result["http"]["lm_eval"] = measure_lm_eval(
                lm_eval_root, server.address, server.http_port, model
            )
        print("RSS once idle past --memory-hold ...", file=sys.stderr)
        result["rss_bytes"] = server.rss_bytes(MEMORY_HOLD_S + 1.5)
    return result


# Clients at capacity: within the default --max-concurrent-requests (64), none waits.
OVERLOAD_CAPACITY_CLIENTS = 60


def measure_unbatched_server(model_dir: Path, work: Workloads, concurrency: int) -> dict[str, Any]:
    """`lmscore serve --no-cross-request-batching`: concurrent clients without batching
    across their requests, and a start that reads the optimized graph the default server
    cached."""
    with ServerUnderTest(model_dir, "--no-cross-request-batching") as server:
        return {
            "concurrent_unbatched": measure_concurrency(server.address, work, concurrency),
            "cold_start_cached_graph_s": server.cold_start_s,
        }


def measure_low_memory_server(model_dir: Path, work: Workloads, repeats: int) -> dict[str, Any]:
    """`lmscore serve --low-memory`: the batch, and the memory it holds."""
    with ServerUnderTest(model_dir, "--low-memory") as server:
        with ScoringClient(server.address, timeout=600) as client:
            batch_items = [as_client_item(i) for i in work.batch]
            low = timed(lambda: client.score(batch_items), repeats)
        return {
            "batch": low.summary(work.batch_tokens),
            "rss_bytes": server.rss_bytes(),
            "peak_rss_bytes": server.peak_rss_bytes(),
        }


def measure_concurrency(address: str, work: Workloads, clients: int) -> dict[str, float]:
    """`clients` threads, each with its own channel, each sending single pairs one at a time."""
    per_client = 4
    prompt = token_ids(work.short_pair.prompt)
    completion = token_ids(work.short_pair.completions[0])

    def client_loop(number: int) -> int:
        with ScoringClient(address, timeout=600) as client:
            for i in range(per_client):
                # Distinct prompts, so nothing is shared but the batches.
                client.score(
                    [Item([*prompt[1:], (number * per_client + i) % 1000 + 10], [completion])]
                )
        return per_client

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(client_loop, range(clients)))  # warm-up
        began = time.perf_counter()
        done = sum(pool.map(client_loop, range(clients)))
        elapsed = time.perf_counter() - began
    return {"clients": clients, "pairs": done, "seconds": elapsed, "pairs_per_s": done / elapsed}


def token_deviation(
    reference: ScoringEngine, candidate: ScoringEngine, items: list[ItemInput]
) -> dict[str, float]:
    """Mean and max |log p_candidate - log p_reference| per token on held-out text."""
    options = ScoreOptions(token_details=True)
    diffs = []
    for a, b in zip(
        _in_process(reference, items, options), _in_process(candidate, items, options), strict=True
    ):
        for x, y in zip(a.tokens[1:], b.tokens[1:], strict=True):
            diffs.append(abs(float(x.logprob) - float(y.logprob)))  # type: ignore[arg-type]
    return {
        "mean_abs_nats": float(np.mean(diffs)),
        "max_abs_nats": float(np.max(diffs)),
        "tokens": len(diffs),
    }


def run_bench(
    model_dir: Path,
    source: str,
    quantized_dir: Path | None,
    repeats: int,
    concurrency: int,
    include_pytorch: bool = True,
    lm_eval_root: Path | None = None,
) -> dict[str, Any]:
    """Every path; `lm_eval_root`: the repository with lm-eval's task files, None to leave
    the lm-eval comparison out."""
    manifest = Manifest.read(model_dir)
    loaded = load_model(ServerConfig(model_dir=model_dir))
    # Warmed up as the server is: ONNX Runtime keeps the memory pattern of the first shapes it
    # runs, and an engine whose first run is the benchmark's batch reuses one block for every
    # repeat of it, which a server warmed up on other shapes does not.
    warm_up(loaded.engine)
    work = build_workloads(loaded.engine.tokenizer)
    results: dict[str, Any] = {
        "model": manifest.name,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": sys.platform,
            "cpu": cpu_description(),
            # Other processes' load: the paired and rotated figures hold under it, the
            # absolute ones do not.
            "load_average_at_start": os.getloadavg(),
        },
        "model_file_bytes": model_bytes(model_dir),  # the graph and its weights file
        "repeats": repeats,
    }
    print("measuring ONNX Runtime in-process (fp32) ...", file=sys.stderr)
    results["ort"] = measure_in_process(loaded.engine, work, repeats)
    if quantized_dir is not None:
        print(f"measuring the quantized variant {quantized_dir} ...", file=sys.stderr)
        quantized = load_model(ServerConfig(model_dir=quantized_dir))
        warm_up(quantized.engine)
        fp32_again = timed(lambda: _in_process(loaded.engine, work.batch, ScoreOptions()), repeats)
        q_timing = timed(lambda: _in_process(quantized.engine, work.batch, ScoreOptions()), repeats)
        results["quantized"] = {
            "dir": str(quantized_dir),
            "batch": q_timing.summary(work.batch_tokens),
            "fp32_batch_same_phase": fp32_again.summary(work.batch_tokens),
            "speedup": fp32_again.median / q_timing.median,
            "deviation": token_deviation(loaded.engine, quantized.engine, work.held_out),
        }
        quantized.engine.close()
    torch_runs = None
    if include_pytorch:
        print("measuring PyTorch eager ...", file=sys.stderr)
        torch_runs = pytorch_runs(source, work, manifest.bos_token_id)
        results["pytorch"] = measure_pytorch(torch_runs, work, repeats)
    print("measuring gRPC end to end, the batch beside the other paths ...", file=sys.stderr)
    results["grpc"] = measure_grpc(
        model_dir,
        work,
        repeats,
        concurrency,
        loaded.engine,
        torch_runs and torch_runs[0],
        lm_eval_root,
    )
    loaded.engine.close()
    results["http"] = results["grpc"].pop("http")
    results["machine"]["load_average_at_end"] = os.getloadavg()
    # The batch figures of the report: the side-by-side ones (each path's alone phase, minutes
    # apart from the others, stays in its section as batch_alone).
    for path, summary in results["grpc"]["batch_side_by_side"].items():
        if path in ("ort", "pytorch"):
            results[path]["batch_alone"] = results[path]["batch"]
            results[path]["batch"] = summary
    return results
