"""Prometheus metrics: scraped over HTTP, the numbers move as requests are made."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import free_port, running_server, scrape_metrics, scrape_metrics_until
from lmscore.client import InvalidArgumentError, Item, ScoreOptions, ScoringClient

SCORE = "/lmscore.v1.Scorer/Score"


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_requests_results_tokens_and_batches(tiny_export: Path) -> None:
    def delta(name: str, **labels: str) -> float:
        labels = {"model": "tiny-llama", **labels}  # every collector is labelled by model
        return value(after, name, **labels) - value(before, name, **labels)

    port = free_port()
    with running_server(tiny_export, "--metrics-port", str(port)) as server:
        before = scrape_metrics(port)
        info = [
            dict(labels)
            for (metric, labels), v in before.items()
            if metric == "lmscore_model_info" and v == 1
        ]
        assert info and info[0]["model"] == info[0]["name"] == "tiny-llama"
        assert info[0]["dtype"] == "float32"
        assert info[0]["providers"] == "CPUExecutionProvider"
        with ScoringClient(server.address) as client:
            results = client.score([Item("The Program", [" is free", " is not"]), Item("", ["A"])])
            with pytest.raises(InvalidArgumentError):
                client.score([Item("x", ["y"])], ScoreOptions(top_k=-1))
        calls = {"method": SCORE, "model": "tiny-llama", "protocol": "grpc"}
        counted = value(before, "lmscore_request_seconds_count", **calls) + 2
        after = scrape_metrics_until(
            port, lambda s: value(s, "lmscore_request_seconds_count", **calls) >= counted
        )

    grpc = {"method": SCORE, "protocol": "grpc"}
    assert delta("lmscore_requests_total", code="OK", **grpc) == 1
    assert delta("lmscore_requests_total", code="INVALID_ARGUMENT", **grpc) == 1
    assert delta("lmscore_request_seconds_count", **grpc) == 2
    assert delta("lmscore_completions_scored_total") == 3
    tokens = sum(int(r.bos_added) + r.prompt_tokens + r.completion_tokens for r in results)
    assert delta("lmscore_tokens_scored_total") == tokens
    assert delta("lmscore_batch_sequences_count") >= 1  # model runs
    assert delta("lmscore_queue_seconds_count") == delta("lmscore_batch_sequences_sum")
    assert delta("lmscore_compute_seconds_count") == delta("lmscore_batch_sequences_count")
    assert value(after, "lmscore_requests_in_flight", model="tiny-llama") == 0
