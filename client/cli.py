"""The `lmscore` command: export, serve and score.

`export` and `serve` live in lmscore.export.cli and lmscore.server.cli; their
heavy dependencies load only when the subcommand runs, so `lmscore score`
works from a client-only install.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from lmscore.client.channel import TlsOptions
from lmscore.client.errors import ScoringError
from lmscore.client.sync import ScoringClient
from lmscore.client.types import Item, ScoreOptions, ScoreResult

# Items per Score request in batch (--input) mode.
DEFAULT_ITEMS_PER_REQUEST = 32


class InputError(ValueError):
    pass


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
        help="with --output: keep its complete lines and score only what is missing",
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
        type=int,
        default=DEFAULT_ITEMS_PER_REQUEST,
        help="with --input: items sent per request (default: %(default)s)",
    )


def _options(args: argparse.Namespace) -> ScoreOptions:
    return ScoreOptions(
        token_details=args.token_details,
        top_k=args.top_k,
        marginal=args.marginal,
        truncate_prompt_left=args.truncate_prompt_left,
        add_bos=False if args.no_bos else None,
    )


def read_items(lines: Iterator[str], source: str) -> Iterator[tuple[Item, Any]]:
    """(item, id) per non-blank JSONL line; InputError names the line and the field."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{source}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise InputError(f"{where}: expected a JSON object")
        prompt = record.get("prompt", "")
        if not isinstance(prompt, str):
            raise InputError(f"{where}: 'prompt' must be a string")
        if ("completion" in record) == ("completions" in record):
            raise InputError(f"{where}: give exactly one of 'completion' and 'completions'")
        completions = record["completions"] if "completions" in record else [record["completion"]]
        if not isinstance(completions, list) or not all(isinstance(c, str) for c in completions):
            raise InputError(f"{where}: completions must be strings")
        yield Item(prompt, completions), record.get("id")


def result_record(result: ScoreResult, index: int, item_id: Any, token_details: bool) -> dict:
    record: dict[str, Any] = {"index": index, "completion_index": result.completion_index}
    if item_id is not None:
        record["id"] = item_id
    record.update(
        joint_logprob=result.joint_logprob,
        marginal_logprob=result.marginal_logprob,
        conditional_logprob=result.conditional_logprob,
        greedy=result.greedy,
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        truncated_prompt_tokens=result.truncated_prompt_tokens,
        first_token_scored=result.first_token_scored,
    )
    if token_details:
        record["tokens"] = [
            {
                "id": t.id,
                "text": t.text,
                "segment": t.segment,
                "logprob": t.logprob,
                "rank": t.rank,
                "top": [{"id": x.id, "text": x.text, "logprob": x.logprob} for x in t.top],
            }
            for t in result.tokens
        ]
    return record


def _chunks(records: Sequence[Any], size: int) -> Iterator[tuple[int, Sequence[Any]]]:
    for start in range(0, len(records), size):
        yield start, records[start : start + size]


def completed_results(path: Path) -> set[tuple[int, int]]:
    """(index, completion_index) of every complete line of an earlier run's output; a torn
    last line (the run was killed while writing it) is cut off the file."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1  # everything after the last newline is a torn line
    done = set()
    for number, line in enumerate(data[:keep].decode("utf-8").splitlines(), 1):
        try:
            record = json.loads(line)
            done.add((int(record["index"]), int(record["completion_index"])))
        except (ValueError, KeyError, TypeError):
            raise InputError(f"{path}:{number}: not a result line of lmscore score") from None
    if keep < len(data):
        with path.open("r+b") as handle:
            handle.truncate(keep)
    return done


def score_file(
    client: ScoringClient, args: argparse.Namespace, out: TextIO, done: set[tuple[int, int]]
) -> int:
    """Score every (line, completion) not in `done`, in input order, a chunk per request."""
    with args.input.open(encoding="utf-8") as handle:
        records = list(read_items(handle, str(args.input)))
    options = _options(args)
    # Per input record, the completion indices still to score.
    todo = [
        (index, [c for c in range(len(item.completions)) if (index, c) not in done])
        for index, (item, _) in enumerate(records)
    ]
    todo = [(index, wanted) for index, wanted in todo if wanted]
    total = sum(len(wanted) for _, wanted in todo)
    with tqdm(total=total, desc="scoring", unit="completion", file=sys.stderr) as bar:
        for _, chunk in _chunks(todo, max(1, args.items_per_request)):
            items = [
                Item(records[index][0].prompt, [records[index][0].completions[c] for c in wanted])
                for index, wanted in chunk
            ]
            results = client.score(items, options, timeout=args.timeout)
            for result in results:
                index, wanted = chunk[result.item_index]
                result = dataclasses.replace(
                    result, completion_index=wanted[result.completion_index]
                )
                record = result_record(result, index, records[index][1], args.token_details)
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
            bar.update(len(results))
    return 0


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
        with ScoringClient(
            args.server, timeout=args.timeout, **connection(args, os.environ)
        ) as client:
            if args.input is not None:
                if args.output is None:
                    return score_file(client, args, sys.stdout, set())
                done = completed_results(args.output) if args.resume else set()
                with args.output.open("a" if args.resume else "w", encoding="utf-8") as out:
                    return score_file(client, args, out, done)
            results = client.score_completions(args.prompt, args.completion, _options(args))
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
    score = commands.add_parser("score", help="score prompt/completion pairs on a server")
    add_score_arguments(score)
    score.set_defaults(run=run_score)
    bench = commands.add_parser("bench", help="benchmark PyTorch, ONNX Runtime and gRPC paths")
    bench_cli.add_arguments(bench)
    bench.set_defaults(run=bench_cli.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
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
