"""`lmscore bench`: PyTorch eager, ONNX Runtime in-process, gRPC and HTTP, side by side."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default", help="exported fp32 model dir or 'default'")
    parser.add_argument(
        "--source", default="default", help="the model's source, for the PyTorch reference path"
    )
    parser.add_argument(
        "--quantized",
        default="auto",
        help="exported quantized model dir; 'auto' = the first of $LMSCORE_HOME/models/NAME-RECIPE "
        "that exists; 'none' to skip (default: %(default)s)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed runs after a warm-up")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent clients")
    parser.add_argument("--no-pytorch", action="store_true", help="skip the PyTorch path")
    parser.add_argument(
        "--no-lm-eval",
        action="store_true",
        help="skip lm-eval's multiple-choice task through local-completions (HTTP) beside "
        "`lmscore eval` (gRPC), best of 2 runs each (about 2 minutes)",
    )
    parser.add_argument(
        "--repo-root",
        type=Path,
        default=None,
        help="the lmscore checkout with tests/lm_eval_tasks, where lm-eval runs "
        "(default: the one this package is installed from)",
    )
    parser.add_argument(
        "--long",
        action="store_true",
        help="the long-sequence workload instead (lmscore.bench.long: one request of 512, "
        "2048 and 8192 tokens, server and PyTorch, and other clients' latency meanwhile); "
        "writes long.json and long.png",
    )
    parser.add_argument(
        "--two-models",
        action="store_true",
        help="the two-model workload instead (lmscore.bench.two_models: the default model's "
        "short pairs while Gemma-3 scores --long-requests of --long-tokens, with and without "
        "--model-turn-ms); writes two_models.json",
    )
    parser.add_argument("--long-tokens", type=int, default=8192, help="with --two-models")
    parser.add_argument("--long-requests", type=int, default=4, help="with --two-models")
    parser.add_argument(
        "--after-idle",
        action="store_true",
        help="only the after-idle rows (lmscore.bench.after_idle: the batch and the short pair "
        "back to back and after 3 s and 15 s idle, each call with the CPU the machine's other "
        "processes ran meanwhile) on a default server, on one with --memory-hold 0 (the batch), "
        "and in a PyTorch process idling the same way (the machine's baseline; not with "
        "--no-pytorch); writes after_idle.json",
    )
    parser.add_argument(
        "--research",
        action="store_true",
        help="only the research outputs' costs (lmscore.bench.research_costs: entropy on vs "
        "off, 1,000 candidate labels vs one pass vs one-token completions); writes "
        "research.json",
    )
    parser.add_argument(
        "--no-research",
        action="store_true",
        help="skip the research outputs' costs in the full run (about a minute)",
    )
    parser.add_argument(
        "--output-dir", type=Path, default=Path("bench/results"), help="bench.json and bench.png"
    )


def run(args: argparse.Namespace) -> int:
    if args.long:
        from lmscore.bench import long

        results = long.run(args.model, args.source, args.output_dir, not args.no_pytorch)
        print(long.table(results))
        print(f"\nwrote {args.output_dir}/long.json and long.png", file=sys.stderr)
        return 0

    if args.two_models:
        from lmscore.bench import two_models
        from lmscore.export.paths import GEMMA_MODEL_NAME, default_model_dir, shipped_model_dir

        quiet_dir = default_model_dir(os.environ) if args.model == "default" else Path(args.model)
        busy_dir = shipped_model_dir(GEMMA_MODEL_NAME, os.environ)
        assert busy_dir is not None
        results = two_models.run(
            quiet_dir, busy_dir, args.output_dir, args.long_tokens, args.long_requests
        )
        print(two_models.table(results))
        print(f"\nwrote {args.output_dir}/two_models.json", file=sys.stderr)
        return 0

    if args.after_idle:
        import json

        from lmscore.bench.after_idle import measure_after_idle_servers
        from lmscore.bench.report import after_idle_table
        from lmscore.export.paths import default_model_dir

        model_dir = default_model_dir(os.environ) if args.model == "default" else Path(args.model)
        source = None if args.no_pytorch else args.source
        after_idle = measure_after_idle_servers(model_dir, source)
        args.output_dir.mkdir(parents=True, exist_ok=True)
        (args.output_dir / "after_idle.json").write_text(json.dumps(after_idle, indent=2) + "\n")
        print(after_idle_table(after_idle))
        print(f"\nwrote {args.output_dir}/after_idle.json", file=sys.stderr)
        return 0

    if args.research:
        import json

        from lmscore.bench import research_costs
        from lmscore.bench.report import research_table
        from lmscore.export.paths import default_model_dir

        model_dir = default_model_dir(os.environ) if args.model == "default" else Path(args.model)
        research = research_costs.run(model_dir, args.repeats)
        args.output_dir.mkdir(parents=True, exist_ok=True)
        (args.output_dir / "research.json").write_text(json.dumps(research, indent=2) + "\n")
        print(research_table(research))
        print(f"\nwrote {args.output_dir}/research.json", file=sys.stderr)
        return 0

    from lmscore.bench.lm_eval_wall import default_repo_root
    from lmscore.bench.report import table, write
    from lmscore.bench.runner import run_bench
    from lmscore.export.paths import default_model_dir

    model_dir = default_model_dir(os.environ) if args.model == "default" else Path(args.model)
    quantized: Path | None
    if args.quantized == "none":
        quantized = None
    elif args.quantized == "auto":
        from lmscore.export.quant_recipes import RECIPES

        candidates = [model_dir.parent / f"{model_dir.name}-{recipe}" for recipe in RECIPES]
        quantized = next((c for c in candidates if c.is_dir()), None)
    else:
        quantized = Path(args.quantized)
    lm_eval_root = None if args.no_lm_eval else args.repo_root or default_repo_root()
    results = run_bench(
        model_dir,
        args.source,
        quantized,
        args.repeats,
        args.concurrency,
        not args.no_pytorch,
        lm_eval_root,
    )
    if not args.no_research:
        from lmscore.bench import research_costs

        results["research"] = research_costs.run(model_dir, args.repeats)
    json_path, png_path = write(results, args.output_dir)
    print(table(results))
    print(f"\nwrote {json_path} and {png_path}", file=sys.stderr)
    return 0
