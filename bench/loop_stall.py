"""`python -m lmscore.bench.loop_stall`: how long a large HTTP answer holds up the server's
event loop, which every gRPC call, HTTP call and /metrics share.

A default server (`--max-top-k 20 --http-port`) gets one HTTP Score call of GPL text with
token details and top_k 20 (30,000 characters: ~6,400 tokens, an ~8 MB answer). Meanwhile
`/health` over HTTP and GetModelInfo over gRPC are each called every 5 ms, each on its own
thread. The report gives the slowest and the median of each poller's calls beside that
answer's size and time. A slowest call near the median means the loop kept serving; before
the transport wrote large JSON on a worker thread and in pieces, it was ~0.85 s.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import time
from pathlib import Path
from typing import Any

from lmscore.bench.harness import Poller, ServerUnderTest, cpu_description
from lmscore.bench.http_paths import HttpScorer
from lmscore.client import ScoringClient
from lmscore.export.paths import default_model_dir

LICENSE = Path("/usr/share/common-licenses/GPL-3")
POLL_INTERVAL_S = 0.005


def measure_loop_stall(model_dir: Path, chars: int) -> dict[str, Any]:
    text = LICENSE.read_text(encoding="utf-8")[:chars]
    body = {
        "items": [{"prompt": "", "completions": [{"text": text}]}],
        "options": {"token_details": True, "top_k": 20},
    }
    path = "/lmscore.v1.Scorer/Score"
    with ServerUnderTest(model_dir, "--max-top-k", "20", http=True) as server:
        health = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)

        def get_health() -> None:
            health.request("GET", "/health")
            health.getresponse().read()

        with ScoringClient(server.address) as client:
            pollers = {
                "health_http": Poller(get_health, POLL_INTERVAL_S),
                "model_info_grpc": Poller(client.model_info, POLL_INTERVAL_S),
            }
            for poller in pollers.values():
                poller.start()
            time.sleep(0.5)
            began = time.perf_counter()
            with HttpScorer(server.http_port) as scorer:
                answer = scorer.post(path, body)
            call_s = time.perf_counter() - began
            time.sleep(0.5)
            for poller in pollers.values():
                poller.stop()
        health.close()
    [result] = [json.loads(line) for line in answer.splitlines()]
    return {
        "cpu": cpu_description(),
        "tokens": len(result["tokens"]),
        "answer_bytes": len(answer),
        "call_s": call_s,
        **{name: poller.summary() for name, poller in pollers.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="export dir (default model)")
    parser.add_argument("--chars", type=int, default=30_000, help="characters of GPL text")
    args = parser.parse_args()
    model_dir = args.model or default_model_dir(os.environ)
    result = measure_loop_stall(model_dir, args.chars)
    print(json.dumps(result, indent=1))
    print(
        f"{result['tokens']} tokens, {result['answer_bytes'] / 1e6:.1f} MB answered in"
        f" {result['call_s']:.1f} s; slowest /health {result['health_http']['max_ms']:.0f} ms"
        f" (median {result['health_http']['median_ms']:.1f}), slowest GetModelInfo"
        f" {result['model_info_grpc']['max_ms']:.0f} ms"
        f" (median {result['model_info_grpc']['median_ms']:.1f}); {result['cpu']}"
    )


if __name__ == "__main__":
    main()
