"""The `int8` recipe on the tiny model: what its manifest records, against an independent
recomputation on held-out text, and that the sensitivity search sees a sensitive MatMul."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from lmscore.export.manifest import ONNX_DATA_NAME, ONNX_NAME, TOKENIZER_NAME, Manifest

LICENSES = Path("/usr/share/common-licenses")
INT8_OPS = {"DynamicQuantizeMatMul", "MatMulIntegerToFloat"}


@pytest.fixture(scope="module")
def int8_variant(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lmscore.export.quantize import quantize_export

    target = tmp_path_factory.mktemp("int8") / "tiny-int8"
    quantize_export(tiny_export, target, "int8")
    return target


def _graph_ops(model_dir: Path) -> list[tuple[str, str]]:
    import onnx

    model = onnx.load(str(model_dir / ONNX_NAME), load_external_data=False)
    return [(n.op_type, n.name) for n in model.graph.node]


def _held_out_batches(model_dir: Path) -> list[np.ndarray]:
    """The windows the export measures on, built here from the texts: 8 x 95 tokens of
    Apache-2.0 and of MPL-2.0 after BOS (the tiny model's context is 96)."""
    from tokenizers import Tokenizer

    manifest = Manifest.read(model_dir)
    tokenizer = Tokenizer.from_file(str(model_dir / TOKENIZER_NAME))
    length = min(128, manifest.max_context - 1)
    batches = []
    for name in ("Apache-2.0", "MPL-2.0"):
        ids = tokenizer.encode((LICENSES / name).read_text(), add_special_tokens=False).ids
        rows = [[manifest.bos_token_id, *ids[i * length : (i + 1) * length]] for i in range(8)]
        batches.append(np.asarray(rows, dtype=np.int64))
    return batches


def _full_distribution(model_dir: Path, batch: np.ndarray, vocab: int):
    """(target log-probs, log-probs of the whole vocabulary by token id), from the scoring
    head with top_k = the vocabulary, over the scored positions."""
    from lmscore.export.graph_io import model_feeds

    session = ort.InferenceSession(str(model_dir / ONNX_NAME), providers=["CPUExecutionProvider"])
    targets = np.zeros_like(batch)
    targets[:, :-1] = batch[:, 1:]
    feeds = model_feeds(session.get_inputs(), batch, np.ones_like(batch), target_ids=targets)
    feeds["top_k"] = np.array([vocab], np.int64)
    target_lp, top_lp, top_ids = session.run(["target_logprobs", "top_logprobs", "top_ids"], feeds)
    full = np.empty(top_lp.shape, np.float64)
    np.put_along_axis(full, top_ids, top_lp, axis=-1)
    return target_lp[:, :-1].astype(np.float64), full[:, :-1]


def test_int8_manifest_records_the_chosen_matmuls_and_figures(
    tiny_export: Path, int8_variant: Path
) -> None:
    from lmscore.export.int8 import BUDGET
    from lmscore.server.app import load_model
    from lmscore.server.config import ServerConfig

    q = Manifest.read(int8_variant).quantization
    assert q is not None and q["recipe"] == "int8"
    ops = _graph_ops(int8_variant)
    assert q["weight_matmuls"] == 15  # 2 layers x 7 linear layers + the untied lm_head
    assert 0 < q["quantized_matmuls"] < q["weight_matmuls"]
    assert sum(op in INT8_OPS for op, _ in ops) == q["quantized_matmuls"]
    assert sum(op == "MatMul" for op, _ in ops) >= q["weight_matmuls"] - q["quantized_matmuls"]
    assert 0 <= q["calibration_mean_abs_deviation"] <= q["calibration_budget"] == BUDGET
    assert len(q["sensitivity"]) == 15  # the tiny model's groups are single MatMuls
    assert all(label in q["sensitivity"] for label in q["float32_groups"])
    assert q["kl_divergence"] >= 0
    assert 0 <= q["top1_agreement"] <= 1
    assert q["speedup"] > 0 and q["held_out_tokens"] == 2 * 8 * 95

    info = load_model(ServerConfig(model_dir=int8_variant)).info
    assert info.quantization.recipe == "int8"
    assert info.quantization.kl_divergence == pytest.approx(q["kl_divergence"])
    assert info.quantization.top1_agreement == pytest.approx(q["top1_agreement"])


def test_int8_figures_equal_an_independent_recomputation(
    tiny_export: Path, int8_variant: Path
) -> None:
    q = Manifest.read(int8_variant).quantization
    assert q is not None
    vocab = Manifest.read(tiny_export).vocab_size
    deviations, kls, agreements = [], [], []
    for batch in _held_out_batches(tiny_export):
        fp32_lp, p = _full_distribution(tiny_export, batch, vocab)
        int8_lp, r = _full_distribution(int8_variant, batch, vocab)
        deviations.append(np.abs(int8_lp - fp32_lp).ravel())
        kls.append((np.exp(p) * (p - r)).sum(-1).ravel())
        agreements.append((p.argmax(-1) == r.argmax(-1)).ravel())
    deviation = np.concatenate(deviations)
    assert deviation.size == q["held_out_tokens"]
    assert deviation.mean() == pytest.approx(q["mean_abs_deviation"], rel=1e-4)
    assert deviation.max() == pytest.approx(q["max_abs_deviation"], rel=1e-4)
    # The export takes log-softmax of the logits in float64; the head here gives float32.
    assert np.concatenate(kls).mean() == pytest.approx(q["kl_divergence"], rel=1e-2, abs=1e-5)
    assert np.concatenate(agreements).mean() == pytest.approx(q["top1_agreement"], abs=2e-3)


def test_int8_search_measures_what_ships(tiny_export: Path, int8_variant: Path) -> None:
    """The deviation the search recorded on calibration text is that of the written graph."""
    from lmscore.export.int8 import calibration_batch

    q = Manifest.read(int8_variant).quantization
    manifest = Manifest.read(tiny_export)
    batch = calibration_batch(tiny_export, manifest.bos_token_id, manifest.max_context)
    assert batch.size - batch.shape[0] == q["calibration_tokens"]
    fp32_lp, _ = _full_distribution(tiny_export, batch, manifest.vocab_size)
    int8_lp, _ = _full_distribution(int8_variant, batch, manifest.vocab_size)
    assert np.abs(int8_lp - fp32_lp).mean() == pytest.approx(
        q["calibration_mean_abs_deviation"], rel=1e-3, abs=1e-5
    )


def test_int8_leaves_a_sensitive_matmul_float32(
    tiny_export: Path, int8_variant: Path, tmp_path: Path
) -> None:
    """A down_proj the search quantized, made sensitive without changing what the model
    computes much: one intermediate channel silenced (its up_proj column zeroed) and that
    channel's row of down_proj made 1000 times the largest weight. The product is still 0,
    but each output channel's int8 scale now spans the outlier, which leaves the other
    weights on one or two levels (and SmoothQuant cannot move an outlier whose input is 0).
    The search must rank it the most sensitive and keep it float32."""
    from onnx import numpy_helper

    from lmscore.export.external_data import load_graph, save_model, tensor_array
    from lmscore.export.int8 import candidates
    from lmscore.export.quantize import quantize_export

    q = Manifest.read(int8_variant).quantization
    assert q is not None
    layer = 1
    label = f"mlp/down_proj layer {layer}"
    assert label not in q["float32_groups"]  # quantized as the model stands

    model = load_graph(tiny_export / ONNX_NAME)
    found = {(c.kind, c.layer): c for c in candidates(model)}
    tensors = {t.name: t for t in model.graph.initializer}

    def edit(kind: str, change) -> None:
        name = found[(kind, layer)].weight
        weight = np.array(tensor_array(tensors[name], tiny_export), dtype=np.float32)
        change(weight)
        tensors[name].CopyFrom(numpy_helper.from_array(weight, name))

    edit("mlp/up_proj", lambda w: w.__setitem__((slice(None), 0), 0.0))
    edit("mlp/down_proj", lambda w: w.__setitem__(0, 1000 * np.abs(w).max()))
    poisoned = tmp_path / "poisoned"
    shutil.copytree(tiny_export, poisoned, ignore=shutil.ignore_patterns(ONNX_NAME, ONNX_DATA_NAME))
    save_model(model, poisoned / ONNX_NAME, weights_dir=tiny_export)

    figures = quantize_export(poisoned, tmp_path / "poisoned-int8", "int8").quantization
    assert figures is not None
    sensitivity = figures["sensitivity"]
    assert max(sensitivity, key=sensitivity.get) == label
    assert sensitivity[label] > 10 * q["sensitivity"][label]
    assert label in figures["float32_groups"]
    ops = {name: op for op, name in _graph_ops(tmp_path / "poisoned-int8")}
    assert ops[found[("mlp/down_proj", layer)].node] == "MatMul"
