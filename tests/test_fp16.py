"""The float16 export (`lmscore export --dtype fp16`, made for --device cuda): its graph,
its distance to PyTorch float32 on the same weights, and serving it.

ONNX Runtime's CPU provider runs the float16 graph (it casts around the few ops it has
no float16 kernel for), so everything here runs on CPU; what CUDA adds is checked by
scripts/gpu_check.sh.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto
from test_io_binding import scores_with_io_binding_equal_plain

from conftest import LMSCORE, running_server
from lmscore.export.graph_io import model_feeds
from lmscore.export.half import MAX_VALIDATION_DIFF, convert_to_float16, float32_nodes
from lmscore.export.head import HEAD_INPUTS, HEAD_OUTPUTS, add_scoring_head, is_head_node
from lmscore.export.manifest import FORMAT_VERSION, Manifest
from lmscore.export.validate import VALIDATION_TEXT
from reference import reference_score
from tiny_model import MAX_CONTEXT, VOCAB_SIZE

BOS = 1
# float16 against PyTorch float32, per token (nats). Measured on the tiny model over
# 4 x 90 random tokens: max 0.045, mean 0.0053 (0.16 / 0.012 with nothing kept in
# float32); PyTorch running the same weights in float16 is itself 0.041 / 0.0069 away.
# The tiny model is harsher on float16 than a trained one (weights drawn with std 0.3:
# activations up to 72, logits spread over +-12); SmolLM2-135M's float16 export is
# 0.071 / 0.0024 away over 4096 held-out tokens. The bounds leave about 2x of margin.
MAX_TOKEN_DIFF = 0.1
MEAN_TOKEN_DIFF = 0.01
# Per item (the sum over its 3 to 67 tokens): measured max 0.13, on a 39-token item.
MAX_ITEM_DIFF = 0.3

PAIRS = [
    ("This License applies to any program ", "or other work"),
    ("You may convey verbatim copies of the Program's source code", " as you receive it"),
    ("THERE IS NO WARRANTY FOR THE PROGRAM", ", TO THE EXTENT PERMITTED BY APPLICABLE LAW."),
    ("Each contributor grants you", " a non-exclusive, worldwide, royalty-free patent license"),
    ("the", "re"),
    ("", "Everyone is permitted to copy and distribute verbatim copies"),
]


@pytest.fixture(scope="module")
def fp16_export(tiny_hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`lmscore export --dtype fp16` of the tiny model, into its default directory."""
    home = tmp_path_factory.mktemp("lmscore-home")
    result = subprocess.run(
        [LMSCORE, "export", "--source", str(tiny_hf_dir), "--dtype", "fp16"],
        env={**os.environ, "LMSCORE_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "(float16)" in result.stdout
    return home / "models" / f"{tiny_hf_dir.name}-fp16"


def session_logprobs(onnx_path: Path, ids: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    targets = np.zeros_like(ids)
    targets[:, :-1] = ids[:, 1:]
    feeds = model_feeds(session.get_inputs(), ids, np.ones_like(ids), target_ids=targets)
    return session.run(["target_logprobs"], feeds)[0][:, :-1]


def torch_logprobs(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        logits = model(torch.from_numpy(ids)).logits[:, :-1].double()
    chosen = torch.log_softmax(logits, -1).gather(-1, torch.from_numpy(ids[:, 1:, None]))
    return chosen[..., 0].numpy()


def random_ids(rows: int = 4, length: int = 90) -> np.ndarray:
    ids = np.random.default_rng(0).integers(3, VOCAB_SIZE, size=(rows, length))
    ids[:, 0] = BOS
    return ids


def test_fp16_export_has_its_own_directory_and_says_float16(
    fp16_export: Path, tiny_hf_dir: Path
) -> None:
    manifest = Manifest.read(fp16_export)
    assert manifest.format_version == FORMAT_VERSION
    assert manifest.dtype == "float16"
    assert manifest.name == f"{tiny_hf_dir.name}-fp16"
    # Validated on CPU against PyTorch float32, under the float16 tolerance; and really float16.
    assert 1e-4 < manifest.validation_max_abs_diff <= MAX_VALIDATION_DIFF["float16"]


def test_graph_is_float16_around_a_float32_head(fp16_export: Path) -> None:
    model = onnx.shape_inference.infer_shapes(onnx.load(str(fp16_export / "model.onnx")))
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in graph.value_info}
    types.update({v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output]})
    types.update({t.name: t.data_type for t in graph.initializer})
    initializers = {t.name: t for t in graph.initializer}

    weights = [
        i
        for n in graph.node
        if n.op_type == "MatMul" and not is_head_node(n)
        for i in n.input
        if i in initializers
    ]
    assert weights and all(initializers[w].data_type == TensorProto.FLOAT16 for w in weights)
    embeddings = [n.input[0] for n in graph.node if n.op_type == "Gather"]
    assert any(types.get(e) == TensorProto.FLOAT16 for e in embeddings if e in initializers)

    inputs = {i.name: i.type.tensor_type.elem_type for i in graph.input}
    outputs = {o.name: o.type.tensor_type.elem_type for o in graph.output}
    assert all(t == TensorProto.INT64 for n, t in inputs.items() if not n.startswith("past_"))
    assert {t for n, t in inputs.items() if n.startswith("past_")} == {TensorProto.FLOAT16}
    assert {t for n, t in outputs.items() if n.startswith("present.")} == {TensorProto.FLOAT16}
    assert outputs["target_logprobs"] == outputs["top_logprobs"] == TensorProto.FLOAT
    assert outputs["target_ranks"] == outputs["top_ids"] == TensorProto.INT64
    assert "logits" not in outputs and set(HEAD_INPUTS) <= set(inputs)

    # The head reads the logits through one Cast to float32; all its float math is float32.
    readers = [n for n in graph.node if "logits" in n.input]
    assert [(n.op_type, n.attribute[0].i) for n in readers] == [("Cast", TensorProto.FLOAT)]
    head = [
        n
        for n in graph.node
        if any(o.startswith("lmscore_") or o in HEAD_OUTPUTS for o in n.output) and n not in readers
    ]
    float_inputs = [
        types[i]
        for n in head
        for i in n.input
        if types.get(i) in (TensorProto.FLOAT, TensorProto.FLOAT16)
    ]
    assert float_inputs and set(float_inputs) == {TensorProto.FLOAT}
    for node in graph.node:
        if node.op_type in ("LogSoftmax", "TopK", "GatherElements", "ReduceMax"):
            assert types[node.input[0]] == TensorProto.FLOAT, node.name

    # Kept in float32: the rotary angles (Cos, Sin) and the RMS-norm statistics.
    for node in graph.node:
        if node.op_type in ("Cos", "Sin", "ReduceMean", "Sqrt", "Pow"):
            assert types[node.input[0]] == TensorProto.FLOAT, node.name
    # ... entered and left by one Cast each: no Cast merely rounds float32 through float16
    # and back, none casts to the type it already has.
    producers = {o: n for n in graph.node for o in n.output}
    for cast in (n for n in graph.node if n.op_type == "Cast"):
        assert types[cast.input[0]] != cast.attribute[0].i, cast.name
        before = producers.get(cast.input[0])
        if cast.attribute[0].i == TensorProto.FLOAT and before and before.op_type == "Cast":
            assert types[before.input[0]] != TensorProto.FLOAT, cast.name


def test_fp16_log_probs_are_within_the_fp16_bound_of_pytorch_float32(
    fp16_export: Path, tiny_torch
) -> None:
    model, _ = tiny_torch
    ids = random_ids()
    diff = np.abs(session_logprobs(fp16_export / "model.onnx", ids) - torch_logprobs(model, ids))
    assert diff.max() <= MAX_TOKEN_DIFF
    assert diff.mean() <= MEAN_TOKEN_DIFF


def test_validation_figure_is_the_fp16_distance_on_the_validation_text(
    fp16_export: Path, tiny_torch
) -> None:
    model, tokenizer = tiny_torch
    text = VALIDATION_TEXT.read_text().strip()
    ids = np.array([[BOS, *tokenizer(text, add_special_tokens=False)["input_ids"]][:MAX_CONTEXT]])
    diff = np.abs(session_logprobs(fp16_export / "model.onnx", ids) - torch_logprobs(model, ids))
    manifest = Manifest.read(fp16_export)
    assert manifest.validation_tokens == ids.shape[1]
    assert manifest.validation_max_abs_diff == pytest.approx(float(diff.max()), abs=1e-5)


def test_float32_regions_are_what_keeps_float16_close(tiny_torch, tmp_path: Path) -> None:
    """The same conversion with nothing kept in float32 is several times further off."""
    from optimum.exporters.onnx import onnx_export_from_model

    model, _ = tiny_torch
    onnx_export_from_model(model, str(tmp_path / "fp32"), task="text-generation-with-past")
    kept = float32_nodes(onnx.load(str(tmp_path / "fp32" / "model.onnx")).graph)
    assert any("rotary" in n for n in kept) and any("norm" in n for n in kept)
    ids = random_ids()
    reference = torch_logprobs(model, ids)
    worst = {}
    for name, keep in (("kept", None), ("none kept", ())):
        path = tmp_path / f"{name}.onnx"
        shutil.copy(tmp_path / "fp32" / "model.onnx", path)
        convert_to_float16(path, keep)
        add_scoring_head(path)
        worst[name] = float(np.abs(session_logprobs(path, ids) - reference).max())
    assert worst["kept"] <= MAX_TOKEN_DIFF < worst["none kept"]
    assert worst["none kept"] > 2 * worst["kept"]


def test_io_binding_equals_the_plain_path_on_fp16(fp16_export: Path) -> None:
    bound_model = scores_with_io_binding_equal_plain(fp16_export)
    assert bound_model.float16 and bound_model.device_past_tiles > 0
    assert bound_model.host_past_tensors == 0


def test_serve_runs_fp16_on_cpu_and_points_to_cuda(fp16_export: Path, tiny_torch) -> None:
    from lmscore.client import Item, ScoringClient

    model, tokenizer = tiny_torch
    with running_server(fp16_export) as server, ScoringClient(server.address) as client:
        info = client.model_info()
        assert info.dtype == "float16" and info.name.endswith("-fp16")
        results = client.score([Item(p, [c]) for p, c in PAIRS])
        log = server.log()
    assert "float16" in log and "--device cuda" in log
    for (prompt, completion), result in zip(PAIRS, results, strict=True):
        expected = reference_score(model, tokenizer, prompt, completion, BOS)
        assert result.joint_logprob == pytest.approx(expected.joint, abs=MAX_ITEM_DIFF)
        assert result.conditional_logprob == pytest.approx(expected.conditional, abs=MAX_ITEM_DIFF)


def test_quantize_needs_the_fp32_export(tiny_hf_dir: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [
            *(LMSCORE, "export", "--source", str(tiny_hf_dir), "--dtype", "fp16"),
            *("--quantize", "int8-dynamic", "--output", str(tmp_path / "out")),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "--quantize" in result.stderr
    assert not (tmp_path / "out").exists()
