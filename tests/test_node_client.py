"""The Node.js example client (client/node) against a real server on the tiny model.

It builds its stub from protos/lmscore/v1/scoring.proto at runtime and shares no code with
the Python client, so equal numbers from both prove the contract serves another language.
Node.js is required, not optional: CI has it, and a skipped test would prove nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from conftest import ServerProcess, free_port, running_server
from lmscore.client import Item, ScoreOptions, ScoringClient

NODE_CLIENT = Path(__file__).resolve().parent.parent / "client" / "node"
# Both clients receive the same doubles; JSON carries them exactly (shortest round-trip form).
TOLERANCE = 1e-9
LOGPROBS = ("joint_logprob", "marginal_logprob", "conditional_logprob")
# Unset (null in both clients) when the server leaves them out.
OPTIONAL_LOGPROBS = (
    "conditional_logprob_per_token",
    "conditional_logprob_per_char",
    "conditional_logprob_per_byte",
    "unconditional_logprob",
    "pmi",
)
SAME_FIELDS = (
    "item_index",
    "completion_index",
    "greedy",
    "prompt_tokens",
    "completion_tokens",
    "bos_added",
    "truncated_prompt_tokens",
    "first_token_scored",
    "scored_prompt",
    "scored_completion",
)


def run_node(*args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    node = shutil.which("node")
    if node is None:
        pytest.fail("`node` is not on PATH: install Node.js >= 18 and run scripts/setup.sh")
    if not (NODE_CLIENT / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail("client/node/node_modules is missing: run scripts/setup.sh (npm ci)")
    env = {k: v for k, v in os.environ.items() if k != "LMSCORE_TOKEN"}
    if token is not None:
        env["LMSCORE_TOKEN"] = token
    return subprocess.run(
        [node, str(NODE_CLIENT / "score.js"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


def score_with_node(server: ServerProcess, *args: str, token: str | None = None) -> Any:
    completed = run_node("--server", server.address, *args, token=token)
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)


def assert_same_results(node_results: list[dict[str, Any]], python_results: list) -> None:
    assert len(node_results) == len(python_results)
    for node, python in zip(node_results, python_results, strict=True):
        expected = python.to_dict()
        for field in LOGPROBS:
            assert abs(node[field] - expected[field]) <= TOLERANCE, (field, node, expected)
        for field in OPTIONAL_LOGPROBS:
            if expected[field] is None:
                assert node[field] is None, (field, node, expected)
            else:
                assert abs(node[field] - expected[field]) <= TOLERANCE, (field, node, expected)
        for field in SAME_FIELDS:
            assert node[field] == expected[field], (field, node, expected)
        assert len(node["tokens"]) == len(expected["tokens"])
        for node_token, token in zip(node["tokens"], expected["tokens"], strict=True):
            assert (node_token["id"], node_token["rank"]) == (token["id"], token["rank"])
            # Offsets in code points on both sides (not JavaScript's UTF-16 units).
            assert (node_token["start"], node_token["end"]) == (token["start"], token["end"])
            assert node_token["segment"] == f"SEGMENT_{token['segment'].upper()}"
            if token["logprob"] is None:
                assert node_token["logprob"] is None
            else:
                assert abs(node_token["logprob"] - token["logprob"]) <= TOLERANCE
            assert [t["id"] for t in node_token["top"]] == [t["id"] for t in token["top"]]
            for node_top, top in zip(node_token["top"], token["top"], strict=True):
                assert abs(node_top["logprob"] - top["logprob"]) <= TOLERANCE
        for name in ("words", "prompt_words"):
            assert len(node[name]) == len(expected[name])
            for node_word, word in zip(node[name], expected[name], strict=True):
                for field in ("text", "start", "end", "token_start", "token_end"):
                    assert node_word[field] == word[field], (field, node_word, word)
                for field in ("logprob", "logprob_uncorrected"):
                    if word[field] is None:
                        assert node_word[field] is None
                    else:
                        assert abs(node_word[field] - word[field]) <= TOLERANCE


def test_demo_pair_and_multiple_choice_equal_python(tiny_server: ServerProcess) -> None:
    document = score_with_node(tiny_server)
    # The demo input is printed back: one pair and one multiple-choice item.
    items = [Item(item["prompt"], item["completions"]) for item in document["items"]]
    assert [len(item.completions) > 1 for item in items] == [False, True]
    with ScoringClient(tiny_server.address, timeout=60) as client:
        assert document["model"] == client.model_info().name
        python_results = client.score(items)
    assert [(r["item_index"], r["completion_index"]) for r in document["results"]] == [
        (i, c) for i, item in enumerate(items) for c in range(len(item.completions))
    ]
    assert_same_results(document["results"], python_results)


def test_given_pairs_with_token_details_equal_python(tiny_server: ServerProcess) -> None:
    document = score_with_node(
        tiny_server,
        # A completion before any --prompt: the empty prompt.
        *("--completion", "Everyone is permitted to copy"),
        *("--prompt", "This License applies to any program "),
        *("--completion", "or other work", "--completion", "and more"),
        *("--prompt", "the", "--completion", "re"),
        *("--prompt", "Le robot 🤖 ", "--completion", "dit 中文 é", "--completion", ""),
        *("--top-k", "3", "--marginal-mode", "separate_pass", "--pmi"),
        *("--words", "--prompt-words"),
    )
    items = [
        Item(None, ["Everyone is permitted to copy"]),
        Item("This License applies to any program ", ["or other work", "and more"]),
        Item("the", ["re"]),
        Item("Le robot 🤖 ", ["dit 中文 é", ""]),
    ]
    assert [Item(item["prompt"], item["completions"]) for item in document["items"]] == items
    options = ScoreOptions(
        token_details=True,
        top_k=3,
        marginal_mode="separate_pass",
        pmi=True,
        words=True,
        prompt_words=True,
    )
    with ScoringClient(tiny_server.address, timeout=60) as client:
        python_results = client.score(items, options)
    assert all(len(r["tokens"][-1]["top"]) == 3 for r in document["results"])
    assert any(len(r["words"]) > 1 for r in document["results"])
    assert_same_results(document["results"], python_results)


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (("--top-k", "-1"), "options.top_k"),
        (("--prompt", "no completions"), "items[0].completions"),
    ],
)
def test_invalid_request_exits_non_zero_naming_the_field(
    tiny_server: ServerProcess, args: tuple[str, ...], field: str
) -> None:
    completed = run_node("--server", tiny_server.address, *args)
    assert completed.returncode != 0
    assert completed.stdout == ""
    assert "INVALID_ARGUMENT" in completed.stderr and field in completed.stderr


def test_model_flag_selects_a_served_model(tiny_export: Path, second_tiny_model) -> None:
    prompt, completion = "The Program", " is free software"
    with running_server(f"llama={tiny_export}", "--model", str(second_tiny_model[1])) as server:
        document = score_with_node(
            server, "--model", "mistral", "--prompt", prompt, "--completion", completion
        )
        unknown = run_node("--server", server.address, "--model", "gpt-17")
        with ScoringClient(server.address, timeout=60) as client:
            mistral = client.score([Item(prompt, [completion])], ScoreOptions(model="mistral"))
            llama = client.score([Item(prompt, [completion])])
    assert document["model"] == "mistral"
    assert_same_results(document["results"], mistral)
    assert abs(mistral[0].conditional_logprob - llama[0].conditional_logprob) > 0.1
    assert unknown.returncode != 0
    assert unknown.stderr.startswith("NOT_FOUND: model: 'gpt-17' is not served here")


def test_unreachable_server_is_unavailable() -> None:
    completed = run_node("--server", f"127.0.0.1:{free_port()}", "--timeout", "2")
    assert completed.returncode != 0
    assert completed.stderr.startswith("UNAVAILABLE")


def test_bearer_token_from_environment(tiny_export: Path, tmp_path: Path) -> None:
    token = "node-client-test-token"
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{token}\n")
    with running_server(tiny_export, "--auth-token-file", str(tokens), token=token) as server:
        refused = run_node("--server", server.address, "--prompt", "a", "--completion", " b")
        assert refused.returncode != 0 and refused.stderr.startswith("UNAUTHENTICATED")
        document = score_with_node(server, "--prompt", "a", "--completion", " b", token=token)
        with ScoringClient(server.address, token=token, timeout=60) as client:
            assert_same_results(document["results"], client.score([Item("a", [" b"])]))
