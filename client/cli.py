"""`lmscore score`: prompt/completion pairs from the command line, or a JSONL file
(lmscore.client.batch), scored on a server. Needs only the client install."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lmscore.client.batch import (
    BATCH_HELP,
    DEFAULT_CONCURRENCY,
    DEFAULT_ITEMS_PER_REQUEST,
    UNITS,
    InputError,
    result_record,
    score_jsonl,
    to_bits,
)
from lmscore.client.channel import TlsOptions
from lmscore.client.errors import ScoringError
from lmscore.client.sync import ScoringClient
from lmscore.client.types import ScoreOptions
from lmscore.v1.results import MarginalMode, ScoreResult, Word

# `lmscore score --help` ends with the batch mode's rules.
EPILOG = BATCH_HELP


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that say which server and model, and how to reach them (`connection`):
    shared by the client's commands (`lmscore score`, `lmscore surprisal`)."""
    parser.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT of the server")
    parser.add_argument(
        "--model",
        default="",
        metavar="NAME",
        help="the served model to score with, one of those `lmscore serve --model` named "
        "(default: the server's first)",
    )
    parser.add_argument("--timeout", type=float, help="deadline of each request in seconds")
    parser.add_argument(
        "--token-file", type=Path, help="bearer token for the server (else $LMSCORE_TOKEN)"
    )
    parser.add_argument("--tls", action="store_true", help="TLS with the system's root CAs")
    parser.add_argument("--tls-ca", type=Path, help="CA certificate (PEM) to trust; implies --tls")
    parser.add_argument("--tls-cert", type=Path, help="client certificate (PEM) for mutual TLS")
    parser.add_argument("--tls-key", type=Path, help="client private key (PEM) for mutual TLS")
    parser.add_argument("--tls-server-name", help="expected name in the server certificate")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_connection_arguments(parser)
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
        "--marginal-mode",
        choices=typing.get_args(MarginalMode),
        default="same_pass",
        help="compute log Pr(x) from the joint pass or a separate pass (default: %(default)s)",
    )
    parser.add_argument(
        "--truncate-prompt-left",
        action="store_true",
        help="drop prompt tokens from the left when a sequence exceeds the context",
    )
    parser.add_argument(
        "--bos",
        dest="add_bos",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="prepend the BOS token, or not (default: as the model's tokenizer does, "
        "ModelInfo.bos_by_default)",
    )
    parser.add_argument(
        "--pmi",
        action="store_true",
        help="also score each completion after the empty context (the model's BOS, else EOS): "
        "pmi = log P(y|x) - log P(y|empty context)",
    )
    parser.add_argument(
        "--words",
        action="store_true",
        help="per-word log-probs of each completion, beginning-of-word corrected "
        '(docs/research.md); JSON lines get "words"',
    )
    parser.add_argument(
        "--prompt-words",
        action="store_true",
        help='per-word log-probs of the prompt too; JSON lines get "prompt_words"',
    )
    parser.add_argument(
        "--entropy",
        action="store_true",
        help="the entropy (nats) of the next-token distribution in token details and words "
        '(docs/research.md); JSON lines get "entropy" in each token and word',
    )
    parser.add_argument(
        "--label-token",
        dest="label_tokens",
        action="append",
        metavar="TEXT",
        help="a candidate label, a string of one token (repeat it): log P(label | prompt + "
        'completion) in one pass, JSON lines get "label_logprobs" in this order',
    )
    parser.add_argument(
        "--label-token-id",
        dest="label_token_ids",
        action="append",
        type=int,
        metavar="ID",
        help="a candidate label as a token id (repeat it; instead of --label-token)",
    )
    parser.add_argument(
        "--distribution-position",
        dest="distribution_positions",
        action="append",
        type=int,
        metavar="P",
        help="a position of the joint sequence (negative from its end, -1 after the last "
        "token) whose whole distribution comes back (repeat it); JSON lines get "
        '"distributions", each {"position", "logprobs": base64 of little-endian float32}',
    )
    parser.add_argument(
        "--unit",
        choices=UNITS,
        default="nats",
        help="log base of the printed table; bits also adds NAME_bits beside every log-prob "
        "of the JSON lines, whose nats fields stay (default: %(default)s)",
    )
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


def _number(unit: str, nats: float | None) -> str:
    value = to_bits(nats) if unit == "bits" else nats
    return "-" if value is None else f"{value:.4f}"


def format_table(prompt: str, results: Sequence[ScoreResult], unit: str = "nats") -> str:
    """One row per completion; in bits (log base 2) with `unit` "bits"; a PMI column when
    the results have one."""
    log = "log2" if unit == "bits" else "log"
    pmi = any(r.pmi is not None for r in results)

    header = (
        "completion",
        f"{log} P(y|x)",
        f"{log} P(x,y)",
        f"{log} P(x)",
        *([f"PMI ({unit})"] if pmi else []),
        "greedy",
        "tokens x+y",
    )
    rows = [
        (
            json.dumps(r.scored_completion, ensure_ascii=False),
            _number(unit, r.conditional_logprob),
            _number(unit, r.joint_logprob),
            _number(unit, r.marginal_logprob),
            *([_number(unit, r.pmi)] if pmi else []),
            "yes" if r.greedy else "no",
            f"{r.prompt_tokens}+{r.completion_tokens}",
        )
        for r in results
    ]
    return "\n".join(
        [f"prompt: {json.dumps(prompt, ensure_ascii=False)}", *_aligned([header, *rows])]
    )


def _aligned(rows: Sequence[Sequence[str]]) -> list[str]:
    """Table rows as lines: the first column left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(
            [row[0].ljust(widths[0])]
            + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        )
        for row in rows
    ]


def format_words(label: str, words: Sequence[Word], unit: str = "nats") -> str:
    """One row per word: its text, its [start, end) and both log-probs (and the entropy
    before it, when the words have it)."""
    log = "log2" if unit == "bits" else "log"
    entropy = any(w.entropy is not None for w in words)

    header = (
        "word",
        "start",
        "end",
        f"{log} P(w|before)",
        "uncorrected",
        *([f"entropy ({unit})"] if entropy else []),
    )
    rows = [
        (
            json.dumps(w.text, ensure_ascii=False),
            str(w.start),
            str(w.end),
            _number(unit, w.logprob),
            _number(unit, w.logprob_uncorrected),
            *([_number(unit, w.entropy)] if entropy else []),
        )
        for w in words
    ]
    return "\n".join([label, *_aligned([header, *rows])])


def format_labels(result: ScoreResult, labels: Sequence[str | int], unit: str = "nats") -> str:
    """One row per candidate label: log P(label | prompt + completion), and its share of
    the labels' total probability (the labels' own softmax, SGLang's apply_softmax)."""
    log = "log2" if unit == "bits" else "log"
    values = result.label_logprobs
    top = max(values)
    total = sum(math.exp(v - top) for v in values)
    header = ("label", f"{log} P(label|x+y)", "share of the labels")
    rows = [
        (
            json.dumps(label, ensure_ascii=False),
            _number(unit, value),
            f"{math.exp(value - top) / total:.4f}",
        )
        for label, value in zip(labels, values, strict=True)
    ]
    text = json.dumps(result.scored_prompt + result.scored_completion, ensure_ascii=False)
    return "\n".join([f"candidate labels after {text}:", *_aligned([header, *rows])])


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


def score_options(args: argparse.Namespace) -> ScoreOptions:
    """The options from the flags of the same names (--top-k is top_k, --bos is add_bos)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(ScoreOptions)}
    for name in ("label_tokens", "label_token_ids", "distribution_positions"):
        values[name] = tuple(values[name] or ())  # repeated flags: None when never given
    return ScoreOptions(**values)


def run_batch(client: ScoringClient, args: argparse.Namespace) -> int:
    """`--input`: score_jsonl, its summary on standard error, and the exit status."""
    summary = score_jsonl(
        client,
        args.input,
        args.output,
        options=score_options(args),
        items_per_request=args.items_per_request,
        concurrency=args.concurrency,
        timeout=args.timeout,
        resume=args.resume,
        unit=args.unit,
    )
    print(summary.format(), file=sys.stderr)
    if args.summary_json is not None:
        args.summary_json.write_text(json.dumps(summary.as_dict(), indent=2) + "\n")
    again = f"; rerun with --output {args.output} --resume to continue" if args.output else ""
    if summary.stopped == "interrupted":
        print(f"lmscore score: interrupted{again}", file=sys.stderr)
        return 130
    if summary.stopped is not None:
        print(f"lmscore score: stopped at {summary.stopped}{again}", file=sys.stderr)
        return 1
    if summary.errors:
        where = f"lines of {args.output}" if args.output else "output lines"
        retry = "; rerun with --resume to retry them" if args.output else ""
        print(
            f"lmscore score: {summary.errors} completions failed (their {where} have "
            f'"error"){retry}',
            file=sys.stderr,
        )
        return 1
    return 0


def run(args: argparse.Namespace) -> int:
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
    print(format_table(args.prompt, results, args.unit))
    if args.prompt_words and results:
        label = f"words of the prompt {json.dumps(results[0].scored_prompt, ensure_ascii=False)}:"
        print(format_words(label, results[0].prompt_words, args.unit))
    if args.words:
        for result in results:
            label = f"words of {json.dumps(result.scored_completion, ensure_ascii=False)}:"
            print(format_words(label, result.words, args.unit))
    labels = args.label_tokens or args.label_token_ids
    if labels:
        for result in results:
            print(format_labels(result, labels, args.unit))
    if args.token_details:
        for result in results:
            tokens = result_record(result, 0, None, True, args.unit)["tokens"]
            print(json.dumps(tokens, ensure_ascii=False))
    return 0
