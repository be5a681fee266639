"""A real `lmscore serve` on loopback with the tiny model, checked against PyTorch.

Every number the server returns is compared with tests/reference.py, which
computes it from the same weights with transformers and shares no code with
the server.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import LMSCORE, ServerProcess, free_port
from lmscore.client import (
    AsyncScoringClient,
    InvalidArgumentError,
    Item,
    ModelNotFoundError,
    RetryPolicy,
    ScoreOptions,
    ScoreRequest,
    ScoringClient,
    ScoringError,
)
from lmscore.export.manifest import Manifest
from reference import reference_score
from tiny_model import MAX_CONTEXT, VOCAB_SIZE

TOLERANCE = 1e-4
BOS = 1

PAIRS = [
    ("This License applies to any program ", "or other work"),
    ("You may convey verbatim copies of the Program's source code", " as you receive it"),
    ("THERE IS NO WARRANTY FOR THE PROGRAM", ", TO THE EXTENT PERMITTED BY APPLICABLE LAW."),
    ("Each contributor grants you", " a non-exclusive, worldwide, royalty-free patent license"),
    ("the", "re"),  # a token merges across the boundary
    ("Free ", ""),  # the completion is just the moved whitespace
    ("", "Everyone is permitted to copy and distribute verbatim copies"),  # empty prompt
]


@pytest.fixture(scope="module")
def client(tiny_server: ServerProcess):
    with ScoringClient(tiny_server.address, timeout=60) as client:
        yield client


def assert_matches(result, expected) -> None:
    assert result.joint_logprob == pytest.approx(expected.joint, abs=TOLERANCE)
    assert result.marginal_logprob == pytest.approx(expected.marginal, abs=TOLERANCE)
    assert result.conditional_logprob == pytest.approx(expected.conditional, abs=TOLERANCE)
    assert result.greedy == expected.greedy
    assert result.prompt_tokens == len(expected.prompt_ids)
    assert result.completion_tokens == len(expected.completion_ids)


def test_scores_equal_pytorch_on_every_pair(client: ScoringClient, tiny_torch) -> None:
    model, tokenizer = tiny_torch
    results = client.score([Item(p, [c]) for p, c in PAIRS])
    assert [(r.item_index, r.completion_index) for r in results] == [
        (i, 0) for i in range(len(PAIRS))
    ]
    for (prompt, completion), result in zip(PAIRS, results, strict=True):
        assert_matches(result, reference_score(model, tokenizer, prompt, completion, BOS))
        assert result.bos_added and result.first_token_scored
        assert result.conditional_logprob == pytest.approx(
            result.joint_logprob - result.marginal_logprob, abs=1e-9
        )


def test_whitespace_rule_and_edge_cases(client: ScoringClient) -> None:
    moved, merged, only_whitespace, empty_prompt = client.score(
        [Item(p, [c]) for p, c in (PAIRS[0], PAIRS[4], PAIRS[5], PAIRS[6])]
    )
    assert (moved.scored_prompt, moved.scored_completion) == (
        PAIRS[0][0].rstrip(),
        " or other work",
    )
    assert merged.completion_tokens > 0
    assert (only_whitespace.scored_prompt, only_whitespace.scored_completion) == ("Free", " ")
    assert only_whitespace.completion_tokens == 1
    assert empty_prompt.marginal_logprob == 0.0
    assert empty_prompt.conditional_logprob == empty_prompt.joint_logprob


def test_truly_empty_completion_scores_the_prompt_only(client: ScoringClient) -> None:
    [result] = client.score([Item("Free software", [""])])
    assert result.completion_tokens == 0 and result.conditional_logprob == 0.0
    assert result.joint_logprob == result.marginal_logprob < 0


def test_greedy_flag_follows_the_argmax(client: ScoringClient, tiny_torch) -> None:
    import torch

    model, tokenizer = tiny_torch
    prompt = tokenizer("The Program", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([[BOS, *prompt]])).logits[0, -1]
    best, second = torch.topk(logits, 2).indices.tolist()
    greedy, not_greedy = client.score_completions(prompt, [[best], [second]])
    assert greedy.greedy is True and not_greedy.greedy is False


def test_several_completions_of_one_prompt(client: ScoringClient, tiny_torch) -> None:
    model, tokenizer = tiny_torch
    prompt = "The licensee may"
    completions = [" copy", " modify", " distribute the Program", " not"]
    results = client.score_completions(prompt, completions)
    assert [r.completion_index for r in results] == [0, 1, 2, 3]
    for completion, result in zip(completions, results, strict=True):
        assert_matches(result, reference_score(model, tokenizer, prompt, completion, BOS))
    assert len({round(r.marginal_logprob, 4) for r in results}) == 1


def test_separate_marginal_pass_agrees_with_same_pass_on_every_item(client: ScoringClient) -> None:
    items = [Item(p, [c, " and more"]) for p, c in PAIRS]
    same = client.score(items)
    separate = client.score(items, ScoreOptions(marginal_mode="separate_pass"))
    assert len(same) == len(separate) == 2 * len(PAIRS)
    for a, b in zip(same, separate, strict=True):
        assert a.marginal_logprob == pytest.approx(b.marginal_logprob, abs=TOLERANCE)
        assert a.conditional_logprob == pytest.approx(b.conditional_logprob, abs=TOLERANCE)
        assert a.joint_logprob == pytest.approx(b.joint_logprob, abs=TOLERANCE)


def test_batched_equals_unbatched(client: ScoringClient) -> None:
    # Different lengths in one request: padding, attention mask and position ids must be right.
    items = [Item(p, [c]) for p, c in PAIRS] + [Item("A", [" b"]), Item("x" * 40, [" y"])]
    batched = client.score(items)
    for item, result in zip(items, batched, strict=True):
        [alone] = client.score([item])
        assert result.joint_logprob == pytest.approx(alone.joint_logprob, abs=TOLERANCE)
        assert result.marginal_logprob == pytest.approx(alone.marginal_logprob, abs=TOLERANCE)
        assert result.greedy == alone.greedy


def test_token_ids_input_equals_text_input(client: ScoringClient, tiny_torch) -> None:
    _, tokenizer = tiny_torch
    [text] = client.score([Item("The Program", [" is free"])])
    prompt_ids = tokenizer("The Program", add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(" is free", add_special_tokens=False)["input_ids"]
    [ids] = client.score([Item(prompt_ids, [completion_ids])])
    [mixed] = client.score([Item("The Program", [completion_ids])])
    for other in (ids, mixed):
        assert other.joint_logprob == pytest.approx(text.joint_logprob, abs=TOLERANCE)
        assert other.conditional_logprob == pytest.approx(text.conditional_logprob, abs=TOLERANCE)


def test_without_bos_the_first_token_is_not_scored(client: ScoringClient, tiny_torch) -> None:
    model, tokenizer = tiny_torch
    [result] = client.score([Item("Source code", [" means"])], ScoreOptions(add_bos=False))
    expected = reference_score(model, tokenizer, "Source code", " means", bos_id=None)
    assert not result.bos_added and not result.first_token_scored
    assert_matches(result, expected)
    [empty_prompt] = client.score([Item("", ["Source code"])], ScoreOptions(add_bos=False))
    expected = reference_score(model, tokenizer, "", "Source code", bos_id=None)
    assert not empty_prompt.first_token_scored
    assert_matches(empty_prompt, expected)


def test_token_details_equal_pytorch(client: ScoringClient, tiny_torch) -> None:
    model, tokenizer = tiny_torch
    prompt, completion = PAIRS[1]
    [result] = client.score([Item(prompt, [completion])], ScoreOptions(token_details=True, top_k=5))
    expected = reference_score(model, tokenizer, prompt, completion, BOS, top_k=5)
    ids = [BOS, *expected.prompt_ids, *expected.completion_ids]
    assert [t.id for t in result.tokens] == ids
    assert result.tokens[0].segment == "bos" and result.tokens[0].logprob is None
    assert [t.segment for t in result.tokens[1:]] == ["prompt"] * len(expected.prompt_ids) + [
        "completion"
    ] * len(expected.completion_ids)
    for token, logprob, rank, top in zip(
        result.tokens[1:],
        expected.token_logprobs[1:],
        expected.token_ranks[1:],
        expected.top_ids[1:],
        strict=True,
    ):
        assert token.logprob == pytest.approx(logprob, abs=TOLERANCE)
        assert token.rank == rank
        assert [t.id for t in token.top] == top
        assert token.top[0].logprob >= token.logprob - 1e-6
    assert "".join(t.text for t in result.tokens[1:]) == prompt + completion


def test_too_long_is_refused_unless_truncation_is_asked(client: ScoringClient, tiny_torch) -> None:
    model, tokenizer = tiny_torch
    prompt = "This License " * 40
    with pytest.raises(InvalidArgumentError) as error:
        client.score([Item(prompt, [" applies"])])
    message = str(error.value)
    assert f"context of {MAX_CONTEXT} tokens" in message and "items[0].completions[0]" in message
    assert error.value.field_violations.keys() == {"items[0].completions[0]"}
    [result] = client.score([Item(prompt, [" applies"])], ScoreOptions(truncate_prompt_left=True))
    expected = reference_score(model, tokenizer, prompt, " applies", BOS, truncate_to=MAX_CONTEXT)
    assert result.truncated_prompt_tokens > 0
    assert 1 + result.prompt_tokens + result.completion_tokens == MAX_CONTEXT
    assert_matches(result, expected)


@pytest.mark.parametrize(
    ("items", "options", "field"),
    [
        ([], ScoreOptions(), "items"),
        ([Item("x", [])], ScoreOptions(), "items[0].completions"),
        ([Item([1, VOCAB_SIZE], ["y"])], ScoreOptions(), "items[0].prompt_token_ids[1]"),
        (
            [Item("x", ["y", [VOCAB_SIZE + 7]])],
            ScoreOptions(),
            "items[0].completions[1].token_ids[0]",
        ),
        ([Item("x", ["y"])], ScoreOptions(top_k=-3), "options.top_k"),
        ([Item("x", ["y"])], ScoreOptions(top_k=10_000), "options.top_k"),
    ],
)
def test_bad_input_gets_invalid_argument_naming_the_field(
    client: ScoringClient, items, options, field
) -> None:
    with pytest.raises(InvalidArgumentError) as error:
        client.score(items, options)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error.value.message
    assert field in error.value.field_violations
    assert client.score([Item("still", [" serving"])])[0].completion_tokens > 0


def test_unknown_model_is_not_found(client: ScoringClient) -> None:
    with pytest.raises(ModelNotFoundError, match="'gpt-17'"):
        client.score([Item("x", ["y"])], ScoreOptions(model="gpt-17"))
    [ok] = client.score([Item("x", ["y"])], ScoreOptions(model="tiny-llama"))
    assert ok.completion_tokens == 1


def test_unset_completion_is_invalid_argument(tiny_server: ServerProcess) -> None:
    from lmscore.v1 import scoring_pb2 as pb
    from lmscore.v1 import scoring_pb2_grpc

    request = pb.ScoreRequest(items=[pb.ScoreItem(prompt="x", completions=[pb.Completion()])])
    with grpc.insecure_channel(tiny_server.address) as channel:
        stub = scoring_pb2_grpc.ScorerStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            list(stub.Score(request, timeout=30))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "items[0].completions[0]" in error.value.details()


def test_score_stream_tags_each_request(client: ScoringClient) -> None:
    requests = [
        ScoreRequest([Item(p, [c])], request_id=f"r{i}") for i, (p, c) in enumerate(PAIRS[:3])
    ]
    streamed = sorted(client.score_stream(requests), key=lambda r: r.request_index)
    assert [(r.request_index, r.request_id) for r in streamed] == [(0, "r0"), (1, "r1"), (2, "r2")]
    single = client.score([Item(p, [c]) for p, c in PAIRS[:3]])
    for a, b in zip(streamed, single, strict=True):
        assert a.joint_logprob == pytest.approx(b.joint_logprob, abs=TOLERANCE)


def test_score_stream_names_the_bad_request(client: ScoringClient) -> None:
    requests = [ScoreRequest([Item("x", ["y"])]), ScoreRequest([Item("x", [])])]
    with pytest.raises(InvalidArgumentError, match=r"requests\[1\]\.items\[0\]\.completions"):
        list(client.score_stream(requests))


def test_async_client_matches_sync_client(
    tiny_server: ServerProcess, client: ScoringClient
) -> None:
    items = [Item(p, [c]) for p, c in PAIRS]

    async def run():
        async with AsyncScoringClient(tiny_server.address, timeout=60) as aclient:
            assert await aclient.is_server_ready()
            info = await aclient.model_info()
            scored = await aclient.score(items, ScoreOptions(token_details=True, top_k=2))
            streamed = [
                r async for r in aclient.score_stream([ScoreRequest(items, request_id="a")])
            ]
            with pytest.raises(InvalidArgumentError):
                await aclient.score([Item("x", ["y"])], ScoreOptions(top_k=-1))
            return info, scored, streamed

    info, scored, streamed = asyncio.run(run())
    assert info.name == "tiny-llama"
    sync = client.score(items, ScoreOptions(token_details=True, top_k=2))
    assert scored == sync
    assert len(streamed) == len(items) and {r.request_id for r in streamed} == {"a"}


def test_model_info_reports_the_manifest(client: ScoringClient, tiny_export: Path) -> None:
    info = client.model_info()
    manifest = Manifest.read(tiny_export)
    assert info.name == manifest.name == "tiny-llama"
    assert info.vocab_size == VOCAB_SIZE and info.max_context == MAX_CONTEXT
    assert (info.bos_token_id, info.eos_token_id) == (1, 2)
    assert info.providers == ("CPUExecutionProvider",)
    assert info.export_validation_max_abs_diff == manifest.validation_max_abs_diff
    assert info.manifest["source_sha256"] == manifest.source_sha256


def test_health_reports_serving(tiny_server: ServerProcess) -> None:
    with grpc.insecure_channel(tiny_server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "lmscore.v1.Scorer"):
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_cli_prints_a_table(tiny_server: ServerProcess, client: ScoringClient) -> None:
    out = subprocess.run(
        [
            LMSCORE,
            "score",
            "--server",
            tiny_server.address,
            "--prompt",
            "The Program ",
            "--completion",
            "is free",
            "--completion",
            "is not",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    lines = out.strip().splitlines()
    assert lines[0] == 'prompt: "The Program "'
    assert lines[1].split()[:2] == ["completion", "log"]
    expected = client.score_completions("The Program ", ["is free", "is not"])
    for line, result in zip(lines[2:], expected, strict=True):
        assert line.startswith(json.dumps(result.scored_completion))
        assert f"{result.conditional_logprob:.4f}" in line


def test_cli_jsonl_batch(tiny_server: ServerProcess, client: ScoringClient, tmp_path: Path) -> None:
    records = [
        {"prompt": "The Program ", "completion": "is free", "id": "a"},
        {"prompt": "Copyright", "completions": [" notice", " holder", ""]},
        {"prompt": "", "completion": "Everyone"},
    ]
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    target = tmp_path / "out.jsonl"
    subprocess.run(
        [
            LMSCORE,
            "score",
            "--server",
            tiny_server.address,
            "--input",
            str(source),
            "--output",
            str(target),
            "--token-details",
            "--top-k",
            "2",
            "--items-per-request",
            "2",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert [(r["index"], r["completion_index"]) for r in rows] == [
        (0, 0),
        (1, 0),
        (1, 1),
        (1, 2),
        (2, 0),
    ]
    assert rows[0]["id"] == "a" and "id" not in rows[1]
    expected = client.score(
        [
            Item("The Program ", ["is free"]),
            Item("Copyright", [" notice", " holder", ""]),
            Item("", ["Everyone"]),
        ]
    )
    for row, result in zip(rows, expected, strict=True):
        for key in ("joint_logprob", "marginal_logprob", "conditional_logprob"):
            assert row[key] == pytest.approx(getattr(result, key), abs=1e-9)
        assert row["greedy"] == result.greedy
        assert (row["prompt_tokens"], row["completion_tokens"]) == (
            result.prompt_tokens,
            result.completion_tokens,
        )
        assert len(row["tokens"]) == 1 + result.prompt_tokens + result.completion_tokens
        assert all(len(t["top"]) == 2 for t in row["tokens"][1:])


def test_cli_reports_bad_input_lines(tiny_server: ServerProcess, tmp_path: Path) -> None:
    source = tmp_path / "bad.jsonl"
    source.write_text('{"prompt": "x", "completion": "y"}\n{"prompt": "x"}\n')
    run = subprocess.run(
        [LMSCORE, "score", "--server", tiny_server.address, "--input", str(source)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert f"{source}:2" in run.stderr and "completion" in run.stderr


def test_client_retries_unavailable_until_the_server_comes_up(tiny_export: Path) -> None:
    port = free_port()
    started: list[ServerProcess] = []
    timer = threading.Timer(1.0, lambda: started.append(ServerProcess(tiny_export, port=port)))
    timer.start()
    try:
        retry = RetryPolicy(max_attempts=60, initial_backoff=0.2, max_backoff=0.5)
        with ScoringClient(f"127.0.0.1:{port}", retry=retry, timeout=30) as client:
            began = time.monotonic()
            [result] = client.score([Item("x", [" y"])])
        assert result.completion_tokens > 0
        assert time.monotonic() - began > 0.9
    finally:
        timer.join()
        for server in started:
            server.stop()


def test_client_does_not_retry_other_errors(tiny_server: ServerProcess) -> None:
    calls = []

    class CountingClient(ScoringClient):
        def _stream(self, call, request, timeout):  # type: ignore[override]
            calls.append(1)
            return super()._stream(call, request, timeout)

    with CountingClient(tiny_server.address, retry=RetryPolicy(max_attempts=5)) as client:
        began = time.monotonic()
        with pytest.raises(ScoringError):
            client.score([Item("x", [])])
    assert len(calls) == 1 and time.monotonic() - began < 5
