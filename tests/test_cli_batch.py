"""`lmscore score --input`: concurrency, resume, per-completion errors and the summary,
against a real `lmscore serve` with the tiny model."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import LMSCORE, ServerProcess, running_server
from lmscore.client import Item, ScoreOptions, ScoringClient
from lmscore.client.batch import (
    MAX_LINE_BYTES,
    InputError,
    InputRecord,
    _chunks,
    score_jsonl,
)
from tiny_model import MAX_CONTEXT

ITEMS_PER_REQUEST = 3
WORDS = "the program is free software you can redistribute it and modify it".split()  # noqa: SIM905


@pytest.fixture(scope="module")
def exact_server(tiny_export: Path) -> Iterator[ServerProcess]:
    """A server that batches each request alone, so a request's scores do not depend on
    what else is in flight: the same chunks give bit-identical floats at any concurrency."""
    with running_server(tiny_export, "--no-cross-request-batching") as server:
        yield server


def make_records(count: int = 40) -> list[dict]:
    records = []
    for i in range(count):
        prompt = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(1 + i % 7))
        completions = [f" {WORDS[(i * 3 + k) % len(WORDS)]}" for k in range(1 + i % 3)]
        record: dict = {"prompt": prompt.capitalize()}
        if len(completions) == 1 and i % 2:
            record["completion"] = completions[0]
        else:
            record["completions"] = completions
        if i % 4 == 0:
            record["id"] = f"q{i}"
        records.append(record)
    return records


def write_input(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def lmscore_score(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [LMSCORE, "score", "--server", server.address, *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def completions_of(record: dict) -> list[str]:
    return record["completions"] if "completions" in record else [record["completion"]]


def summary_line(stderr: str) -> str:
    [line] = [line for line in stderr.splitlines() if line.startswith("summary: ")]
    return line


def test_concurrency_gives_the_sequential_output_and_the_clients_scores(
    exact_server: ServerProcess, tmp_path: Path
) -> None:
    records = make_records()
    source = write_input(tmp_path / "in.jsonl", records)
    outputs = {}
    for concurrency in (1, 4):
        target = tmp_path / f"out-{concurrency}.jsonl"
        summary = tmp_path / f"summary-{concurrency}.json"
        run = lmscore_score(
            exact_server,
            "--input",
            str(source),
            "--output",
            str(target),
            "--concurrency",
            str(concurrency),
            "--items-per-request",
            str(ITEMS_PER_REQUEST),
            "--summary-json",
            str(summary),
        )
        assert run.returncode == 0, run.stderr
        outputs[concurrency] = target.read_text()
        total = sum(len(completions_of(r)) for r in records)
        numbers = json.loads(summary.read_text())
        assert numbers["items"] == len(records)
        assert numbers["completions"] == total
        assert (numbers["errors"], numbers["skipped"], numbers["stopped"]) == (0, 0, None)
        rows = [json.loads(line) for line in outputs[concurrency].splitlines()]
        # BOS + prompt + completion of every scored sequence.
        assert numbers["tokens"] == sum(
            1 + r["prompt_tokens"] + r["completion_tokens"] for r in rows
        )
        assert numbers["tokens_per_s"] > 0
        assert f"{len(records)} items, {total} completions scored, 0 errors" in summary_line(
            run.stderr
        )
    assert outputs[4] == outputs[1]  # same lines, same order, same floats

    rows = [json.loads(line) for line in outputs[4].splitlines()]
    expected_keys = [(i, c) for i, r in enumerate(records) for c in range(len(completions_of(r)))]
    assert [(r["index"], r["completion_index"]) for r in rows] == expected_keys
    items = [Item(r["prompt"], completions_of(r)) for r in records]
    expected = []
    with ScoringClient(exact_server.address) as client:
        for start in range(0, len(items), ITEMS_PER_REQUEST):
            expected += client.score(items[start : start + ITEMS_PER_REQUEST])
    for row, result in zip(rows, expected, strict=True):
        assert row.get("id") == records[row["index"]].get("id")
        for key in ("joint_logprob", "marginal_logprob", "conditional_logprob"):
            assert row[key] == getattr(result, key)  # exact: the same requests
        assert row["greedy"] == result.greedy
        assert (row["prompt_tokens"], row["completion_tokens"]) == (
            result.prompt_tokens,
            result.completion_tokens,
        )


def test_score_jsonl_from_python_writes_what_the_cli_writes(
    exact_server: ServerProcess, tmp_path: Path
) -> None:
    """Batch scoring as a library call with plain arguments, token details included."""
    source = write_input(tmp_path / "in.jsonl", make_records(12))
    flags = ["--items-per-request", str(ITEMS_PER_REQUEST), "--token-details", "--top-k", "2"]
    cli_out, py_out = tmp_path / "cli.jsonl", tmp_path / "python.jsonl"
    run = lmscore_score(exact_server, "--input", str(source), "--output", str(cli_out), *flags)
    assert run.returncode == 0, run.stderr
    with ScoringClient(exact_server.address) as client:
        summary = score_jsonl(
            client,
            source,
            py_out,
            options=ScoreOptions(token_details=True, top_k=2),
            items_per_request=ITEMS_PER_REQUEST,
            concurrency=2,
        )
    assert (summary.items, summary.errors, summary.stopped) == (12, 0, None)
    assert py_out.read_text() == cli_out.read_text()
    first = json.loads(py_out.read_text().splitlines()[0])
    assert [t["segment"] for t in first["tokens"]][:2] == ["bos", "prompt"]
    assert all(len(t["top"]) == 2 for t in first["tokens"][1:])


def test_resume_after_a_crash_completes_the_file_without_duplicates(
    tiny_server: ServerProcess, tmp_path: Path
) -> None:
    records = make_records()
    source = write_input(tmp_path / "in.jsonl", records)
    target = tmp_path / "out.jsonl"
    common = ["--input", str(source), "--output", str(target), "--concurrency", "4"]
    common += ["--items-per-request", str(ITEMS_PER_REQUEST)]
    assert lmscore_score(tiny_server, *common).returncode == 0
    full = target.read_text().splitlines(keepends=True)
    half = len(full) // 2
    # A crash: half the lines written, the next one torn.
    target.write_text("".join(full[:half]) + full[half][:25])

    summary = tmp_path / "summary.json"
    run = lmscore_score(tiny_server, *common, "--resume", "--summary-json", str(summary))
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert [(r["index"], r["completion_index"]) for r in rows] == [
        (r["index"], r["completion_index"]) for r in map(json.loads, full)
    ]  # every (record, completion) once, in input order
    for row, line in zip(rows, full, strict=True):
        assert row == pytest.approx(json.loads(line), abs=1e-4)
    numbers = json.loads(summary.read_text())
    assert (numbers["skipped"], numbers["completions"]) == (half, len(full) - half)
    assert f"{half} skipped by --resume" in summary_line(run.stderr)

    # Nothing left: a second resume scores nothing and leaves the file as it is.
    before = target.read_text()
    run = lmscore_score(tiny_server, *common, "--resume")
    assert run.returncode == 0, run.stderr
    assert target.read_text() == before
    assert f"0 completions scored, 0 errors, {len(full)} skipped" in summary_line(run.stderr)


def test_a_rejected_completion_gets_an_error_line_and_the_run_goes_on(
    tiny_server: ServerProcess, tmp_path: Path
) -> None:
    too_long = " ".join(WORDS * (MAX_CONTEXT // 4))  # far beyond the tiny model's context
    records = make_records(12)
    records[4] = {"prompt": "The program", "completions": [" is free", too_long, " is not"]}
    records[9] = {"prompt": too_long, "completion": " yes", "id": "long"}
    source = tmp_path / "in.jsonl"
    # A blank line first: error lines name the input line, "index" counts records.
    source.write_text("\n" + "".join(json.dumps(r) + "\n" for r in records))
    target = tmp_path / "out.jsonl"
    common = ["--input", str(source), "--output", str(target), "--concurrency", "4"]
    common += ["--items-per-request", "4"]
    run = lmscore_score(tiny_server, *common)
    assert run.returncode == 1
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    keys = [(i, c) for i, r in enumerate(records) for c in range(len(completions_of(r)))]
    assert [(r["index"], r["completion_index"]) for r in rows] == keys
    errors = [r for r in rows if "error" in r]
    assert [(e["index"], e["completion_index"], e["line"]) for e in errors] == [
        (4, 1, 6),
        (9, 0, 11),
    ]
    assert errors[1]["id"] == "long"
    for error in errors:
        assert error["error"]["code"] == "INVALID_ARGUMENT"
        assert "exceeds the model's context" in error["error"]["message"]
    assert f"{source}:6: completion 1: INVALID_ARGUMENT" in run.stderr
    assert f"{source}:11: completion 0: INVALID_ARGUMENT" in run.stderr
    assert ", 2 errors" in summary_line(run.stderr)
    # The other completions of the rejected item and of its request still score.
    with ScoringClient(tiny_server.address) as client:
        good = client.score([Item("The program", [" is free", " is not"])])
    by_key = {(r["index"], r["completion_index"]): r for r in rows}
    for completion, result in zip((0, 2), good, strict=True):
        row = by_key[(4, completion)]
        assert row["conditional_logprob"] == pytest.approx(result.conditional_logprob, abs=1e-4)

    # --resume retries the error lines (they fail again) and keeps everything else once.
    run = lmscore_score(tiny_server, *common, "--resume")
    assert run.returncode == 1
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert sorted((r["index"], r["completion_index"]) for r in rows) == keys
    assert [(r["index"], r["completion_index"]) for r in rows if "error" in r] == [(4, 1), (9, 0)]
    summary = summary_line(run.stderr)
    assert "0 completions scored (2 retried), 2 errors" in summary
    assert f"{len(keys) - 2} skipped by --resume" in summary


def test_a_request_level_failure_stops_at_its_line(
    tiny_server: ServerProcess, tmp_path: Path
) -> None:
    source = write_input(tmp_path / "in.jsonl", make_records(8))
    target = tmp_path / "out.jsonl"
    run = lmscore_score(
        tiny_server,
        "--input",
        str(source),
        "--output",
        str(target),
        "--token-details",
        "--top-k",
        "100000",  # beyond the server's --max-top-k: every request fails the same way
    )
    assert run.returncode == 1
    assert f"stopped at {source}:1: INVALID_ARGUMENT: options.top_k" in run.stderr
    assert "--resume" in run.stderr
    assert target.read_text() == ""


def test_input_without_completions_is_refused_before_scoring(
    tiny_server: ServerProcess, tmp_path: Path
) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text('{"prompt": "x", "completion": "y"}\n\n{"prompt": "x", "completions": []}\n')
    run = lmscore_score(tiny_server, "--input", str(source))
    assert run.returncode == 2
    assert f"{source}:3: 'completions' must hold at least one string" in run.stderr
    assert run.stdout == ""


@pytest.mark.parametrize("flag", ["--concurrency", "--items-per-request"])
def test_zero_is_a_usage_error(flag: str, tmp_path: Path) -> None:
    source = write_input(tmp_path / "in.jsonl", make_records(2))
    run = subprocess.run(
        [LMSCORE, "score", "--input", str(source), flag, "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert f"argument {flag}: must be at least 1, got 0" in run.stderr


def only_line(stderr: str) -> str:
    """The one line an input error prints (no traceback, no summary)."""
    assert "Traceback" not in stderr
    [line] = stderr.splitlines()
    return line


def test_a_line_that_is_not_utf8_is_refused_naming_it(
    tiny_server: ServerProcess, tmp_path: Path
) -> None:
    bad = b'{"prompt": "ab\xff\xfe", "completion": " y"}\n'
    source = tmp_path / "in.jsonl"
    source.write_bytes(
        '{"prompt": "été", "completion": " oui"}\r\n'.encode()  # CRLF, 2-byte UTF-8
        + b'{"prompt": "x",\r "completion": " y"}\n'  # a lone CR is JSON whitespace, no line end
        + bad
        + b'{"prompt": "x", "completion": " y"}\n'
    )
    run = lmscore_score(tiny_server, "--input", str(source))
    assert run.returncode == 2  # as every input error
    offset = bad.index(b"\xff")
    assert only_line(run.stderr) == (
        f"lmscore score: {source}:3: not UTF-8 (byte 0xff at offset {offset} of the line)"
    )
    assert run.stdout == ""


def test_a_lone_surrogate_escape_is_refused_naming_its_line(
    tiny_server: ServerProcess, tmp_path: Path
) -> None:
    """JSON's \\ud800 parses, but has no UTF-8 form to send (protobuf strings are UTF-8)."""
    source = tmp_path / "in.jsonl"
    source.write_text(
        '{"prompt": "x", "completion": " y"}\n\n{"prompt": "x", "completions": [" a\\ud800b"]}\n'
    )
    run = lmscore_score(tiny_server, "--input", str(source))
    assert run.returncode == 2
    assert only_line(run.stderr) == (
        f"lmscore score: {source}:3: 'completions' holds a lone surrogate (\\ud800), "
        "which is not UTF-8"
    )


def test_a_line_over_the_size_limit_is_refused_naming_it(
    tiny_server: ServerProcess, tmp_path: Path
) -> None:
    """A 50 MB line (over any request the server takes by default) is refused before any
    request, naming its line and the limit; a line at the limit reads, and the lines after
    it keep their numbers."""
    good = '{"prompt": "x", "completion": " y"}\n'
    bad = '{"prompt": "x"}\n'
    huge = tmp_path / "huge.jsonl"
    with huge.open("w") as handle:
        handle.write(good + '{"prompt": "' + "a" * (50 * 2**20) + '", "completion": " b"}\n')
        handle.write(good + bad)
    run = lmscore_score(tiny_server, "--input", str(huge))
    assert run.returncode == 2
    assert only_line(run.stderr) == (
        f"lmscore score: {huge}:2: line longer than the limit of {MAX_LINE_BYTES} bytes "
        "(16 MiB) per input line"
    )
    assert run.stdout == ""

    head = '{"prompt": "x", "completion": " y", "pad": "'
    at_limit = head + "a" * (MAX_LINE_BYTES - len(head) - 2) + '"}'
    assert len(at_limit) == MAX_LINE_BYTES
    long = tmp_path / "long.jsonl"
    long.write_text(good + at_limit + "\n" + good + bad + good)
    run = lmscore_score(tiny_server, "--input", str(long))
    assert run.returncode == 2
    assert only_line(run.stderr) == (
        f"lmscore score: {long}:4: give exactly one of 'completion' and 'completions'"
    )

    # From Python: the limit is an argument; over it, the line is named before any request.
    with ScoringClient(tiny_server.address) as client, pytest.raises(InputError) as raised:
        score_jsonl(client, long, tmp_path / "out.jsonl", max_line_bytes=MAX_LINE_BYTES - 1)
    assert str(raised.value) == (
        f"{long}:2: line longer than the limit of {MAX_LINE_BYTES - 1} bytes per input line"
    )


def test_requests_are_cut_by_the_bytes_of_their_lines() -> None:
    sizes = [10, 5 << 20, 4 << 20, 9 << 20, 10, 10, 10]
    records = [InputRecord(i + 1, Item("x", [" y"]), None, size) for i, size in enumerate(sizes)]
    todo = [(index, [0]) for index in range(len(records))]
    chunks = [[index for index, _ in chunk] for chunk in _chunks(todo, records, 2)]
    # At most 2 records and 8 MiB of lines a request; a record over 8 MiB goes alone.
    assert chunks == [[0, 1], [2], [3], [4, 5], [6]]


def test_a_request_over_the_servers_message_size_is_split_to_name_its_line(
    tiny_export: Path, tmp_path: Path
) -> None:
    """The server's gRPC refuses a request over its --max-message-bytes with no field named:
    the client splits it, the records that fit score, and the one too large alone gets
    error lines naming its line (it used to stop the run naming the request's first line)."""

    def text(size: int) -> str:
        return " ".join(WORDS * (size // 40 + 1))[:size]

    records = [{"prompt": "The program", "completion": " is"}]
    records += [{"prompt": text(30_000), "completion": " free"} for _ in range(3)]
    records += [{"prompt": text(100_000), "completions": [" a", " b"]}]
    records += [{"prompt": "The program", "completion": " is not"}]
    source = write_input(tmp_path / "in.jsonl", records)
    target = tmp_path / "out.jsonl"
    with running_server(tiny_export, "--max-message-bytes", "65536") as server:
        run = lmscore_score(
            server,
            *("--input", str(source), "--output", str(target), "--truncate-prompt-left"),
        )
    assert run.returncode == 1, run.stderr
    assert "stopped at" not in run.stderr
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert [(r["index"], r["completion_index"]) for r in rows] == [
        (0, 0),
        (1, 0),
        (2, 0),
        (3, 0),
        (4, 0),
        (4, 1),
        (5, 0),
    ]
    errors = [r for r in rows if "error" in r]
    assert [(e["index"], e["line"], e["error"]["code"]) for e in errors] == [
        (4, 5, "RESOURCE_EXHAUSTED"),
        (4, 5, "RESOURCE_EXHAUSTED"),
    ]
    assert "larger than max" in errors[0]["error"]["message"]
    assert f"{source}:5: completion 0: RESOURCE_EXHAUSTED" in run.stderr
    assert ", 5 completions scored, 2 errors" in summary_line(run.stderr)
