"""ONNX Runtime session settings side by side: pre-packed weights and the CPU arena.

    python -m lmscore.bench.settings [--model DIR] [--rounds 2]

Each setting runs in a process of its own (so that its memory is its own), in turn, for
`--rounds` rounds: the engine in-process on the benchmark's 8 x 128-token batch, median
tokens/s of 5 runs after a warm-up, RSS after the runs, after going idle (what the model
thread then hands back: the arena shrunk, the heap trimmed) and peak RSS. The default of
`lmscore serve` is pre-packed weights with the arena; `--low-memory` leaves the pre-packed
copies out, `--no-cpu-arena` the arena (docs/benchmarks.md, session settings).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from lmscore.export.cpu import vector_flags

SETTINGS = {
    "default (pre-packed, arena)": ("--prepack", "--arena"),
    "--low-memory": ("--arena",),
    "--no-cpu-arena": ("--prepack",),
    "--low-memory --no-cpu-arena": (),
}


def measure_one(model_dir: Path, prepack: bool, arena: bool) -> dict[str, float]:
    from lmscore.bench.workloads import build_workloads
    from lmscore.server.app import load_model
    from lmscore.server.config import RuntimeOptions, ServerConfig
    from lmscore.server.memory import resident_bytes
    from lmscore.v1.options import ScoreOptions

    runtime = RuntimeOptions(low_memory=not prepack, cpu_arena=arena)
    loaded = load_model(ServerConfig(model_dir=model_dir, runtime=runtime))
    work = build_workloads(loaded.engine.tokenizer)
    plan = loaded.engine.plan(work.batch, ScoreOptions())
    loaded.engine.score_sync(plan)
    times = []
    for _ in range(5):
        began = time.perf_counter()
        loaded.engine.score_sync(plan)
        times.append(time.perf_counter() - began)
    rss = resident_bytes() or 0
    loaded.engine.release_memory()
    return {
        "tokens_per_s": work.batch_tokens / statistics.median(times),
        "rss_mb": rss / 2**20,
        "idle_rss_mb": (resident_bytes() or 0) / 2**20,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main(argv: list[str] | None = None) -> int:
    from lmscore.export.paths import default_model_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--prepack", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--arena", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    model_dir = args.model or default_model_dir(os.environ)
    if args.one:
        print(json.dumps(measure_one(model_dir, args.prepack, args.arena)))
        return 0
    figures: dict[str, list[dict[str, float]]] = {name: [] for name in SETTINGS}
    for _ in range(args.rounds):
        for name, flags in SETTINGS.items():
            command = [sys.executable, "-m", "lmscore.bench.settings", "--one", *flags]
            command += ["--model", str(model_dir)]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            figures[name].append(json.loads(output.strip().splitlines()[-1]))
    flags = vector_flags()
    print(f"model {model_dir.name}; CPU flags: {' '.join(flags)}; {os.cpu_count()} CPUs")
    print("| setting | tokens/s (each round) | RSS after (MB) | idle RSS (MB) | peak RSS (MB) |")
    print("|---|---|---|---|---|")
    for name, rounds in figures.items():
        rates = " / ".join(f"{r['tokens_per_s']:.0f}" for r in rounds)
        rss = statistics.median(r["rss_mb"] for r in rounds)
        idle = statistics.median(r["idle_rss_mb"] for r in rounds)
        peak = statistics.median(r["peak_rss_mb"] for r in rounds)
        print(f"| {name} | {rates} | {rss:.0f} | {idle:.0f} | {peak:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
