"""`lmscore serve`: command-line flags -> ServerConfig -> the server."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from lmscore.export.manifest import ManifestError
from lmscore.export.paths import default_model_dir
from lmscore.server import defaults


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
        default=defaults.MAX_BATCH_TOKENS,
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
        help="cache the ORT-optimized graph here and load it on later starts (off by default: "
        "on the benchmark machine the cached graph started no faster and ran ~18%% slower)",
    )
    parser.add_argument(
        "--max-queue-delay-ms",
        type=float,
        default=defaults.MAX_QUEUE_DELAY_MS,
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
        "--min-prefix-reuse-tokens",
        type=int,
        default=defaults.MIN_PREFIX_REUSE_SAVED_TOKENS,
        metavar="N",
        help="reuse a shared prompt's pass only when it saves at least N tokens, "
        "(completions - 1) x prompt tokens; shorter prompts batch better as full passes "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--max-top-k",
        type=int,
        default=defaults.MAX_TOP_K,
        help="largest top_k a request may ask for",
    )
    parser.add_argument(
        "--reflection",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="register gRPC server reflection (default: on when --host is loopback, off "
        "otherwise: it describes every service to anyone who can connect)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off)",
    )
    parser.add_argument("--metrics-host", help="bind address of the metrics port (default: --host)")
    parser.add_argument(
        "--shutdown-grace",
        type=float,
        default=10.0,
        help="seconds in-flight requests get to finish after SIGTERM (default: %(default)s)",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default: %(default)s)")
    limits = parser.add_argument_group("limits")
    for flag, default, what in [
        ("--max-message-bytes", defaults.MAX_MESSAGE_BYTES, "size of one gRPC message"),
        ("--max-items-per-request", defaults.MAX_ITEMS_PER_REQUEST, "items in one request"),
        (
            "--max-completions-per-item",
            defaults.MAX_COMPLETIONS_PER_ITEM,
            "completions of one item",
        ),
        ("--max-tokens-per-item", 0, "tokens of one joint sequence (0: the model's context)"),
        (
            "--max-tokens-per-request",
            defaults.MAX_TOKENS_PER_REQUEST,
            "tokens over all sequences of one request",
        ),
        (
            "--max-concurrent-requests",
            defaults.MAX_CONCURRENT_REQUESTS,
            "Score/ScoreStream calls in flight",
        ),
        (
            "--max-queue-length",
            defaults.MAX_QUEUE_LENGTH,
            "sequences waiting for the model, all requests together",
        ),
    ]:
        limits.add_argument(flag, type=int, default=default, help=f"{what} (default: %(default)s)")
    security = parser.add_argument_group("security")
    security.add_argument("--tls-cert", type=Path, help="server certificate (PEM); enables TLS")
    security.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    security.add_argument(
        "--tls-client-ca", type=Path, help="CA (PEM) that client certificates must chain to (mTLS)"
    )
    security.add_argument(
        "--auth-token-file",
        type=Path,
        help="bearer tokens, one per line; also read from $LMSCORE_AUTH_TOKENS (comma-separated)",
    )
    security.add_argument(
        "--health-without-auth",
        action="store_true",
        help="let grpc.health.v1 calls through without a token (for load-balancer probes)",
    )


class ConfigError(ValueError):
    pass


def _read(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None


def auth_tokens(token_file: Path | None, environ: dict[str, str]) -> tuple[str, ...]:
    tokens = [t.strip() for t in environ.get("LMSCORE_AUTH_TOKENS", "").split(",")]
    data = _read(token_file, "--auth-token-file")
    if data is not None:
        tokens += [line.strip() for line in data.decode().splitlines()]
    return tuple(t for t in tokens if t and not t.startswith("#"))


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from lmscore.server.app import serve
    from lmscore.server.config import ServerConfig
    from lmscore.server.runtime import DeviceError

    model_dir = default_model_dir(os.environ) if args.model == "default" else Path(args.model)
    try:
        if (args.tls_cert is None) != (args.tls_key is None):
            raise ConfigError("--tls-cert and --tls-key go together")
        if args.tls_client_ca is not None and args.tls_cert is None:
            raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key")
        tls = [
            _read(args.tls_cert, "--tls-cert"),
            _read(args.tls_key, "--tls-key"),
            _read(args.tls_client_ca, "--tls-client-ca"),
        ]
        tokens = auth_tokens(args.auth_token_file, dict(os.environ))
        if args.auth_token_file is not None and not tokens:
            raise ConfigError(f"--auth-token-file {args.auth_token_file} holds no token")
    except ConfigError as exc:
        print(f"lmscore serve: {exc}", file=sys.stderr)
        return 2
    config = ServerConfig(
        model_dir=model_dir,
        host=args.host,
        port=args.port,
        device=args.device,
        intra_op_threads=args.intra_op_threads,
        cpu_arena=args.cpu_arena,
        optimized_cache_dir=args.ort_cache_dir,
        max_batch_tokens=args.max_batch_tokens,
        max_queue_delay_ms=args.max_queue_delay_ms,
        cross_request_batching=not args.no_cross_request_batching,
        prefix_reuse=not args.no_prefix_reuse,
        min_prefix_reuse_saved_tokens=args.min_prefix_reuse_tokens,
        max_top_k=args.max_top_k,
        reflection=args.reflection,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        shutdown_grace_seconds=args.shutdown_grace,
        max_message_bytes=args.max_message_bytes,
        max_items_per_request=args.max_items_per_request,
        max_completions_per_item=args.max_completions_per_item,
        max_tokens_per_item=args.max_tokens_per_item or None,
        max_tokens_per_request=args.max_tokens_per_request,
        max_concurrent_requests=args.max_concurrent_requests,
        max_queue_length=args.max_queue_length,
        tls_cert=tls[0],
        tls_key=tls[1],
        tls_client_ca=tls[2],
        auth_tokens=tokens,
        health_without_auth=args.health_without_auth,
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
