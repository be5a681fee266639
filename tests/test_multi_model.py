"""Several models in one server (`lmscore serve --model NAME=DIR --model DIR`): each request
scored by the model it names, against that model's PyTorch reference; ListModels and
GetModelInfo per model; unknown names NOT_FOUND; duplicate names refused at start; metrics
and health per model; the Python clients, `lmscore score` and lm-eval's `model=` selecting
a model (the Node.js client's `--model`: tests/test_node_client.py)."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import (
    LMSCORE,
    ServerProcess,
    free_port,
    running_server,
    scrape_metrics,
    scrape_metrics_until,
)
from lmscore.client import (
    AsyncScoringClient,
    Item,
    ModelNotFoundError,
    RollingOptions,
    ScoreOptions,
    ScoreRequest,
    ScoringClient,
)
from reference import encode, reference_score, sequence_logprobs
from tiny_model import MAX_CONTEXT, SLIDING_CONTEXT

TOLERANCE = 1e-4
BOS = 1
# The tiny Llama under a name of its own, and conftest's second_tiny_model named after its
# directory.
NAMES = ("llama", "mistral")
PAIRS = [
    ("The Program", " is free software"),
    ("Everyone is permitted to copy ", "and distribute verbatim copies"),
]
TEXT = "You may convey verbatim copies of the Program's source code as you receive it."
SCORER = "lmscore.v1.Scorer"


@pytest.fixture(scope="module")
def torch_models(tiny_torch, second_tiny_model) -> dict[str, object]:
    """Each served name's PyTorch model (both share the tiny tokenizer)."""
    from transformers import AutoModelForCausalLM

    mistral = AutoModelForCausalLM.from_pretrained(str(second_tiny_model[0])).eval()
    return {"llama": tiny_torch[0], "mistral": mistral}


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def two_models(tiny_export: Path, second_tiny_model, metrics_port: int) -> Iterator[ServerProcess]:
    flags = ("--model", str(second_tiny_model[1]), "--metrics-port", str(metrics_port))
    with running_server(f"llama={tiny_export}", *flags) as server:
        yield server


@pytest.fixture
def client(two_models: ServerProcess) -> Iterator[ScoringClient]:
    with ScoringClient(two_models.address, timeout=60) as client:
        yield client


def test_each_request_is_scored_by_the_model_it_names(client, torch_models, tiny_torch) -> None:
    tokenizer = tiny_torch[1]
    items = [Item(p, [c]) for p, c in PAIRS]
    conditionals = {}
    for name in ("", *NAMES):  # empty: the first model
        model = torch_models[name or "llama"]
        results = client.score(items, ScoreOptions(model=name))
        for (prompt, completion), result in zip(PAIRS, results, strict=True):
            expected = reference_score(model, tokenizer, prompt, completion, BOS)
            assert result.joint_logprob == pytest.approx(expected.joint, abs=TOLERANCE)
            assert result.conditional_logprob == pytest.approx(expected.conditional, abs=TOLERANCE)
        conditionals[name] = [r.conditional_logprob for r in results]
        # A whole text, one window: every token predicted from BOS and those before it.
        [rolling] = client.score_rolling([TEXT], RollingOptions(model=name))
        logprobs, _, _ = sequence_logprobs(model, [BOS, *encode(tokenizer, TEXT)])
        assert rolling.logprob == pytest.approx(float(logprobs.sum()), abs=TOLERANCE)
    assert conditionals[""] == conditionals["llama"]
    # The two models disagree clearly, so the checks above tell them apart.
    assert all(abs(a - b) > 0.1 for a, b in zip(*(conditionals[n] for n in NAMES), strict=True))

    # One stream, requests for both models: each result from its request's model.
    requests = [ScoreRequest(items, ScoreOptions(model=name), request_id=name) for name in NAMES]
    streamed = {name: {} for name in NAMES}
    for result in client.score_stream(requests):
        streamed[result.request_id][result.item_index] = result.conditional_logprob
    for name in NAMES:
        assert [streamed[name][i] for i in range(len(items))] == pytest.approx(
            conditionals[name], abs=1e-9
        )


def test_list_models_and_model_info_per_model(client, two_models: ServerProcess) -> None:
    listed = client.list_models()
    assert [m.name for m in listed] == list(NAMES)
    assert [m.architecture for m in listed] == ["LlamaForCausalLM", "MistralForCausalLM"]
    assert [m.max_context for m in listed] == [MAX_CONTEXT, SLIDING_CONTEXT]
    # The export's own name stays in its manifest.
    assert [m.manifest["name"] for m in listed] == ["tiny-llama", "mistral"]
    assert client.model_info() == client.model_info("llama") == listed[0]
    assert client.model_info("mistral") == listed[1]

    async def from_async_client() -> tuple:
        async with AsyncScoringClient(two_models.address, timeout=60) as aclient:
            return await aclient.list_models(), await aclient.model_info("mistral")

    assert asyncio.run(from_async_client()) == (listed, listed[1])


def test_unknown_model_is_not_found_naming_the_field(client) -> None:
    served = "served: 'llama', 'mistral'"
    calls = [
        lambda: client.score([Item("x", ["y"])], ScoreOptions(model="gpt-17")),
        lambda: client.score_rolling(["x"], RollingOptions(model="gpt-17")),
        lambda: client.model_info("gpt-17"),
    ]
    for call in calls:
        with pytest.raises(ModelNotFoundError) as error:
            call()
        assert error.value.code == grpc.StatusCode.NOT_FOUND
        assert error.value.message == f"model: 'gpt-17' is not served here; {served}"
        assert list(error.value.field_violations) == ["model"]
    good = ScoreRequest([Item("x", ["y"])], ScoreOptions(model="mistral"))
    bad = ScoreRequest([Item("x", ["y"])], ScoreOptions(model="x" * 10_000))
    with pytest.raises(ModelNotFoundError) as error:
        list(client.score_stream([good, bad]))
    assert error.value.message.startswith(f"requests[1].model: '{'x' * 64}...' is not served")
    assert error.value.message.endswith(served)


def test_duplicate_names_fail_at_start_with_one_line(tiny_export: Path) -> None:
    began = time.monotonic()
    run = subprocess.run(
        [
            *(LMSCORE, "serve", "--port", str(free_port())),
            *("--model", str(tiny_export), "--model", f"tiny-llama={tiny_export.parent}"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip() == (
        f"lmscore serve: --model: two models named 'tiny-llama' ({tiny_export} and "
        f"{tiny_export.parent}); name one with --model NAME=DIR"
    )
    assert time.monotonic() - began < 30  # refused before any model loads


def test_metrics_and_health_per_model(client, two_models, metrics_port: int) -> None:
    before = scrape_metrics(metrics_port)
    client.score([Item("a", [" b", " c"])], ScoreOptions(model="mistral"))
    client.score([Item("a", [" b"])])
    with pytest.raises(ModelNotFoundError):
        client.score([Item("a", [" b"])], ScoreOptions(model="unknown"))
    not_found = (
        "lmscore_requests_total",
        (
            ("code", "NOT_FOUND"),
            ("method", f"/{SCORER}/Score"),
            ("model", ""),
            ("protocol", "grpc"),
        ),
    )
    after = scrape_metrics_until(
        metrics_port, lambda s: s.get(not_found, 0) > before.get(not_found, 0)
    )

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    score = f"/{SCORER}/Score"
    assert delta("lmscore_completions_scored_total", model="mistral") == 2
    assert delta("lmscore_completions_scored_total", model="llama") == 1  # the first
    calls = {"method": score, "protocol": "grpc"}
    assert delta("lmscore_requests_total", code="OK", model="mistral", **calls) == 1
    assert delta("lmscore_requests_total", code="OK", model="llama", **calls) == 1
    # An unknown name adds no series of its own.
    assert delta("lmscore_requests_total", code="NOT_FOUND", model="", **calls) == 1
    assert delta("lmscore_batch_sequences_sum", model="mistral") == 2
    infos = {
        dict(labels)["model"]: dict(labels) for (n, labels) in after if n == "lmscore_model_info"
    }
    assert {m: info["name"] for m, info in infos.items()} == {
        "llama": "tiny-llama",
        "mistral": "mistral",
    }

    with grpc.insecure_channel(two_models.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        serving = health_pb2.HealthCheckResponse.SERVING
        for service in ("", SCORER, f"{SCORER}/llama", f"{SCORER}/mistral"):
            response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert response.status == serving, service
        with pytest.raises(grpc.RpcError) as error:
            health.Check(health_pb2.HealthCheckRequest(service=f"{SCORER}/gpt-17"), timeout=5)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_cli_and_lm_eval_select_the_model(client, two_models: ServerProcess) -> None:
    from lmscore.client.lmeval import LmscoreLM

    prompt, completion = PAIRS[0]
    [llama] = client.score_completions(prompt, [completion])
    [mistral] = client.score_completions(prompt, [completion], ScoreOptions(model="mistral"))

    table = subprocess.run(
        [
            *(LMSCORE, "score", "--server", two_models.address, "--model", "mistral"),
            *("--prompt", prompt, "--completion", completion),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert f"{mistral.conditional_logprob:.4f}" in table
    assert f"{llama.conditional_logprob:.4f}" not in table

    lm = LmscoreLM(server=two_models.address, model="mistral")
    assert lm.max_length == SLIDING_CONTEXT - 1
    [(logprob, _)] = lm.loglikelihood([SimpleNamespace(args=(prompt, completion))], True)
    assert logprob == pytest.approx(mistral.conditional_logprob, abs=1e-9)
    with pytest.raises(ModelNotFoundError):
        LmscoreLM(server=two_models.address, model="gpt-17")
