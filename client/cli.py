"""The `lmscore` command: export, serve, score, bench and eval.

`export` and `serve` live in lmscore.export.cli and lmscore.server.cli, batch
scoring in lmscore.client.batch, `eval` in lmscore.client.lmeval; heavy
dependencies load only when their subcommand runs, so `lmscore score` works
from a client-only install.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lmscore.client.batch import (
    BATCH_HELP,
    DEFAULT_CONCURRENCY,
    DEFAULT_ITEMS_PER_REQUEST,
    InputError,
    result_record,
    run_batch,
    score_options,
)
from lmscore.client.channel import TlsOptions
from lmscore.client.errors import ScoringError
from lmscore.client.sync import ScoringClient
from lmscore.client.types import ScoreResult

# Items per Score request in batch (--input) mode.


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_score_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT of the server")
    parser.add_argument("--prompt", help="the prompt x (with --completion)")
    parser.add_argument(
        "--completion",
        action="append",
        help="a completion y of --prompt; repeat for several",
    )
    parser.add_argument(
        "--input",
        type=Path,
        help='JSONL file: {"prompt": str, "completion": str} or {"prompt": str, '
        '"completions": [str, ...]}, optional "id"',
    )
    parser.add_argument("--output", type=Path, help="JSONL results (default: standard output)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="with --output: keep its complete result lines and score only what is missing "
        "(and retry its error lines)",
    )
    parser.add_argument("--token-details", action="store_true", help="per-token log-probs")
    parser.add_argument(
        "--top-k", type=int, default=0, help="with --token-details: K alternatives per token"
    )
    parser.add_argument(
        "--marginal",
        choices=["same_pass", "separate_pass"],
        default="same_pass",
        help="compute log Pr(x) from the joint pass or a separate pass (default: %(default)s)",
    )
    parser.add_argument(
        "--truncate-prompt-left",
        action="store_true",
        help="drop prompt tokens from the left when a sequence exceeds the context",
    )
    parser.add_argument("--no-bos", action="store_true", help="do not prepend the BOS token")
    parser.add_argument("--timeout", type=float, help="deadline of each request in seconds")
    parser.add_argument(
        "--token-file", type=Path, help="bearer token for the server (else $LMSCORE_TOKEN)"
    )
    parser.add_argument("--tls", action="store_true", help="TLS with the system's root CAs")
    parser.add_argument("--tls-ca", type=Path, help="CA certificate (PEM) to trust; implies --tls")
    parser.add_argument("--tls-cert", type=Path, help="client certificate (PEM) for mutual TLS")
    parser.add_argument("--tls-key", type=Path, help="client private key (PEM) for mutual TLS")
    parser.add_argument("--tls-server-name", help="expected name in the server certificate")
    parser.add_argument(
        "--items-per-request",
        type=positive_int,
        default=DEFAULT_ITEMS_PER_REQUEST,
        metavar="N",
        help="with --input: items sent per request (default: %(default)s)",
    )
    parser.add_argument(
        "--concurrency",
        type=positive_int,
        default=DEFAULT_CONCURRENCY,
        metavar="N",
        help="with --input: requests in flight at once (default: %(default)s)",
    )
    parser.add_argument(
        "--summary-json",
        type=Path,
        metavar="PATH",
        help="with --input: also write the end-of-run summary to this file as JSON",
    )


def format_table(prompt: str, results: Sequence[ScoreResult]) -> str:
    header = ("completion", "log P(y|x)", "log P(x,y)", "log P(x)", "greedy", "tokens x+y")
    rows = [
        (
            json.dumps(r.scored_completion, ensure_ascii=False),
            f"{r.conditional_logprob:.4f}",
            f"{r.joint_logprob:.4f}",
            f"{r.marginal_logprob:.4f}",
            "yes" if r.greedy else "no",
            f"{r.prompt_tokens}+{r.completion_tokens}",
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [f"prompt: {json.dumps(prompt, ensure_ascii=False)}"]
    for row in [header, *rows]:
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def connection(args: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, Any]:
    """ScoringClient's token and tls arguments from the flags (files read here)."""
    token = args.token_file.read_text().strip() if args.token_file else environ.get("LMSCORE_TOKEN")
    tls = None
    if args.tls or args.tls_ca or args.tls_cert or args.tls_key:
        tls = TlsOptions(
            root_certificates=args.tls_ca.read_bytes() if args.tls_ca else None,
            certificate_chain=args.tls_cert.read_bytes() if args.tls_cert else None,
            private_key=args.tls_key.read_bytes() if args.tls_key else None,
            server_name=args.tls_server_name,
        )
    return {"token": token or None, "tls": tls}


def run_score(args: argparse.Namespace) -> int:
    if (args.input is None) == (args.prompt is None):
        print("lmscore score: give either --prompt with --completion, or --input", file=sys.stderr)
        return 2
    if args.resume and args.output is None:
        print("lmscore score: --resume needs --output", file=sys.stderr)
        return 2
    if args.prompt is not None and not args.completion:
        print("lmscore score: --prompt needs at least one --completion", file=sys.stderr)
        return 2
    try:
        client = ScoringClient(args.server, timeout=args.timeout, **connection(args, os.environ))
    except ValueError as exc:  # a --server list gRPC cannot resolve (see channel.grpc_target)
        print(f"lmscore score: --server: {exc}", file=sys.stderr)
        return 2
    try:
        with client:
            if args.input is not None:
                return run_batch(client, args)
            results = client.score_completions(args.prompt, args.completion, score_options(args))
    except (InputError, OSError) as exc:
        print(f"lmscore score: {exc}", file=sys.stderr)
        return 2
    except ScoringError as exc:
        print(f"lmscore score: {exc}", file=sys.stderr)
        return 1
    print(format_table(args.prompt, results))
    if args.token_details:
        for result in results:
            print(json.dumps(result_record(result, 0, None, True)["tokens"], ensure_ascii=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from lmscore.bench import cli as bench_cli
    from lmscore.export import cli as export_cli
    from lmscore.server import cli as server_cli

    parser = argparse.ArgumentParser(
        prog="lmscore", description="Score text with a causal language model over gRPC."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="export a model to ONNX")
    export_cli.add_arguments(export)
    export.set_defaults(run=export_cli.run)
    serve = commands.add_parser("serve", help="run the gRPC server")
    server_cli.add_arguments(serve)
    serve.set_defaults(run=server_cli.run)
    score = commands.add_parser(
        "score",
        help="score prompt/completion pairs on a server",
        epilog=BATCH_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_score_arguments(score)
    score.set_defaults(run=run_score)
    bench = commands.add_parser("bench", help="benchmark PyTorch, ONNX Runtime and gRPC paths")
    bench_cli.add_arguments(bench)
    bench.set_defaults(run=bench_cli.run)
    commands.add_parser(
        "eval",
        help="lm-evaluation-harness with the `lmscore` model: lmscore eval --model lmscore "
        "--model_args server=HOST:PORT --tasks ... (all arguments go to lm-eval)",
        add_help=False,
    )
    return parser


def run_eval(argv: Sequence[str]) -> int:
    """`lmscore eval ...`: lm-eval's own CLI with the `lmscore` model registered."""
    try:
        from lmscore.client.lmeval import run_lm_eval
    except ModuleNotFoundError as exc:
        print(f"lmscore eval: missing {exc.name!r}; install lmscore[lm-eval]", file=sys.stderr)
        return 2
    return run_lm_eval(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Every argument after `eval` belongs to lm-eval's CLI, untouched by our parser.
    if argv[:1] == ["eval"]:
        return run_eval(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except ModuleNotFoundError as exc:
        extra = {"export": "export", "bench": "cpu,export,bench"}.get(args.command, "cpu")
        print(
            f"lmscore {args.command}: missing dependency {exc.name!r}; install lmscore[{extra}]",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
