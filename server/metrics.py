"""Prometheus metrics of the server (`lmscore serve --metrics-port`).

Module-level collectors in the default registry: one server per process.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Gauge, Histogram, Info, make_asgi_app

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Every collector has a `model` label: the served model's name (ModelInfo.name). On the
# RPC counts it is the model the call named (empty: the first), and empty for calls that
# name none (health, ListModels) or a name not served, so that clients cannot add series;
# a ScoreStream counts under its first request's model.
BY_MODEL = ["model"]

# The RPC counts and latencies also say which transport carried the call: "grpc", or "http"
# (the JSON routes and the OpenAI-compatible ones of lmscore.server.http_transport).
REQUESTS = Counter(
    "lmscore_requests_total",
    "calls by method, status code, model and protocol",
    ["method", "code", *BY_MODEL, "protocol"],
)
LATENCY = Histogram(
    "lmscore_request_seconds",
    "call latency by method, model and protocol",
    ["method", *BY_MODEL, "protocol"],
    buckets=LATENCY_BUCKETS,
)
IN_FLIGHT = Gauge("lmscore_requests_in_flight", "scoring calls in progress", BY_MODEL)
WAITING = Gauge(
    "lmscore_requests_waiting",
    "scoring calls waiting for a slot (past --max-concurrent-requests), all models together",
)
COMPLETIONS = Counter(
    "lmscore_completions_scored_total", "(item, completion) results returned", BY_MODEL
)
ROLLING_TEXTS = Counter(
    "lmscore_rolling_texts_scored_total", "ScoreRolling results returned", BY_MODEL
)
TOKENS = Counter(
    "lmscore_tokens_scored_total",
    "tokens of the results: joint sequences (Score, ScoreStream) and texts (ScoreRolling)",
    BY_MODEL,
)
BATCH_SEQUENCES = Histogram(
    "lmscore_batch_sequences",
    "sequences per model run",
    BY_MODEL,
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
BATCH_TOKENS = Histogram(
    "lmscore_batch_padded_tokens",
    "padded tokens per model run",
    BY_MODEL,
    buckets=(16, 64, 256, 512, 1024, 1536, 2048, 4096, 8192),
)
QUEUE_SECONDS = Histogram(
    "lmscore_queue_seconds",
    "time a sequence waited before its model run",
    BY_MODEL,
    buckets=LATENCY_BUCKETS,
)
COMPUTE_SECONDS = Histogram(
    "lmscore_compute_seconds", "duration of one model run", BY_MODEL, buckets=LATENCY_BUCKETS
)
PREFILL_CHUNKS = Counter(
    "lmscore_prefill_chunks_total",
    "model runs over one chunk of a batch wider than --prefill-chunk-tokens",
    BY_MODEL,
)
RUNS_ABANDONED = Counter(
    "lmscore_runs_abandoned_total",
    "batches stopped between two model runs because every caller had left or timed out",
    BY_MODEL,
)
# One sample per served model: its export's name, dtype, providers and source hash.
MODEL = Info("lmscore_model", "the served models", BY_MODEL)


def metrics_app() -> Any:
    """The ASGI app answering GET /metrics (served in the event loop by
    lmscore.server.asgi_server: a thread-per-connection server let 200 idle connections
    hold 200 threads)."""
    return make_asgi_app()


PREFIX_CACHE_LOOKUPS = Counter(
    "lmscore_prefix_cache_lookups_total",
    "prompt passes that looked in the cross-request prefix cache, by result (hit, miss)",
    [*BY_MODEL, "result"],
)
PREFIX_CACHE_HIT_TOKENS = Counter(
    "lmscore_prefix_cache_hit_tokens_total",
    "prompt positions served from the prefix cache instead of a model run",
    BY_MODEL,
)
PREFIX_CACHE_BYTES = Gauge(
    "lmscore_prefix_cache_bytes", "bytes held by the prefix cache (keys, values, scores)", BY_MODEL
)
