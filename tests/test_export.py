"""The export: the manifest says what the directory holds, and its validation figure is true."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from lmscore.export.graph_io import full_sequence_feeds
from lmscore.export.manifest import FORMAT_VERSION, Manifest, ManifestError
from lmscore.export.validate import VALIDATION_TEXT
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


def test_validation_figure_matches_an_independent_measurement(
    tiny_export: Path, tiny_torch
) -> None:
    import torch

    model, hf_tokenizer = tiny_torch
    ids = [
        1,
        *hf_tokenizer(VALIDATION_TEXT.read_text().strip(), add_special_tokens=False)["input_ids"],
    ]
    with torch.no_grad():
        reference = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), -1)
    session = ort.InferenceSession(str(tiny_export / "model.onnx"))
    array = np.array([ids])
    (logits,) = session.run(
        ["logits"], full_sequence_feeds(session.get_inputs(), array, np.ones_like(array))
    )
    ort_logprobs = torch.log_softmax(torch.from_numpy(logits[0, :-1]).double(), -1)
    targets = torch.tensor(ids[1:])
    rows = torch.arange(len(targets))
    measured = float((ort_logprobs[rows, targets] - reference[rows, targets]).abs().max())
    manifest = Manifest.read(tiny_export)
    assert manifest.validation_tokens == len(ids)
    assert manifest.validation_max_abs_diff == pytest.approx(measured, abs=1e-5)
    assert manifest.validation_max_abs_diff < 1e-4


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
