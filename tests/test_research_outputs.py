"""Entropy, candidate labels and whole distributions (issue 24, docs/research.md).

The head's entropy and gathered log-probs against float64 and against its numpy twin, the
engine on a fake causal model (numbers, the one-pass runs, every refusal), an export
without the research outputs (refused for them alone), then a real server on the tiny
model against PyTorch float64. The shipped models' checks are in
tests/test_e2e_default_model.py and tests/test_e2e_gemma.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from test_engine import VOCAB, FakeCausalModel
from test_export import logits_only_graph
from test_http import post

from conftest import LMSCORE, free_port, running_server
from lmscore.client import InvalidArgumentError, Item, ScoreOptions, ScoringClient
from lmscore.server.config import EngineSettings
from lmscore.server.engine import ScoringEngine
from lmscore.server.requests import InvalidInput, ItemInput, ModelFacts, RequestTooLarge
from lmscore.server.scoring import BatchScores, gather_logprobs, score_positions
from lmscore.server.tokenization import TextTokenizer
from reference import split_pair
from tiny_model import build_tokenizer

TOLERANCE = 1e-4
BOS_ID = 1


def float64_logprobs(logits: np.ndarray) -> np.ndarray:
    wide = logits.astype(np.float64)
    top = wide.max(-1, keepdims=True)
    return wide - top - np.log(np.exp(wide - top).sum(-1, keepdims=True))


def float64_entropy(logits: np.ndarray) -> np.ndarray:
    logprobs = float64_logprobs(logits)
    return -(np.exp(logprobs) * logprobs).sum(-1)


# The head, on logits the test chooses.


@pytest.mark.parametrize("vocab", [49152, 50257])
def test_head_entropy_and_gathers_equal_float64_and_the_twin(tmp_path: Path, vocab: int) -> None:
    from lmscore.export.head import ENTROPY_OUTPUT, GATHERED_OUTPUT, add_scoring_head

    path = logits_only_graph(tmp_path / "head.onnx", vocab)
    add_scoring_head(path)
    rng = np.random.default_rng(7)
    # A realistic spread: a few likely tokens over a long tail, and one near-uniform row.
    logits = (rng.standard_normal((2, 24, vocab)) * 3).astype(np.float32)
    logits[1, 5] = rng.standard_normal(vocab).astype(np.float32) * 1e-3
    targets = rng.integers(0, vocab, (2, 24))
    positions = np.array([[23, 0, 7], [5, 5, 11]])
    ids = rng.integers(0, vocab, 300)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    entropy, gathered = session.run(
        [ENTROPY_OUTPUT, GATHERED_OUTPUT],
        {
            "input_ids": targets,
            "raw": logits,
            "target_ids": targets,
            "top_k": np.array([0]),
            "gather_positions": positions,
            "gather_ids": ids,
        },
    )
    expected = float64_entropy(logits)
    assert np.abs(entropy - expected).max() < 5e-6
    assert abs((entropy - expected).mean()) < 5e-7  # no drift
    assert abs(entropy[1, 5] - np.log(vocab)) < 1e-5  # near-uniform: log V
    logprobs = float64_logprobs(logits)
    wanted = np.stack([logprobs[b][positions[b]][:, ids] for b in range(2)])
    assert gathered.shape == (2, 3, 300)
    assert np.abs(gathered - wanted).max() < 5e-6
    # The numpy twin (the fake model's and the tests' scorer) agrees with both.
    twin = score_positions(logits[0], targets[0]).entropies
    assert twin is not None
    assert np.abs(twin - expected[0]).max() < 5e-6
    assert np.abs(gather_logprobs(logits[1][positions[1]], ids) - wanted[1]).max() < 5e-6


def test_head_with_no_positions_to_read_returns_an_empty_gather(tmp_path: Path) -> None:
    from lmscore.export.graph_io import model_feeds
    from lmscore.export.head import GATHERED_OUTPUT, add_scoring_head

    path = logits_only_graph(tmp_path / "head.onnx", 512)
    add_scoring_head(path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = np.zeros((2, 3), np.int64)
    inputs = [i for i in session.get_inputs() if i.name != "raw"]
    assert {"gather_positions", "gather_ids"} <= {i.name for i in inputs}
    feeds = model_feeds(inputs, ids, np.ones_like(ids))  # no positions given: none read
    feeds["raw"] = np.zeros((2, 3, 512), np.float32)
    (gathered,) = session.run([GATHERED_OUTPUT], feeds)
    assert gathered.shape[:2] == (2, 0)


# The engine, on a fake causal model whose head has the research outputs.


class ResearchFakeModel(FakeCausalModel):
    """FakeCausalModel with the head's entropy and gathered_logprobs (the numpy twin)."""

    entropy = True
    gathers = True

    def score(  # type: ignore[override]
        self,
        input_ids,
        attention_mask,
        target_ids,
        top_k=0,
        past=None,
        past_repeats=1,
        return_present=False,
        gather_positions=None,
        gather_ids=None,
    ):
        scores, present = super().score(
            input_ids, attention_mask, target_ids, top_k, past, past_repeats, return_present
        )
        batch, new = input_ids.shape
        past_ids = (
            np.zeros((batch, 0), np.int64)
            if past is None
            else np.repeat(past["ids"][:, 0, :, 0], past_repeats, axis=0)
        )
        entropies = np.zeros((batch, new), np.float32)
        gathered = None
        if gather_positions is not None and gather_positions.shape[1]:
            gathered = np.zeros((batch, gather_positions.shape[1], len(gather_ids)), np.float32)
        for b in range(batch):
            row = [*past_ids[b], *input_ids[b]]
            logits = self.logits(row)[len(row) - new :].astype(np.float32)
            entropies[b] = score_positions(logits, target_ids[b]).entropies
            if gathered is not None:
                gathered[b] = gather_logprobs(logits[gather_positions[b]], gather_ids)
        return (
            BatchScores(
                scores.logprobs,
                scores.ranks,
                scores.top_logprobs,
                scores.top_ids,
                scores.word_start_logprobs,
                entropies,
                gathered,
            ),
            present,
        )


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> TextTokenizer:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    build_tokenizer().backend_tokenizer.save(str(path))
    return TextTokenizer(path)


def research_engine(tokenizer: TextTokenizer, model=None, **settings) -> ScoringEngine:
    return ScoringEngine(
        model or ResearchFakeModel(),
        tokenizer,
        ModelFacts(max_context=64, vocab_size=VOCAB, bos_token_id=BOS_ID),
        EngineSettings(**{"min_prefix_reuse_tokens": 1, **settings}),
    )


ITEMS = [
    ItemInput("The licensee ", ["may copy", "shall not", ""]),
    ItemInput([5, 6, 7], [[8, 9], "text"]),
    ItemInput("", ["Free software"]),
]


@pytest.mark.parametrize("max_batch_tokens", [4096, 8])
def test_engine_returns_entropy_labels_and_distributions_of_its_model(
    tokenizer: TextTokenizer, max_batch_tokens: int
) -> None:
    engine = research_engine(tokenizer, max_batch_tokens=max_batch_tokens, prefill_chunk_tokens=3)
    model = engine.model
    labels = (3, 400, 17, 3)
    options = ScoreOptions(
        token_details=True,
        entropy=True,
        label_token_ids=labels,
        distribution_positions=(0, -1, 2),
    )
    plan = engine.plan(ITEMS, options)
    assert not plan.prefix_groups  # labels are read after the last token: full passes

    async def collect() -> list:
        return [r async for r in engine.score(plan)]

    streamed = sorted(asyncio.run(collect()), key=lambda r: (r.item_index, r.completion_index))
    in_thread = engine.score_sync(engine.plan(ITEMS, options))
    for results in (streamed, in_thread):
        assert len(results) == 6
        for result in results:
            ids = [t.id for t in result.tokens]
            logprobs = float64_logprobs(model.logits(ids))  # type: ignore[attr-defined]
            entropy = -(np.exp(logprobs) * logprobs).sum(-1)
            assert result.tokens[0].entropy is None
            got = [t.entropy for t in result.tokens[1:]]
            assert np.allclose(got, entropy[:-1], atol=TOLERANCE, rtol=0)
            assert np.allclose(result.label_logprobs, logprobs[-1][list(labels)], atol=TOLERANCE)
            n = len(ids)
            assert [d.position for d in result.distributions] == [0, n - 1, 2]
            for d in result.distributions:
                values = np.frombuffer(d.logprobs, "<f4")
                assert values.shape == (VOCAB,)
                assert np.abs(values - logprobs[d.position]).max() < TOLERANCE
                assert np.array_equal(values, np.asarray(d.values()))


def test_labels_alone_read_only_their_ids_in_one_pass_per_sequence(
    tokenizer: TextTokenizer,
) -> None:
    engine = research_engine(tokenizer)
    strings = (" the", "a", " of")
    ids = tuple(tokenizer.encode(s)[0] for s in strings)
    items = [ItemInput("The licensee may", [""])]
    [by_id] = engine.score_sync(engine.plan(items, ScoreOptions(label_token_ids=ids)))
    [by_text] = engine.score_sync(engine.plan(items, ScoreOptions(label_tokens=strings)))
    assert by_id.label_logprobs == by_text.label_logprobs
    assert len(by_id.label_logprobs) == 3
    # One model run for the prompt, whatever the labels (today's way: a completion each).
    calls = engine.model.calls  # type: ignore[attr-defined]
    assert len(calls) == 2
    assert not by_id.tokens and not by_id.distributions


def test_a_lone_token_still_has_labels(tokenizer: TextTokenizer) -> None:
    engine = research_engine(tokenizer)
    [result] = engine.score_sync(
        engine.plan([ItemInput("", [""])], ScoreOptions(label_token_ids=(5, 9)))
    )
    logprobs = float64_logprobs(engine.model.logits([BOS_ID]))  # type: ignore[attr-defined]
    assert np.allclose(result.label_logprobs, logprobs[0][[5, 9]], atol=TOLERANCE)


def test_words_carry_the_entropy_before_them(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    build_tokenizer().backend_tokenizer.save(str(path))
    model = ResearchFakeModel()
    model.word_start_mask = np.zeros(VOCAB, bool)
    model.word_start_mask[: VOCAB // 2] = True
    engine = ScoringEngine(
        model,
        TextTokenizer(path, model.word_start_mask),
        ModelFacts(max_context=64, vocab_size=VOCAB, bos_token_id=BOS_ID),
    )
    options = ScoreOptions(words=True, prompt_words=True, token_details=True, entropy=True)
    [result] = engine.score_sync(engine.plan([ItemInput("The old man", [" the boat"])], options))
    for word in result.words + result.prompt_words:
        assert word.entropy == result.tokens[word.token_start].entropy
        assert word.entropy is not None


@pytest.mark.parametrize(
    ("options", "field", "says"),
    [
        (ScoreOptions(entropy=True), "options.entropy", "token_details"),
        (
            ScoreOptions(label_token_ids=(1,), label_tokens=("a",)),
            "options.label_tokens",
            "not both",
        ),
        (ScoreOptions(label_token_ids=(1, VOCAB)), "options.label_token_ids[1]", "outside"),
        (ScoreOptions(label_token_ids=(1,) * (VOCAB + 1)), "options.label_token_ids", "exceed"),
        (ScoreOptions(label_tokens=("a", " licensee")), "options.label_tokens[1]", "not one"),
        (ScoreOptions(label_tokens=("",)), "options.label_tokens[0]", "0 tokens"),
        (
            ScoreOptions(distribution_positions=(0, 99)),
            "options.distribution_positions[1]",
            "outside",
        ),
        (
            ScoreOptions(distribution_positions=(-99,)),
            "options.distribution_positions[0]",
            "outside",
        ),
    ],
)
def test_engine_refuses_research_options_naming_the_field(
    tokenizer: TextTokenizer, options: ScoreOptions, field: str, says: str
) -> None:
    engine = research_engine(tokenizer)
    with pytest.raises(InvalidInput) as error:
        engine.plan([ItemInput("The licensee", [" may"])], options)
    assert error.value.field == field
    assert says in error.value.description


def test_labels_need_a_token_to_follow(tokenizer: TextTokenizer) -> None:
    engine = research_engine(tokenizer)
    with pytest.raises(InvalidInput) as error:
        engine.plan([ItemInput("", [""])], ScoreOptions(label_token_ids=(1,), add_bos=False))
    assert error.value.field == "items[0].completions[0]"


def test_distributions_over_the_response_limit_are_refused_naming_the_field(
    tokenizer: TextTokenizer,
) -> None:
    engine = research_engine(tokenizer, max_response_bytes=4 * VOCAB * 3)
    items = [ItemInput("The licensee", [" may"])]
    engine.plan(items, ScoreOptions(distribution_positions=(0, 1)))  # fits
    with pytest.raises(RequestTooLarge) as error:
        engine.plan(items, ScoreOptions(distribution_positions=(0, 1, 2)))
    assert error.value.field == "options.distribution_positions"
    assert "--max-response-bytes" in error.value.description


def test_a_model_without_the_research_outputs_refuses_them_alone(
    tokenizer: TextTokenizer,
) -> None:
    engine = research_engine(tokenizer, model=FakeCausalModel())  # no entropy, no gathers
    items = [ItemInput("The licensee", [" may"])]
    for options, field in [
        (ScoreOptions(token_details=True, entropy=True), "options.entropy"),
        (ScoreOptions(label_token_ids=(1,)), "options.label_token_ids"),
        (ScoreOptions(label_tokens=("a",)), "options.label_tokens"),
        (ScoreOptions(distribution_positions=(0,)), "options.distribution_positions"),
    ]:
        with pytest.raises(InvalidInput) as error:
            engine.plan(items, options)
        assert error.value.field == field
        assert "export it again" in error.value.description
    [result] = engine.score_sync(engine.plan(items, ScoreOptions(token_details=True)))
    assert result.tokens[1].entropy is None


# A real server on the tiny model, against PyTorch float64.


def torch_logprobs(model, ids: list[int]) -> np.ndarray:
    """float64 log-softmax of every position's logits, from one PyTorch pass."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, dim=-1).numpy()


@pytest.fixture(scope="module")
def client(tiny_server):
    with ScoringClient(tiny_server.address, timeout=60) as client:
        yield client


PAIRS = [
    ("The licensee may", " copy the Program"),
    ("Copyright (C) 2007 Free Software Foundation,", " Inc.\n\n  Everyone is"),
    ("", "Everyone is permitted to copy"),
]


def test_tiny_model_research_outputs_equal_pytorch(client: ScoringClient, tiny_torch) -> None:
    model, hf_tokenizer = tiny_torch
    labels = (" the", " a", ".", "\n")
    options = ScoreOptions(
        token_details=True,
        entropy=True,
        words=True,
        label_tokens=labels,
        distribution_positions=(-1, 1),
    )
    results = client.score([Item(p, [c]) for p, c in PAIRS], options)
    label_ids = [hf_tokenizer(text, add_special_tokens=False)["input_ids"] for text in labels]
    assert all(len(ids) == 1 for ids in label_ids)
    for (prompt, completion), result in zip(PAIRS, results, strict=True):
        prompt_ids, completion_ids = split_pair(hf_tokenizer, prompt, completion)
        ids = [BOS_ID, *prompt_ids, *completion_ids]
        assert [t.id for t in result.tokens] == ids
        logprobs = torch_logprobs(model, ids)
        entropy = -(np.exp(logprobs) * logprobs).sum(-1)
        got = np.array([t.entropy for t in result.tokens[1:]])
        assert np.abs(got - entropy[:-1]).max() < TOLERANCE
        for word in result.words:
            assert abs(word.entropy - entropy[word.token_start - 1]) < TOLERANCE
        expected_labels = logprobs[-1][[i[0] for i in label_ids]]
        assert np.abs(np.array(result.label_logprobs) - expected_labels).max() < TOLERANCE
        assert [d.position for d in result.distributions] == [len(ids) - 1, 1]
        for d in result.distributions:
            values = np.frombuffer(d.logprobs, "<f4")
            assert np.abs(values - logprobs[d.position]).max() < TOLERANCE


def test_server_refuses_a_label_that_is_not_one_token(client: ScoringClient) -> None:
    with pytest.raises(InvalidArgumentError) as error:
        client.score([Item("The", [""])], ScoreOptions(label_tokens=(" the", " licensee")))
    assert "options.label_tokens[1]" in str(error.value)
    assert "' licensee'" in str(error.value)


def test_cli_writes_the_research_fields(tiny_server, tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"prompt": "The licensee", "completion": " may"}) + "\n")
    output = tmp_path / "out.jsonl"
    subprocess.run(
        [
            LMSCORE,
            "score",
            "--server",
            tiny_server.address,
            "--input",
            str(source),
            "--output",
            str(output),
            "--token-details",
            "--entropy",
            "--label-token",
            " the",
            "--label-token",
            " a",
            "--distribution-position",
            "-1",
            "--unit",
            "bits",
        ],
        check=True,
        timeout=60,
    )
    [line] = [json.loads(x) for x in output.read_text().splitlines()]
    # Bits beside nats: the entropy of each token, each label's log-prob.
    assert all(
        abs(t["entropy_bits"] * np.log(2) - t["entropy"]) < 1e-12 for t in line["tokens"][1:]
    )
    assert np.allclose(np.array(line["label_logprobs_bits"]) * np.log(2), line["label_logprobs"])
    assert line["tokens"][0]["entropy"] is None
    assert all(t["entropy"] > 0 for t in line["tokens"][1:])
    assert len(line["label_logprobs"]) == 2
    [distribution] = line["distributions"]
    values = np.frombuffer(base64.b64decode(distribution["logprobs"]), "<f4")
    assert abs(np.exp(values.astype(np.float64)).sum() - 1) < 1e-4
    with ScoringClient(tiny_server.address, timeout=60) as client:
        [result] = client.score(
            [Item("The licensee", [" may"])],
            ScoreOptions(label_tokens=(" the", " a"), token_details=True, entropy=True),
        )
    assert np.allclose(line["label_logprobs"], result.label_logprobs)


# An export made before the research outputs (manifest format 6).


@pytest.fixture(scope="module")
def format6_export(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny export with the head's research inputs, outputs and nodes cut off (what the
    benchmark compares entropy against), as manifest format 6."""
    from lmscore.bench.research_costs import without_research_outputs
    from lmscore.export.manifest import MANIFEST_NAME

    # A copy to cut from: the weights are hard-linked, and the session's tiny export must keep
    # one link (the ONNX checker of other tests refuses a weights file with several).
    source = tmp_path_factory.mktemp("format7") / "tiny"
    shutil.copytree(tiny_export, source)
    output = without_research_outputs(source, tmp_path_factory.mktemp("format6") / "tiny")
    manifest = json.loads((output / MANIFEST_NAME).read_text())
    manifest["format_version"] = 6
    (output / MANIFEST_NAME).write_text(json.dumps(manifest))
    return output


def test_an_older_export_serves_all_but_the_research_options(
    format6_export: Path, tiny_export: Path, client: ScoringClient
) -> None:
    items = [Item(p, [c]) for p, c in PAIRS]
    from lmscore.export.head import RESEARCH_OUTPUTS

    graph = ort.InferenceSession(str(format6_export / "model.onnx"))
    assert not {o.name for o in graph.get_outputs()} & set(RESEARCH_OUTPUTS)
    current = ort.InferenceSession(str(tiny_export / "model.onnx"))
    assert len(graph.get_inputs()) == len(current.get_inputs()) - 2  # gather_positions, _ids
    with (
        running_server(format6_export) as server,
        ScoringClient(server.address, timeout=60) as old,
    ):
        for options, field in [
            (ScoreOptions(token_details=True, entropy=True), "options.entropy"),
            (ScoreOptions(label_token_ids=(5,)), "options.label_token_ids"),
            (ScoreOptions(distribution_positions=(0,)), "options.distribution_positions"),
        ]:
            with pytest.raises(InvalidArgumentError) as error:
                old.score(items, options)
            assert field in str(error.value)
        served = old.score(items, ScoreOptions(token_details=True, top_k=3, words=True))
    current = client.score(items, ScoreOptions(token_details=True, top_k=3, words=True))
    for a, b in zip(served, current, strict=True):
        assert abs(a.joint_logprob - b.joint_logprob) < TOLERANCE
        assert [w.logprob for w in a.words] == pytest.approx([w.logprob for w in b.words])


def test_node_client_carries_the_research_fields(tiny_server, client: ScoringClient) -> None:
    from test_node_client import score_with_node

    document = score_with_node(
        tiny_server,
        "--prompt",
        "The licensee",
        "--completion",
        " may",
        "--token-details",
        "--entropy",
        "--words",
        "--label-token-id",
        "7",
        "--label-token-id",
        "300",
        "--distribution-position",
        "-1",
    )
    [node] = document["results"]
    [python] = client.score(
        [Item("The licensee", [" may"])],
        ScoreOptions(
            token_details=True,
            entropy=True,
            words=True,
            label_token_ids=(7, 300),
            distribution_positions=(-1,),
        ),
    )
    assert node["label_logprobs"] == pytest.approx(list(python.label_logprobs))
    assert [t["entropy"] for t in node["tokens"]] == pytest.approx(
        [t.entropy for t in python.tokens]
    )
    assert [w["entropy"] for w in node["words"]] == pytest.approx([w.entropy for w in python.words])
    [distribution] = node["distributions"]
    assert distribution["position"] == python.distributions[0].position
    assert distribution["logprobs"] == pytest.approx(list(python.distributions[0].values()))


def test_http_json_route_carries_the_research_fields(tiny_export: Path) -> None:
    """The JSON route is the proto's JSON mapping: entropy fields, label log-probs, and the
    distribution's bytes in base64; a refused label names its field."""
    http_port = free_port()
    path = "/lmscore.v1.Scorer/Score"
    body = {
        "items": [{"prompt": "The licensee", "completions": [{"text": " may"}]}],
        "options": {
            "token_details": True,
            "entropy": True,
            "label_tokens": [" the", " a"],
            "distribution_positions": [-1],
        },
    }
    with (
        running_server(tiny_export, "--http-port", str(http_port)) as server,
        ScoringClient(server.address, timeout=60) as grpc_client,
    ):
        status, answer = post(http_port, path, body)
        [expected] = grpc_client.score(
            [Item("The licensee", [" may"])],
            ScoreOptions(
                token_details=True,
                entropy=True,
                label_tokens=(" the", " a"),
                distribution_positions=(-1,),
            ),
        )
        body["options"]["label_tokens"] = [" the", " licensee"]
        refused_status, refused = post(http_port, path, body)
    assert status == 200, answer
    [result] = answer if isinstance(answer, list) else [answer]
    result = result.get("result", result)
    assert [t.get("entropy") for t in result["tokens"]] == [t.entropy for t in expected.tokens]
    assert result["label_logprobs"] == list(expected.label_logprobs)
    [distribution] = result["distributions"]
    assert base64.b64decode(distribution["logprobs"]) == expected.distributions[0].logprobs
    assert refused_status == 400
    assert "options.label_tokens[1]" in json.dumps(refused)


def test_older_exports_are_found_for_export_again(
    format6_export: Path, tiny_export: Path, tmp_path: Path
) -> None:
    """What scripts/setup.sh asks before it exports a shipped model again."""
    from lmscore.export.manifest import MANIFEST_NAME, older_export

    assert older_export(format6_export)
    assert not older_export(tiny_export)
    assert not older_export(tmp_path)  # nothing exported there
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    assert older_export(tmp_path)


def test_cli_table_prints_labels_and_word_entropy(tiny_server, client: ScoringClient) -> None:
    flags = ["--prompt", "The licensee", "--completion", " may copy", "--words", "--entropy"]
    flags += ["--label-token", " the", "--label-token", " a"]
    printed = subprocess.run(
        [LMSCORE, "score", "--server", tiny_server.address, *flags],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    [result] = client.score(
        [Item("The licensee", [" may copy"])],
        ScoreOptions(words=True, entropy=True, label_tokens=(" the", " a")),
    )
    assert "entropy (nats)" in printed
    assert all(f"{w.entropy:.4f}" in printed for w in result.words)
    labels = printed.split("candidate labels after")[1].splitlines()[2:]
    shares = np.exp(result.label_logprobs) / np.exp(result.label_logprobs).sum()
    for line, value, share in zip(labels, result.label_logprobs, shares, strict=True):
        assert line.split()[-2:] == [f"{value:.4f}", f"{share:.4f}"]


def test_score_labels_sync_and_async(tiny_server, client: ScoringClient, tiny_torch) -> None:
    from lmscore.client import AsyncScoringClient

    _, hf_tokenizer = tiny_torch
    prompt, strings = "The licensee may copy", (" the", " a", ".")
    by_text = client.score_labels(prompt, strings)
    [full] = client.score([Item(prompt, [""])], ScoreOptions(label_tokens=strings))
    assert by_text == full.label_logprobs and len(by_text) == 3
    ids = [hf_tokenizer(s, add_special_tokens=False)["input_ids"][0] for s in strings]
    assert client.score_labels(prompt, ids) == by_text

    async def labels_async() -> tuple[float, ...]:
        async with AsyncScoringClient(tiny_server.address, timeout=60) as async_client:
            return await async_client.score_labels(prompt, strings)

    assert asyncio.run(labels_async()) == by_text
