"""Long sequences: one request of 512, 2048 and 8192 tokens, the server and PyTorch eager
side by side in one run, plus what other clients see while the longest one runs.

    lmscore bench --long [--model DIR] [--source SPEC] [--output-dir DIR]

For each length, one Score request of that many natural-text token ids ([BOS] + the
license texts) goes through a real `lmscore serve` (default flags) and the same ids
through PyTorch eager on the same weights (HFLM's path: forward, log_softmax, gather),
one after the other, never at once. Each path's time and peak RSS (sampled every 20 ms,
the server process for gRPC, this process for PyTorch) are reported, with the ratio
PyTorch time / server time (> 1: the server is faster) and a log-log plot.

While the 8192-token request runs, a second client sends a short pair every second and
health checks every 50 ms (latencies reported); then the same request is sent with a
5 s deadline, and a short pair right after the deadline measures how soon the model is
free again.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc

from lmscore.bench.harness import Poller, ServerUnderTest, cpu_description, percentile
from lmscore.bench.workloads import LICENSES
from lmscore.client import Item, ScoringClient
from lmscore.export.manifest import TOKENIZER_NAME, Manifest
from lmscore.export.paths import default_model_dir
from lmscore.server.tokenization import TextTokenizer

LENGTHS = (512, 2048, 8192)
DEADLINE_S = 5.0
# While the longest sequence runs: a health check every 50 ms, a short pair every second.
HEALTH_INTERVAL_S = 0.05
SHORT_PAIR_INTERVAL_S = 1.0


@contextmanager
def peak_rss(pid: int) -> Iterator[dict[str, int]]:
    """Samples the RSS of `pid` every 20 ms; yields a dict whose 'peak' is set on exit."""
    import psutil

    process = psutil.Process(pid)
    result = {"peak": process.memory_info().rss}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            result["peak"] = max(result["peak"], process.memory_info().rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        stop.set()
        sampler.join()


def natural_ids(tokenizer: TextTokenizer, bos: int, length: int) -> list[int]:
    text = "\n".join(
        p.read_text(errors="ignore") for p in sorted(LICENSES.iterdir()) if p.is_file()
    )
    ids = [bos, *tokenizer.encode(text)]
    if len(ids) < length:
        raise SystemExit(f"the license texts give {len(ids)} tokens, fewer than {length}")
    return ids[:length]


def _item(ids: list[int]) -> Item:
    return Item(ids[:1], [ids[1:]])


def measure_server(model_dir: Path, sequences: dict[int, list[int]], short: Item) -> dict[str, Any]:
    server = ServerUnderTest(model_dir)
    results: dict[str, Any] = {"lengths": {}}
    try:
        with ScoringClient(server.address) as client:
            # add_bos off: the ids start with BOS already, so every path scores the same ids.
            from lmscore.client import ScoreOptions

            options = ScoreOptions(add_bos=False)
            client.score([short], options)
            for length, ids in sequences.items():
                with peak_rss(server.process.pid) as rss:
                    began = time.perf_counter()
                    [result] = client.score([_item(ids)], options)
                    seconds = time.perf_counter() - began
                results["lengths"][length] = {
                    "seconds": seconds,
                    "peak_rss_bytes": rss["peak"],
                    "logprob": result.joint_logprob,
                }
            longest = sequences[max(sequences)]
            results["interleaved"] = _interleaved(server.address, client, longest, short)
            results["deadline"] = _deadline(server.address, client, longest, short)
    finally:
        server.close()
    return results


def _interleaved(address: str, client: ScoringClient, ids: list[int], short: Item) -> dict:
    """Health and short-pair latencies from other clients while `ids` is scored."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from lmscore.client import ScoreOptions

    with grpc.insecure_channel(address) as channel, ScoringClient(address) as other:
        stub = health_pb2_grpc.HealthStub(channel)
        health = Poller(
            lambda: stub.Check(health_pb2.HealthCheckRequest(), timeout=30), HEALTH_INTERVAL_S
        )
        short_pairs = Poller(lambda: other.score([short]), SHORT_PAIR_INTERVAL_S)
        for poller in (health, short_pairs):
            poller.start()
        began = time.perf_counter()
        client.score([_item(ids)], ScoreOptions(add_bos=False))
        seconds = time.perf_counter() - began
        for poller in (health, short_pairs):
            poller.stop()
    health_s, short_s = health.seconds, short_pairs.seconds
    return {
        "long_seconds": seconds,
        "health_p50_ms": 1000 * percentile(health_s, 50),
        "health_p99_ms": 1000 * percentile(health_s, 99),
        "health_checks": len(health_s),
        "short_pair_max_s": max(short_s),
        "short_pair_median_s": percentile(short_s, 50),
        "short_pairs": len(short_s),
    }


def _deadline(address: str, client: ScoringClient, ids: list[int], short: Item) -> dict:
    """The longest request with a DEADLINE_S deadline; then how soon a short pair is answered."""
    from lmscore.client import ScoreOptions, ScoringError

    began = time.perf_counter()
    try:
        client.score([_item(ids)], ScoreOptions(add_bos=False), timeout=DEADLINE_S)
        code = "OK"
    except ScoringError as exc:
        code = exc.code.name
    expired = time.perf_counter()
    client.score([short])
    return {
        "code": code,
        "status_after_s": expired - began,
        "short_pair_after_deadline_s": time.perf_counter() - expired,
    }


def measure_pytorch(source: str, sequences: dict[int, list[int]]) -> dict[int, dict[str, Any]]:
    import torch
    from transformers import AutoModelForCausalLM

    from lmscore.export.source import resolve_source

    resolved = resolve_source(source)
    kwargs = {"gguf_file": resolved.gguf_file} if resolved.gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(
        str(resolved.directory), dtype=torch.float32, **kwargs
    ).eval()

    def score(ids: list[int]) -> float:
        tensor = torch.tensor([ids])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(tensor).logits[0, :-1].float(), dim=-1)
            return float(logprobs.gather(-1, tensor[0, 1:, None]).double().sum())

    score(sequences[min(sequences)][:64])  # warm-up
    results = {}
    for length, ids in sequences.items():
        with peak_rss(os.getpid()) as rss:
            began = time.perf_counter()
            logprob = score(ids)
            seconds = time.perf_counter() - began
        results[length] = {"seconds": seconds, "peak_rss_bytes": rss["peak"], "logprob": logprob}
    return results


def table(results: dict[str, Any]) -> str:
    mb = 2**20
    lines = [
        f"long sequences: {results['model']} on {results['cpu']}",
        "",
        "| tokens | server s | PyTorch s | PyTorch / server | server peak RSS MB "
        "| PyTorch peak RSS MB | |log p server - PyTorch| |",
        "|---|---|---|---|---|---|---|",
    ]
    for length in LENGTHS:
        s = results["server"]["lengths"][length]
        p = results["pytorch"].get(length)
        if p is None:
            lines.append(
                f"| {length} | {s['seconds']:.2f} | | | {s['peak_rss_bytes'] / mb:.0f} | | |"
            )
            continue
        lines.append(
            f"| {length} | {s['seconds']:.2f} | {p['seconds']:.2f} | "
            f"{p['seconds'] / s['seconds']:.2f} | {s['peak_rss_bytes'] / mb:.0f} | "
            f"{p['peak_rss_bytes'] / mb:.0f} | {abs(s['logprob'] - p['logprob']):.2e} |"
        )
    i, d = results["server"]["interleaved"], results["server"]["deadline"]
    lines += [
        "",
        f"while {max(LENGTHS)} tokens run ({i['long_seconds']:.1f} s): health p50 "
        f"{i['health_p50_ms']:.1f} ms, p99 {i['health_p99_ms']:.1f} ms over "
        f"{i['health_checks']} checks; short pair median {i['short_pair_median_s']:.2f} s, "
        f"max {i['short_pair_max_s']:.2f} s over {i['short_pairs']}",
        f"{max(LENGTHS)} tokens with a {DEADLINE_S:g} s deadline: {d['code']} after "
        f"{d['status_after_s']:.2f} s; a short pair sent then answered in "
        f"{d['short_pair_after_deadline_s']:.2f} s",
    ]
    return "\n".join(lines)


def _at(by_length: dict[Any, dict[str, float]], length: int) -> float | None:
    """Seconds at `length` (keys are ints in a run, strings once read back from long.json)."""
    entry = by_length.get(length) or by_length.get(str(length))
    return None if entry is None else entry["seconds"]


def plot(results: dict[str, Any], path: Path) -> None:
    """Time against length, log-log, both paths (from a run or from its long.json)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4.2))
    series: list[tuple[str, Callable[[int], float | None], str]] = [
        ("lmscore (gRPC)", lambda n: _at(results["server"]["lengths"], n), "#228833"),
        ("PyTorch eager (SDPA)", lambda n: _at(results["pytorch"], n), "#bb5566"),
    ]
    for label, seconds, color in series:
        points = [(n, seconds(n)) for n in LENGTHS if seconds(n) is not None]
        axis.loglog([n for n, _ in points], [s for _, s in points], "o-", label=label, color=color)
    axis.set_xlabel("tokens in the request")
    axis.set_ylabel("seconds")
    axis.set_xticks(list(LENGTHS), [str(n) for n in LENGTHS])
    axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axis.set_title(f"one long request, {results['cpu'].split(',')[1].strip()}")
    axis.legend()
    axis.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run(model: str, source: str, output_dir: Path, pytorch: bool = True) -> dict[str, Any]:
    model_dir = default_model_dir(os.environ) if model == "default" else Path(model)
    manifest = Manifest.read(model_dir)
    if manifest.bos_token_id is None:
        raise SystemExit("the long-sequence workload starts each sequence with BOS")
    tokenizer = TextTokenizer(model_dir / TOKENIZER_NAME)
    longest = min(max(LENGTHS), manifest.max_context)
    all_ids = natural_ids(tokenizer, manifest.bos_token_id, longest)
    sequences = {n: all_ids[:n] for n in LENGTHS if n <= longest}
    short = Item(all_ids[100:116], [all_ids[116:120]])
    results: dict[str, Any] = {"model": manifest.name, "cpu": cpu_description()}
    results["server"] = measure_server(model_dir, sequences, short)
    results["pytorch"] = measure_pytorch(source, sequences) if pytorch else {}
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "long.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, output_dir / "long.png")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--source", default="default")
    parser.add_argument("--no-pytorch", action="store_true")
    parser.add_argument("--output-dir", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    results = run(args.model, args.source, args.output_dir, not args.no_pytorch)
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
