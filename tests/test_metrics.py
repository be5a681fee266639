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


def test_slow_metrics_connections_cost_no_threads(tiny_export: Path) -> None:
    """200 scrapers that connect and never finish their request: the metrics port is served
    from the event loop, so the server's threads stay as they were and /metrics answers."""
    import socket

    def threads(pid: int) -> int:
        status = Path(f"/proc/{pid}/status").read_text()
        return int(
            next(line.split()[1] for line in status.splitlines() if line.startswith("Threads"))
        )

    port = free_port()
    with running_server(tiny_export, "--metrics-port", str(port)) as server:
        scrape_metrics(port)
        before = threads(server.process.pid)
        held = []
        try:
            for _ in range(200):
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                sock.sendall(b"GET /metrics HTTP/1.1\r\nhost: x\r\n")  # never finished
                held.append(sock)
            samples = scrape_metrics(port)
            assert any(name == "lmscore_model_info" for name, _ in samples)
            assert threads(server.process.pid) <= before + 2
        finally:
            for sock in held:
                sock.close()
