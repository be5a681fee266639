"""The export: the manifest says what the directory holds, and its validation figure is true."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from lmscore.export.graph_io import model_feeds
from lmscore.export.manifest import FORMAT_VERSION, Manifest, ManifestError
from lmscore.export.validate import VALIDATION_TEXT
from lmscore.server.scoring import score_positions
from lmscore.v1.options import ScoreOptions
from tiny_model import MAX_CONTEXT, VOCAB_SIZE


def test_directory_holds_model_tokenizer_config_and_manifest(tiny_export: Path) -> None:
    for name in ("model.onnx", "tokenizer.json", "config.json", "lmscore-manifest.json"):
        assert (tiny_export / name).is_file(), name


def test_manifest_records_the_source_and_the_model(tiny_export: Path, tiny_hf_dir: Path) -> None:
    manifest = Manifest.read(tiny_export)
    digest = hashlib.sha256()
    for path in sorted(p for p in tiny_hf_dir.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(tiny_hf_dir)).encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    assert manifest.source_sha256 == digest.hexdigest()
    assert manifest.format_version == FORMAT_VERSION
    assert manifest.architecture == "LlamaForCausalLM"
    assert manifest.vocab_size == VOCAB_SIZE
    assert manifest.max_context == MAX_CONTEXT
    assert (manifest.bos_token_id, manifest.eos_token_id) == (1, 2)
    assert manifest.dtype == "float32"
    assert manifest.opset >= 14
    assert manifest.onnxruntime_version == ort.__version__
    assert manifest.optimum_version == "0.1.0"
    assert manifest.scoring_head is True


def head_outputs(export_dir: Path, ids: list[int], top_k: int = 0) -> list[np.ndarray]:
    session = ort.InferenceSession(str(export_dir / "model.onnx"))
    array = np.array([ids])
    targets = np.zeros_like(array)
    targets[0, :-1] = ids[1:]
    feeds = model_feeds(
        session.get_inputs(), array, np.ones_like(array), target_ids=targets, top_k=top_k
    )
    names = ["target_logprobs", "target_ranks", "top_logprobs", "top_ids"]
    return [x[0, :-1] for x in session.run(names, feeds)]


def test_validation_figure_matches_an_independent_measurement(
    tiny_export: Path, tiny_torch
) -> None:
    import torch

    model, hf_tokenizer = tiny_torch
    text = VALIDATION_TEXT.read_text().strip()
    # BOS and the text, cut to the model's context as the export does.
    ids = [1, *hf_tokenizer(text, add_special_tokens=False)["input_ids"]][:MAX_CONTEXT]
    with torch.no_grad():
        reference = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), -1)
    targets = torch.tensor(ids[1:])
    expected = reference[torch.arange(len(targets)), targets].numpy()
    measured = float(np.abs(head_outputs(tiny_export, ids)[0] - expected).max())
    manifest = Manifest.read(tiny_export)
    assert manifest.validation_tokens == len(ids)
    assert manifest.validation_max_abs_diff == pytest.approx(measured, abs=1e-5)
    assert manifest.validation_max_abs_diff < 1e-4


def test_scoring_head_equals_the_numpy_definition_on_pytorch_logits(
    tiny_export: Path, tiny_torch
) -> None:
    import torch

    model, hf_tokenizer = tiny_torch
    ids = [1, *hf_tokenizer("The Program is free software", add_special_tokens=False)["input_ids"]]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].numpy()
    expected = score_positions(logits, np.array(ids[1:]), top_k=4)
    logprobs, ranks, top_logprobs, top_ids = head_outputs(tiny_export, ids, top_k=4)
    np.testing.assert_allclose(logprobs, expected.logprobs, atol=1e-4)
    np.testing.assert_array_equal(ranks, expected.ranks)
    np.testing.assert_array_equal(top_ids, expected.top_ids)
    np.testing.assert_allclose(top_logprobs, expected.top_logprobs, atol=1e-4)
    assert "logits" not in {
        o.name for o in ort.InferenceSession(str(tiny_export / "model.onnx")).get_outputs()
    }


def test_export_fails_when_validation_misses_the_tolerance(
    tiny_hf_dir: Path, tmp_path: Path
) -> None:
    from lmscore.export.convert import ExportError, export_model

    with pytest.raises(ExportError, match="validation failed"):
        export_model(str(tiny_hf_dir), tmp_path / "out", max_validation_diff=-1.0, progress=False)
    assert not (tmp_path / "out").exists()


def test_incompatible_or_missing_manifest_is_refused(tiny_export: Path, tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="not an exported lmscore model"):
        Manifest.read(tmp_path)
    data = json.loads((tiny_export / "lmscore-manifest.json").read_text())
    data["format_version"] = FORMAT_VERSION + 1
    (tmp_path / "lmscore-manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="format_version"):
        Manifest.read(tmp_path)


@pytest.mark.parametrize("recipe", ["q4-exact", "int8-dynamic"])
def test_quantized_variant_records_what_it_measured(
    tiny_export: Path, tmp_path: Path, recipe: str
) -> None:
    from lmscore.export.quantize import quantize_export
    from lmscore.server.app import load_model
    from lmscore.server.config import ServerConfig
    from lmscore.server.requests import ItemInput

    target = tmp_path / f"tiny-{recipe}"
    manifest = quantize_export(tiny_export, target, recipe)
    figures = manifest.quantization
    assert figures is not None and figures["recipe"] == recipe
    assert figures["speedup"] > 0 and figures["held_out_tokens"] > 1000
    assert Manifest.read(target).quantization == figures

    # The deviation, measured again through the server's own engine on held-out text.
    engines = [load_model(ServerConfig(model_dir=d)).engine for d in (tiny_export, target)]
    text = Path("/usr/share/common-licenses/Apache-2.0").read_text()
    ids = engines[0].tokenizer.encode(text)
    items = [ItemInput(None, [ids[i * 95 : (i + 1) * 95]]) for i in range(8)]
    scored = [e.score_sync(e.plan(items, ScoreOptions(token_details=True))) for e in engines]
    deltas = [
        abs(a.logprob - b.logprob)
        for x, y in zip(*scored, strict=True)
        for a, b in zip(x.tokens[1:], y.tokens[1:], strict=True)
    ]
    assert np.mean(deltas) == pytest.approx(figures["mean_abs_deviation"], rel=0.5, abs=1e-3)
    assert 0 < figures["mean_abs_deviation"] < 2.0  # random weights are not on a 4-bit grid
    info = load_model(ServerConfig(model_dir=target)).info
    assert info.quantization.recipe == recipe
    assert info.quantization.mean_abs_deviation == figures["mean_abs_deviation"]


def logits_only_graph(path: Path, vocab: int) -> Path:
    """A graph whose `logits` output is its input `raw` ([batch, sequence, vocab]), beside an
    unused `input_ids`: the scoring head on logits the test chooses."""
    import onnx
    from onnx import TensorProto, helper

    shape = ["batch", "sequence"]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["raw"], ["logits"])],
        "logits-only",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, shape),
            helper.make_tensor_value_info("raw", TensorProto.FLOAT, [*shape, vocab]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [*shape, vocab])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


@pytest.mark.parametrize("vocab", [512, 49152, 50257])
def test_scoring_head_log_softmax_is_unbiased(tmp_path: Path, vocab: int) -> None:
    """On a bare logits graph: the head's log-probs against float64 over a realistic spread of
    logits (a long tail of tiny probabilities, which a one-accumulator float32 sum drops), with
    vocabularies that do and do not fill whole summation blocks."""
    from lmscore.export.head import add_scoring_head

    path = logits_only_graph(tmp_path / "head.onnx", vocab)
    add_scoring_head(path)

    rng = np.random.default_rng(vocab)
    logits = (rng.standard_normal((2, 64, vocab)) * 3).astype(np.float32)
    targets = rng.integers(0, vocab, (2, 64))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logprobs, ranks, top_logprobs, top_ids = session.run(
        ["target_logprobs", "target_ranks", "top_logprobs", "top_ids"],
        {
            "input_ids": targets,
            "raw": logits,
            "target_ids": targets,
            "top_k": np.array([3], np.int64),
            "gather_positions": np.zeros((2, 0), np.int64),  # no distribution read
            "gather_ids": np.zeros(0, np.int64),
        },
    )
    wide = logits.astype(np.float64)
    normalizer = np.log(np.exp(wide).sum(axis=-1))
    target_logits = np.take_along_axis(wide, targets[..., None], -1)
    expected = target_logits[..., 0] - normalizer
    error = logprobs - expected
    assert np.abs(error).max() < 5e-6
    assert abs(error.mean()) < 5e-7  # no systematic drift over a long text
    np.testing.assert_array_equal(ranks, 1 + (wide > target_logits).sum(-1))
    np.testing.assert_array_equal(top_ids, np.argsort(-wide, axis=-1, kind="stable")[..., :3])
    np.testing.assert_allclose(
        top_logprobs, np.sort(wide, axis=-1)[..., ::-1][..., :3] - normalizer[..., None], atol=5e-6
    )


def _export_cli(source: Path, output: Path, *flags: str):
    import subprocess

    from conftest import LMSCORE

    return subprocess.run(
        [LMSCORE, "export", "--source", str(source), "--output", str(output), *flags],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_a_context_shorter_than_the_validation_text_exports(tmp_path: Path) -> None:
    """GPT-2 with 64 positions: the validation text is cut to the context (it raised
    IndexError), and the manifest says 64."""
    from lmscore.export.convert import export_model
    from tiny_model import save_tiny_model

    source = save_tiny_model(tmp_path / "hf", "GPT2Config", 0, n_positions=64)
    manifest = export_model(str(source), tmp_path / "onnx", progress=False)
    assert manifest.max_context == 64 and manifest.validation_tokens == 64
    assert manifest.validation_max_abs_diff < 1e-4


def test_export_failures_are_one_line_and_bloom_needs_a_context(tmp_path: Path) -> None:
    """Bloom's config names no context (ALiBi): one line asking for --max-context, then
    an export with it; any other failure is one line too, the traceback with --verbose."""
    from tiny_model import save_tiny_model

    bloom = save_tiny_model(tmp_path / "bloom", "BloomConfig", 0, n_layer=2, n_head=4)
    refused = _export_cli(bloom, tmp_path / "out")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    [line] = refused.stderr.strip().splitlines()[-1:]
    assert line.startswith("lmscore export: ") and "--max-context" in line
    exported = _export_cli(bloom, tmp_path / "out", "--max-context", "128")
    assert exported.returncode == 0, exported.stderr[-2000:]
    manifest = Manifest.read(tmp_path / "out")
    assert manifest.max_context == 128 and manifest.validation_max_abs_diff < 1e-4
    assert manifest.fused_attention_layers == 0  # Bloom's own attention code

    (bloom / "config.json").write_text('{"model_type": "llama", "hidden_size": "sixty-four"}')
    broken = _export_cli(bloom, tmp_path / "broken")
    assert broken.returncode == 1 and "Traceback" not in broken.stderr
    assert broken.stderr.strip().splitlines()[-1].startswith("lmscore export: exporting ")
    verbose = _export_cli(bloom, tmp_path / "broken", "--verbose")
    assert verbose.returncode != 0 and "Traceback" in verbose.stderr
