"""Two models in one server, one hammered (issue 23): the quiet model's short pairs alone,
then while the busy model scores long requests, with turns (`--model-turn-ms`, default)
and without (`--model-turn-ms 0`), side by side in one run; and what the turns cost the
busy model (its tokens per second both ways).

    lmscore bench --two-models [--long-tokens 8192 --long-requests 4]

The quiet model is the default one (SmolLM2-135M), the busy one Gemma-3 270M (262,144-word
vocabulary: its runs are the longest per position of the models the project ships).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from lmscore.bench.harness import ServerUnderTest, cpu_description, percentile
from lmscore.client import Item, ScoreOptions, ScoringClient

TEXT = Path("/usr/share/common-licenses/GPL-3")
QUIET_PAIR = [Item("The capital of France is", [" Paris."])]
# A client of the quiet model pauses this long between its calls (a service's steady trickle).
QUIET_PAUSE_S = 0.05
BUSY = "busy"
TARGET_P99_MS = 500.0


def _long_texts(tokens: int, requests: int) -> list[str]:
    """`requests` different texts of about `tokens` Gemma tokens (~4.3 characters each)."""
    text = TEXT.read_text()
    chars = int(tokens * 4.3)
    while len(text) < chars + 100 * requests:
        text += "\n" + text
    return [text[100 * i : 100 * i + chars] for i in range(requests)]


def _quiet_calls(client: ScoringClient, latencies: list[float], stop: threading.Event) -> None:
    while not stop.is_set():
        began = time.perf_counter()
        client.score(QUIET_PAIR)
        latencies.append(time.perf_counter() - began)
        time.sleep(QUIET_PAUSE_S)


def _summary(latencies: list[float]) -> dict[str, float]:
    return {
        "calls": len(latencies),
        "p50_ms": 1000 * percentile(latencies, 50),
        "p99_ms": 1000 * percentile(latencies, 99),
        "max_ms": 1000 * max(latencies),
    }


def measure(quiet_dir: Path, busy_dir: Path, turn_ms: float, texts: list[str]) -> dict[str, Any]:
    """The quiet model's short pairs alone for 3 s, then during the busy model's requests
    (all sent at once); the busy model's scored tokens per second."""
    flags = ("--model", f"{BUSY}={busy_dir}", "--model-turn-ms", str(turn_ms))
    with ServerUnderTest(quiet_dir, *flags) as server, ScoringClient(server.address) as client:
        client.score(QUIET_PAIR)
        alone: list[float] = []
        stop = threading.Event()
        timer = threading.Timer(3.0, stop.set)
        timer.start()
        _quiet_calls(client, alone, stop)
        tokens: list[int] = []

        def busy_request(text: str) -> None:
            with ScoringClient(server.address, timeout=3600) as busy_client:
                (result,) = busy_client.score([Item(text, [" end"])], ScoreOptions(model=BUSY))
                tokens.append(result.prompt_tokens + result.completion_tokens)

        threads = [threading.Thread(target=busy_request, args=(text,)) for text in texts]
        began = time.perf_counter()
        for thread in threads:
            thread.start()
        during: list[float] = []
        stop = threading.Event()
        quiet = threading.Thread(target=_quiet_calls, args=(client, during, stop))
        quiet.start()
        for thread in threads:
            thread.join()
        busy_s = time.perf_counter() - began
        stop.set()
        quiet.join()
    return {
        "model_turn_ms": turn_ms,
        "quiet_alone": _summary(alone),
        "quiet_during": _summary(during),
        "busy_tokens": sum(tokens),
        "busy_seconds": busy_s,
        "busy_tokens_per_s": sum(tokens) / busy_s,
    }


def run(
    quiet_dir: Path, busy_dir: Path, output_dir: Path, long_tokens: int, long_requests: int
) -> dict[str, Any]:
    texts = _long_texts(long_tokens, long_requests)
    with_turns = measure(quiet_dir, busy_dir, 250.0, texts)
    without = measure(quiet_dir, busy_dir, 0.0, texts)
    results = {
        "cpu": cpu_description(),
        "long_tokens": long_tokens,
        "long_requests": long_requests,
        "with_turns": with_turns,
        "without_turns": without,
        "busy_throughput_ratio": with_turns["busy_tokens_per_s"] / without["busy_tokens_per_s"],
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "two_models.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def table(results: dict[str, Any]) -> str:
    rows = [
        f"CPU: {results['cpu']}",
        f"busy model: {results['long_requests']} requests of ~{results['long_tokens']} tokens "
        "at once; quiet model: short pairs in a loop",
        "",
        "| --model-turn-ms | quiet alone p50 / p99 | quiet during p50 / p99 / max "
        "| busy tokens/s |",
        "|---|---|---|---|",
    ]
    for key in ("with_turns", "without_turns"):
        row = results[key]
        alone, during = row["quiet_alone"], row["quiet_during"]
        rows.append(
            f"| {row['model_turn_ms']:g} | {alone['p50_ms']:.0f} / {alone['p99_ms']:.0f} ms "
            f"| {during['p50_ms']:.0f} / {during['p99_ms']:.0f} / {during['max_ms']:.0f} ms "
            f"| {row['busy_tokens_per_s']:.0f} |"
        )
    p99 = results["with_turns"]["quiet_during"]["p99_ms"]
    verdict = "met" if p99 <= TARGET_P99_MS else "MISSED"
    rows += [
        "",
        f"quiet p99 during, with turns: {p99:.0f} ms (target <= {TARGET_P99_MS:.0f} ms: "
        f"{verdict}); busy throughput with / without turns: "
        f"{results['busy_throughput_ratio']:.2f}x",
    ]
    return "\n".join(rows)
