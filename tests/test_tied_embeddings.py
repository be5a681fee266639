"""Tied input and output embeddings (lmscore.export.tied): the exported file holds the matrix
once, ONNX Runtime makes no transposed copy of it, the scores equal PyTorch, and float16 and
the quantization recipes keep the one matrix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_external_data import assert_scores_equal_pytorch

from lmscore.export.external_data import ALIGNMENT, load_graph, save_model
from lmscore.export.head import is_head_node
from lmscore.export.manifest import ONNX_NAME
from lmscore.export.quant_recipes import apply_recipe
from lmscore.export.tied import FUSED_MATMUL, share_tied_embeddings
from tiny_model import MAX_CONTEXT, VOCAB_SIZE, save_tiny_model

HIDDEN = 64
GEMMA3 = {
    "max_position_embeddings": MAX_CONTEXT,
    "head_dim": 16,
    "query_pre_attn_scalar": 16,
    "sliding_window": 16,
    "layer_types": ["sliding_attention", "full_attention"],
}


def embedding_sized(graph) -> list:  # -> list[onnx.TensorProto]
    """The initializers as large as the [vocab, hidden] matrix, either way round."""
    return [t for t in graph.initializer if sorted(t.dims) == sorted([VOCAB_SIZE, HIDDEN])]


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(source, export) of a tiny Llama with tied embeddings: Optimum shares the matrix
    itself, through a Transpose, which ONNX Runtime would fold into a copy."""
    from lmscore.export.convert import export_model

    root = tmp_path_factory.mktemp("tied-llama")
    source = save_tiny_model(
        root / "hf", "LlamaConfig", 0, max_position_embeddings=MAX_CONTEXT, tie_word_embeddings=True
    )
    export_model(str(source), root / "onnx", progress=False)
    return source, root / "onnx"


@pytest.fixture(scope="module")
def tied_gemma3(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(source, export) of a tiny Gemma-3, tied: Optimum does not know its embedding class and
    stores the matrix twice."""
    from lmscore.export.convert import export_model

    root = tmp_path_factory.mktemp("tied-gemma3")
    source = save_tiny_model(root / "hf", "Gemma3TextConfig", 0, **GEMMA3)
    export_model(str(source), root / "onnx", progress=False)
    return source, root / "onnx"


@pytest.mark.parametrize("model", ["tied_llama", "tied_gemma3"])
def test_the_embedding_is_stored_once_and_read_by_the_output_layer(
    model: str, request: pytest.FixtureRequest
) -> None:
    source, export = request.getfixturevalue(model)
    graph = load_graph(export / ONNX_NAME).graph
    [embedding] = embedding_sized(graph)
    assert list(embedding.dims) == [VOCAB_SIZE, HIDDEN]
    readers = [n for n in graph.node if embedding.name in n.input]
    assert sorted(n.op_type for n in readers) == [FUSED_MATMUL, "Gather"]
    # And once in the data file, which holds the graph's external tensors and alignment only.
    external = [t for t in graph.initializer if t.data_location == TensorProto.EXTERNAL]
    lengths = sum(int(e.value) for t in external for e in t.external_data if e.key == "length")
    data_bytes = (export / "model.onnx_data").stat().st_size
    assert lengths <= data_bytes < lengths + ALIGNMENT * len(external)
    assert_scores_equal_pytorch(export, source)


def test_onnx_runtime_makes_no_transposed_copy(tied_llama: tuple[Path, Path], tmp_path: Path):
    """ORT's optimized graph (what the session holds) has the one matrix; a MatMul reading a
    Transpose of it, as Optimum writes it, gets folded into a second, transposed one."""
    _, export = tied_llama

    def optimized_initializers(model_path: Path) -> list:
        options = ort.SessionOptions()
        options.add_session_config_entry("session.disable_prepacking", "1")
        options.optimized_model_filepath = str(tmp_path / f"{model_path.stem}-optimized.onnx")
        ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        return embedding_sized(load_graph(Path(options.optimized_model_filepath)).graph)

    assert len(optimized_initializers(export / ONNX_NAME)) == 1
    # The same graph with the output layer as Optimum left it: MatMul(h, Transpose(E)).
    model = load_graph(export / ONNX_NAME)
    fused = next(n for n in model.graph.node if n.op_type == FUSED_MATMUL)
    transposed = f"{fused.input[1]}_transposed"
    index = list(model.graph.node).index(fused)
    model.graph.node.remove(fused)
    matmul = helper.make_node("MatMul", [fused.input[0], transposed], list(fused.output))
    model.graph.node.insert(index, matmul)
    model.graph.node.insert(index, helper.make_node("Transpose", [fused.input[1]], [transposed]))
    save_model(model, tmp_path / "unshared.onnx", weights_dir=export)
    assert len(optimized_initializers(tmp_path / "unshared.onnx")) == 2


def tied_graph(output_weight: np.ndarray, embedding: np.ndarray):  # -> onnx.ModelProto
    """input_ids -> Gather(embedding) -> MatMul(output_weight) -> logits."""
    vocab = embedding.shape[0]
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["embedding", "input_ids"], ["hidden"]),
            helper.make_node("MatMul", ["hidden", "output_weight"], ["logits"], name="lm_head"),
        ],
        "tied",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", vocab])],
        [
            numpy_helper.from_array(embedding, "embedding"),
            numpy_helper.from_array(output_weight, "output_weight"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_only_a_bitwise_transposed_copy_is_shared(tmp_path: Path) -> None:
    embedding = np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32)
    one_bit_off = embedding.T.copy()
    one_bit_off.view(np.uint32)[5, 200] ^= 1
    signed_zero = embedding.copy()  # -0.0 == 0.0 as numbers, not as bits
    embedding[0, 0], signed_zero[0, 0] = 0.0, -0.0
    cases = [
        ("transposed", embedding.T.copy(), embedding, True),
        ("one bit off", one_bit_off, embedding, False),
        ("-0.0 for 0.0", embedding.T.copy(), signed_zero, False),
        ("same shape, other order", embedding.reshape(16, 300), embedding, False),
    ]
    ids = np.array([[3, 1, 299, 7]])
    for name, weight, table, shared in cases:
        path = tmp_path / name / "model.onnx"
        path.parent.mkdir()
        save_model(tied_graph(weight, table), path)
        expected = ort.InferenceSession(str(path)).run(None, {"input_ids": ids})[0]
        model = load_graph(path)
        found = share_tied_embeddings(model, path.parent)
        save_model(model, path)
        dropped = [("embedding", weight.nbytes)] if shared else []
        assert [(s.embedding, s.dropped_bytes) for s in found] == dropped, name
        assert len(load_graph(path).graph.initializer) == (1 if shared else 2), name
        got = ort.InferenceSession(str(path)).run(None, {"input_ids": ids})[0]
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6, err_msg=name)


def test_float16_keeps_one_float16_matrix(tied_gemma3: tuple[Path, Path], tmp_path: Path) -> None:
    from lmscore.export.convert import export_model

    source, _ = tied_gemma3
    export_model(str(source), tmp_path / "fp16", dtype="float16", progress=False)
    graph = load_graph(tmp_path / "fp16" / ONNX_NAME).graph
    [embedding] = embedding_sized(graph)
    assert embedding.data_type == TensorProto.FLOAT16
    # Read as float16 by both, with no Cast (ORT would fold a Cast into a float32 copy).
    readers = sorted(n.op_type for n in graph.node if embedding.name in n.input)
    assert readers == [FUSED_MATMUL, "Gather"]


@pytest.mark.parametrize("recipe", ["q4-exact", "int8-dynamic"])
def test_quantization_keeps_the_shared_output_layer_in_float32(
    tied_gemma3: tuple[Path, Path], tmp_path: Path, recipe: str
) -> None:
    """The recipes quantize MatMul nodes: the output layer, now a FusedMatMul on the float32
    embedding, stays as it is (as it did when Optimum's MatMul read a Transpose), and every
    other linear layer is still quantized."""
    _, export = tied_gemma3
    apply_recipe(export / ONNX_NAME, tmp_path / ONNX_NAME, recipe)
    graph = load_graph(tmp_path / ONNX_NAME).graph
    [embedding] = embedding_sized(graph)
    assert embedding.data_type == TensorProto.FLOAT
    assert sorted(n.op_type for n in graph.node if embedding.name in n.input) == [
        FUSED_MATMUL,
        "Gather",
    ]
    initializers = {t.name for t in graph.initializer}
    float_matmuls = [
        n.name
        for n in graph.node
        if n.op_type == "MatMul" and n.input[1] in initializers and not is_head_node(n)
    ]
    if recipe == "int8-dynamic":  # every linear layer but down_proj
        assert float_matmuls and all("down_proj" in name for name in float_matmuls)
    else:
        assert float_matmuls == []


def test_int8_quantizes_the_tied_output_layer_from_the_embedding(
    tied_gemma3: tuple[Path, Path], tmp_path: Path
) -> None:
    """The `int8` recipe's candidates include the output layer that reads the embedding
    transposed (FusedMatMul transB): its int8 form multiplies by the transposed matrix, the
    embedding lookup keeps the float32 matrix, and the scores stay near float32's."""
    from lmscore.export.cpu import has_int8_dot_product
    from lmscore.export.graph_io import model_feeds
    from lmscore.export.int8 import (
        VARIANTS,
        WEIGHT_LEVELS_AVX2,
        WEIGHT_LEVELS_VNNI,
        Roundings,
        candidates,
        channel_ranges,
        rewrite,
    )

    _, export = tied_gemma3
    model = load_graph(export / ONNX_NAME)
    found = candidates(model)
    [output_layer] = [c for c in found if c.transposed]
    [embedding] = embedding_sized(model.graph)
    assert output_layer.weight == embedding.name
    assert output_layer.elements == VOCAB_SIZE * HIDDEN

    rng = np.random.default_rng(0)
    ids = rng.integers(3, VOCAB_SIZE, size=(4, 24))
    ranges = channel_ranges(export / ONNX_NAME, found, ids)
    per_token = next(v for v in VARIANTS if v.name == "per-token")
    levels = WEIGHT_LEVELS_VNNI if has_int8_dot_product() else WEIGHT_LEVELS_AVX2
    roundings = Roundings(export / ONNX_NAME, ranges, levels)
    rewrite(model, found, {found.index(output_layer): per_token}, roundings)
    save_model(model, tmp_path / ONNX_NAME, weights_dir=export)
    graph = load_graph(tmp_path / ONNX_NAME).graph
    assert [n.op_type for n in graph.node if embedding.name in n.input] == ["Gather"]
    assert output_layer.node not in {n.name for n in graph.node}

    def target_logprobs(path: Path) -> np.ndarray:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        targets = np.roll(ids, -1, axis=1)
        feeds = model_feeds(session.get_inputs(), ids, np.ones_like(ids), target_ids=targets)
        return session.run(["target_logprobs"], feeds)[0][:, :-1]

    deviation = np.abs(target_logprobs(tmp_path / ONNX_NAME) - target_logprobs(export / ONNX_NAME))
    assert 0 < deviation.mean() < 0.05
