"""`lmscore serve`: command-line flags -> ServerConfig -> the server."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from lmscore.export.manifest import ManifestError
from lmscore.export.paths import default_model_dir, lmscore_home


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="default",
        help="exported model directory, or 'default' for $LMSCORE_HOME/models/"
        "SmolLM2-135M-Instruct (default: %(default)s)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s)")
    parser.add_argument("--port", type=int, default=50051, help="port (default: %(default)s)")
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="cuda fails unless CUDA actually loads; auto falls back to CPU (default: %(default)s)",
    )
    parser.add_argument(
        "--intra-op-threads",
        type=int,
        default=0,
        help="ONNX Runtime threads per run; 0 = one per physical core (default: %(default)s)",
    )
    parser.add_argument(
        "--max-batch-tokens",
        type=int,
        default=1024,
        help="padded tokens per model run (batch size x longest sequence) (default: %(default)s)",
    )
    parser.add_argument(
        "--cpu-arena",
        action="store_true",
        help="keep ONNX Runtime's CPU memory arena (a little faster; memory never shrinks)",
    )
    parser.add_argument(
        "--ort-cache-dir",
        type=Path,
        help="cache of ORT-optimized graphs for faster starts (default: $LMSCORE_HOME/ort-cache)",
    )
    parser.add_argument(
        "--no-ort-cache", action="store_true", help="optimize the graph at every start"
    )
    parser.add_argument(
        "--max-queue-delay-ms",
        type=float,
        default=2.0,
        help="dynamic batching: how long queued sequences wait for others to share a model "
        "run, unless --max-batch-tokens are already waiting (default: %(default)s)",
    )
    parser.add_argument(
        "--no-cross-request-batching",
        action="store_true",
        help="batch sequences only with others of the same request",
    )
    parser.add_argument(
        "--no-prefix-reuse",
        action="store_true",
        help="score every completion with a full pass, even when completions share a prompt",
    )
    parser.add_argument(
        "--max-top-k", type=int, default=20, help="largest top_k a request may ask for"
    )
    parser.add_argument(
        "--no-reflection", action="store_true", help="do not register gRPC server reflection"
    )
    parser.add_argument(
        "--shutdown-grace",
        type=float,
        default=10.0,
        help="seconds in-flight requests get to finish after SIGTERM (default: %(default)s)",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from lmscore.server.app import serve
    from lmscore.server.config import ServerConfig
    from lmscore.server.runtime import DeviceError

    model_dir = default_model_dir(os.environ) if args.model == "default" else Path(args.model)
    config = ServerConfig(
        model_dir=model_dir,
        host=args.host,
        port=args.port,
        device=args.device,
        intra_op_threads=args.intra_op_threads,
        cpu_arena=args.cpu_arena,
        optimized_cache_dir=None
        if args.no_ort_cache
        else (args.ort_cache_dir or lmscore_home(os.environ) / "ort-cache"),
        max_batch_tokens=args.max_batch_tokens,
        max_queue_delay_ms=args.max_queue_delay_ms,
        cross_request_batching=not args.no_cross_request_batching,
        prefix_reuse=not args.no_prefix_reuse,
        max_top_k=args.max_top_k,
        reflection=not args.no_reflection,
        shutdown_grace_seconds=args.shutdown_grace,
    )
    try:
        asyncio.run(serve(config))
    except ManifestError as exc:
        hint = " (run `lmscore export` first)" if args.model == "default" else ""
        print(f"lmscore serve: {exc}{hint}", file=sys.stderr)
        return 2
    except DeviceError as exc:
        print(f"lmscore serve: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        # grpc raises RuntimeError when the port cannot be bound.
        print(f"lmscore serve: {exc}", file=sys.stderr)
        return 1
    return 0
