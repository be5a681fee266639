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


def test_int8_weights_fit_the_cpu_they_were_exported_on(int8_variant: Path) -> None:
    """8-bit weights only where the CPU has an int8 dot product (VNNI, AMX); 7 bits elsewhere,
    where ONNX Runtime's u8 x s8 kernel adds pairs of products in int16."""
    import onnx
    from onnx import numpy_helper

    from lmscore.export.cpu import INT8_DOT_PRODUCT_FLAGS, REQUIRES_KEY, has_int8_dot_product

    q = Manifest.read(int8_variant).quantization
    assert q is not None
    vnni = has_int8_dot_product()
    assert q["weight_levels"] == (127 if vnni else 63)
    assert q[REQUIRES_KEY] == (list(INT8_DOT_PRODUCT_FLAGS) if vnni else [])
    model = onnx.load(str(int8_variant / ONNX_NAME))
    weights = [
        numpy_helper.to_array(t)
        for t in model.graph.initializer
        if t.name.endswith("/int8/w") and t.data_type == onnx.TensorProto.INT8
    ]
    assert len(weights) == q["quantized_matmuls"]
    assert max(int(np.abs(w.astype(np.int32)).max()) for w in weights) <= q["weight_levels"]


def test_server_refuses_an_8bit_variant_on_a_cpu_without_int8_dot_product(
    int8_variant: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dataclasses

    from lmscore.export.cpu import REQUIRES_KEY
    from lmscore.export.manifest import ManifestError
    from lmscore.server import app
    from lmscore.server.config import ServerConfig

    manifest = Manifest.read(int8_variant)
    assert manifest.quantization is not None
    copy = tmp_path / "int8-vnni"
    shutil.copytree(int8_variant, copy)
    needs = ["avx512_vnni", "avx_vnni", "amx_int8"]
    dataclasses.replace(
        manifest, quantization={**manifest.quantization, REQUIRES_KEY: needs}
    ).write(copy)
    monkeypatch.setattr(app, "cpu_flags", lambda: frozenset({"avx2", "fma", "avx512f"}))
    with pytest.raises(ManifestError, match="avx512_vnni or avx_vnni or amx_int8") as error:
        app.load_model(ServerConfig(model_dir=copy))
    assert "lmscore export --quantize int8" in str(error.value)
    monkeypatch.setattr(app, "cpu_flags", lambda: frozenset({"avx2", "avx_vnni"}))
    assert app.load_model(ServerConfig(model_dir=copy)).info.quantization.recipe == "int8"


def test_gptq_rounding_lowers_the_output_error_on_its_inputs() -> None:
    """GPTQ against round-to-nearest on the same scale: the output error on correlated inputs
    (what the fitting text gives) is smaller, and every weight stays on the grid."""
    from lmscore.export.int8 import gptq

    rng = np.random.default_rng(0)
    k, n, tokens = 96, 40, 2000
    mixing = rng.normal(size=(k, k)) / np.sqrt(k) + np.eye(k)
    x = rng.normal(size=(tokens, k)) @ mixing
    w = rng.normal(size=(k, n))
    scale = np.abs(w).max(axis=0) / 63
    nearest = np.clip(np.rint(w / scale), -63, 63)
    rounded = gptq(w, scale, x.T @ x, 63)
    assert rounded.dtype == np.int8 and np.abs(rounded.astype(int)).max() <= 63
    # Output channels are independent: rounding them a few at a time changes nothing.
    assert np.array_equal(gptq(w, scale, x.T @ x, 63, columns=7), rounded)

    def output_error(q: np.ndarray) -> float:
        return float(np.linalg.norm(x @ (q * scale) - x @ w))

    assert output_error(rounded) < 0.8 * output_error(nearest)


def test_int8_for_a_cpu_without_int8_dot_product_keeps_7_bit_weights(
    tiny_export: Path, tmp_path: Path
) -> None:
    """Exported for AVX2 (whatever this CPU has): weights within ±63, so that pairs of u8 x s8
    products fit int16, and no CPU flag required."""
    import onnx
    from onnx import numpy_helper

    from lmscore.export.cpu import REQUIRES_KEY
    from lmscore.export.int8 import quantize_int8

    target = tmp_path / ONNX_NAME
    details = quantize_int8(tiny_export / ONNX_NAME, target, int8_dot_product=False)
    assert details["weight_levels"] == 63 and details[REQUIRES_KEY] == []
    model = onnx.load(str(target))
    weights = [
        numpy_helper.to_array(t)
        for t in model.graph.initializer
        if t.name.endswith("/int8/w") and t.data_type == onnx.TensorProto.INT8
    ]
    assert len(weights) == details["quantized_matmuls"] > 0
    assert max(int(np.abs(w.astype(np.int32)).max()) for w in weights) == 63


def test_cpu_flags_that_decide_the_int8_kernels() -> None:
    from lmscore.export.cpu import has_int8_dot_product, vector_flags

    avx2 = frozenset({"sse4_2", "avx", "avx2", "fma"})
    assert not has_int8_dot_product(avx2)
    assert all(
        has_int8_dot_product(avx2 | {flag}) for flag in ("avx512_vnni", "avx_vnni", "amx_int8")
    )
    assert vector_flags(avx2 | {"amx_int8", "avx512f"}) == ["amx_int8", "avx", "avx2", "avx512f"]


def test_int8_export_rounds_each_weight_once_per_smoothing(
    tiny_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GPTQ is most of an int8 export's time: the search and the final graph share one
    rounding per (MatMul, smoothing), however many activation scalings reuse it."""
    from lmscore.export import int8

    calls: list[tuple[int, int]] = []
    rounding = int8.gptq

    def counted(w: np.ndarray, *args, **kwargs) -> np.ndarray:
        calls.append(w.shape)
        return rounding(w, *args, **kwargs)

    monkeypatch.setattr(int8, "gptq", counted)
    details = int8.quantize_int8(tiny_export / ONNX_NAME, tmp_path / ONNX_NAME)
    smoothings = {v.smoothing for v in int8.VARIANTS}
    assert len(calls) == details["weight_matmuls"] * len(smoothings)
