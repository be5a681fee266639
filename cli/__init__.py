"""The `lmscore` command: one subcommand per part of the project.

    export  lmscore.export.cli   source model -> ONNX directory
    serve   lmscore.server.cli   the gRPC server
    score   lmscore.client.cli   pairs or a JSONL file scored on a server
    surprisal  lmscore.client.surprisal  per-word surprisal of a stimuli file, on a server
    bench   lmscore.bench.cli    PyTorch, ONNX Runtime and gRPC side by side
    eval    lmscore.client.lmeval  lm-evaluation-harness with the `lmscore` model

This dispatcher sits above every part and only wires them: each subcommand's
module declares its flags (`add_arguments`) and runs them (`run`). Those modules
import their heavy dependencies only when they run, so `lmscore score` works
from a client-only install.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lmscore.bench import cli as bench_cli
from lmscore.client import cli as score_cli
from lmscore.client import surprisal as surprisal_cli
from lmscore.export import cli as export_cli
from lmscore.server import cli as server_cli

SUBCOMMANDS = (
    ("export", export_cli, "export a model to ONNX"),
    ("serve", server_cli, "run the gRPC server"),
    ("score", score_cli, "score prompt/completion pairs on a server"),
    ("surprisal", surprisal_cli, "per-word surprisal of a stimuli file (psycholinguistics)"),
    ("bench", bench_cli, "benchmark PyTorch, ONNX Runtime and gRPC paths"),
)
# What a subcommand that fails for a missing module needs installed.
EXTRAS = {"export": "export", "bench": "cpu,export,bench"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmscore", description="Score text with a causal language model over gRPC."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, module, summary in SUBCOMMANDS:
        epilog = getattr(module, "EPILOG", None)
        command = commands.add_parser(
            name,
            help=summary,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter
            if epilog
            else argparse.HelpFormatter,
        )
        module.add_arguments(command)
        command.set_defaults(run=module.run)
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
        extra = EXTRAS.get(args.command, "cpu")
        print(
            f"lmscore {args.command}: missing dependency {exc.name!r}; install lmscore[{extra}]",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        return 130
