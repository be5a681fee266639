"""The manifest: a JSON file beside the exported ONNX model that says what it is.

Written by the export, read by the server. Standard library only.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

MANIFEST_NAME = "lmscore-manifest.json"
ONNX_NAME = "model.onnx"
# The graph's weights (every tensor of 1 KiB or more), beside it: lmscore.export.external_data.
ONNX_DATA_NAME = f"{ONNX_NAME}_data"
TOKENIZER_NAME = "tokenizer.json"
CONFIG_NAME = "config.json"
# Optional: the graph that repeats a key/value cache along the batch on the device
# (lmscore.export.past_tile); without it the server repeats the cache on the host.
PAST_TILE_NAME = "past_tile.onnx"
# Bumped when the layout of an exported directory changes incompatibly, or its content
# (5: tokenizers of GGUF sources rebuilt faithfully, lmscore.export.gguf_tokenizer;
# 6: the head's word_start_logprobs and word_starts.npy, lmscore.export.words;
# 7: the head's entropy and gathered_logprobs, lmscore.export.head).
FORMAT_VERSION = 7
# Older formats the server still loads: 6 lacks only the head's research outputs, so its
# exports serve everything but entropy, candidate labels and distributions (refused by
# name); `lmscore export` exports them again (they are not this FORMAT_VERSION).
READABLE_FORMAT_VERSIONS = (6, FORMAT_VERSION)


class ManifestError(ValueError):
    """The model directory is missing, incomplete or from an incompatible version."""


def older_export(model_dir: Path) -> bool:
    """Whether `model_dir` holds an export whose manifest is not of this FORMAT_VERSION
    (or cannot be read): `lmscore export` makes it again. No manifest there: False."""
    path = model_dir / MANIFEST_NAME
    if not path.is_file():
        return False
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True
    return not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION


@dataclasses.dataclass(frozen=True)
class Manifest:
    format_version: int
    name: str
    source: str
    source_sha256: str
    architecture: str
    model_type: str
    vocab_size: int
    bos_token_id: int | None
    eos_token_id: int | None
    max_context: int
    dtype: str
    opset: int
    onnxruntime_version: str
    optimum_version: str
    transformers_version: str
    torch_version: str
    # The graph has lmscore.export.head's inputs and outputs instead of `logits`.
    scoring_head: bool
    # max |log p_ORT - log p_PyTorch| over every position of the validation text.
    validation_max_abs_diff: float
    validation_tokens: int
    export_seconds: float
    created_at: str
    # Transformer layers, and how many run attention as one fused ONNX Runtime node
    # (lmscore.export.attention); the rest run it as the exported ops.
    layers: int = 0
    fused_attention_layers: int = 0
    # Quantized variants: recipe, and speed and deviation measured against the fp32 export.
    quantization: dict[str, Any] | None = None
    # ONNX_DATA_NAME when the graph keeps its weights there (lmscore.export.external_data);
    # None: one self-contained graph file (no tensor large enough to go there).
    weights_file: str | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    def write(self, model_dir: Path) -> Path:
        path = model_dir / MANIFEST_NAME
        path.write_text(self.to_json(), encoding="utf-8")
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        version = data.get("format_version")
        if version not in READABLE_FORMAT_VERSIONS:
            raise ManifestError(
                f"manifest format_version is {version!r}, this lmscore reads "
                f"{' and '.join(map(str, READABLE_FORMAT_VERSIONS))}; "
                "export the model again with `lmscore export`"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        optional = {f.name for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
        missing = sorted(names - optional - data.keys())
        if missing:
            raise ManifestError(f"manifest lacks fields: {', '.join(missing)}")
        return cls(**{k: data[k] for k in names if k in data})

    @classmethod
    def read(cls, model_dir: Path) -> Manifest:
        path = model_dir / MANIFEST_NAME
        if not path.is_file():
            raise ManifestError(f"{model_dir} is not an exported lmscore model: no {MANIFEST_NAME}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ManifestError(f"cannot read {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ManifestError(f"{path} does not hold a JSON object")
        manifest = cls.from_dict(data)
        for required in (ONNX_NAME, TOKENIZER_NAME, manifest.weights_file):
            if required is not None and not (model_dir / required).is_file():
                raise ManifestError(f"{model_dir} lacks {required}; export it again")
        return manifest


def weights_file_in(model_dir: Path) -> str | None:
    """What the manifest's weights_file says for the graph in `model_dir`."""
    return ONNX_DATA_NAME if (model_dir / ONNX_DATA_NAME).is_file() else None


def model_bytes(model_dir: Path) -> int:
    """Size on disk of the exported graph: model.onnx and its weights file."""
    return sum(
        path.stat().st_size
        for path in (model_dir / ONNX_NAME, model_dir / ONNX_DATA_NAME)
        if path.is_file()
    )
