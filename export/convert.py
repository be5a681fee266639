"""Export a causal LM to an ONNX directory the server loads.

Steps (each shown on a progress bar, the slow ones are 1 and 2):
  1. load the source with transformers (a GGUF file is dequantized to float32);
  2. export the graph with Optimum (`text-generation-with-past`), in float32; with
     dtype "float16", convert it (lmscore.export.half);
  3. add the fused scoring head (lmscore.export.head) and write the past-tiling
     graph (lmscore.export.past_tile); save tokenizer.json and the model config
     beside the graph;
  4. measure the validation figure (lmscore.export.validate) and write the manifest;
     it runs on ONNX Runtime's CPU provider for float16 too (ORT casts around the
     few ops it has no float16 CPU kernel for), under a float16 tolerance.
The directory is built under a temporary name and renamed into place, so an
interrupted export never leaves a directory that looks complete.
"""

from __future__ import annotations

import datetime
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lmscore.export.attention import fused_attention, fused_attention_layers
from lmscore.export.external_data import load_graph, save_model
from lmscore.export.gguf_tokenizer import faithful_tokenizer
from lmscore.export.half import (
    DTYPE_FLOAT16,
    MAX_VALIDATION_DIFF,
    convert_to_float16,
    variant_name,
)
from lmscore.export.head import add_scoring_head
from lmscore.export.manifest import (
    FORMAT_VERSION,
    ONNX_NAME,
    TOKENIZER_NAME,
    Manifest,
    weights_file_in,
)
from lmscore.export.past_tile import write_past_tile
from lmscore.export.source import ModelSource, resolve_source
from lmscore.export.tied import share_tied_embeddings
from lmscore.export.validate import VALIDATION_TEXT, validate_export
from lmscore.export.words import word_start_mask, write_word_starts

EXPORT_TASK = "text-generation-with-past"


class ExportError(RuntimeError):
    """The export ran but its result is not fit to serve."""


def _load(source: ModelSource) -> tuple[object, object]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(
        str(source.directory), dtype=torch.float32, **kwargs
    )
    model.eval()
    if source.gguf_file:
        # transformers' own GGUF tokenizers are not faithful (lmscore.export.gguf_tokenizer).
        text = VALIDATION_TEXT.read_text(encoding="utf-8")
        return model, faithful_tokenizer(source.directory / source.gguf_file, [text])
    tokenizer = AutoTokenizer.from_pretrained(str(source.directory))
    if not getattr(tokenizer, "is_fast", False):
        raise ExportError("the source has no fast tokenizer; the server needs tokenizer.json")
    return model, tokenizer


def _graph_facts(onnx_path: Path) -> tuple[int, int]:
    """The graph's ONNX opset and its fused attention layers, from one load of the file."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    opset = max(int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx"))
    return opset, fused_attention_layers(model.graph)


def export_model(
    source_spec: str,
    output_dir: Path,
    *,
    dtype: str = "float32",
    max_validation_diff: float | None = None,
    max_context: int | None = None,
    progress: bool = True,
) -> Manifest:
    """Export `source_spec` (see resolve_source) to `output_dir`, replacing what was there.

    `dtype` "float16" converts the transformer to float16 for CUDA (the scoring head stays
    float32); `max_validation_diff` defaults to MAX_VALIDATION_DIFF[dtype]; `max_context`
    (tokens) is required when the config does not say (Bloom's ALiBi has no limit), and may
    lower what it says.
    """
    import importlib.metadata as metadata

    import onnxruntime
    import torch
    from optimum.exporters.onnx import onnx_export_from_model

    if dtype not in MAX_VALIDATION_DIFF:
        raise ValueError(f"dtype must be one of {', '.join(MAX_VALIDATION_DIFF)}, not {dtype!r}")
    if max_validation_diff is None:
        max_validation_diff = MAX_VALIDATION_DIFF[dtype]
    source = resolve_source(source_spec)
    started = time.perf_counter()
    output_dir = output_dir.expanduser().resolve()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    # Closed on failure too, so an error printed after it starts a line of its own.
    bar = tqdm(total=4, desc="export", unit="step", disable=not progress)
    with (
        bar,
        tempfile.TemporaryDirectory(prefix=f".{output_dir.name}.", dir=output_dir.parent) as tmp,
    ):
        work_dir = Path(tmp) / "model"
        bar.set_description(f"loading {source.name} with transformers")
        model, tokenizer = _load(source)
        config = model.config  # type: ignore[attr-defined]
        context = _context_of(config, max_context)
        bar.update()

        bar.set_description("exporting ONNX with Optimum")
        with fused_attention(model):
            onnx_export_from_model(model, str(work_dir), task=EXPORT_TASK, do_validation=False)
        # One embedding matrix where the model ties it; the weights in model.onnx_data.
        graph = load_graph(work_dir / ONNX_NAME)
        share_tied_embeddings(graph, work_dir)
        save_model(graph, work_dir / ONNX_NAME)
        if dtype == DTYPE_FLOAT16:
            bar.set_description("converting the graph to float16")
            convert_to_float16(work_dir / ONNX_NAME)
        bar.update()

        bar.set_description("adding the scoring head; saving tokenizer and config")
        tokenizer.save_pretrained(str(work_dir))  # type: ignore[attr-defined]
        width = _output_width(model)
        word_starts = word_start_mask(work_dir / TOKENIZER_NAME, width, config.eos_token_id)
        write_word_starts(work_dir, word_starts)
        add_scoring_head(work_dir / ONNX_NAME, width, word_starts)
        write_past_tile(work_dir)
        config.save_pretrained(str(work_dir))
        if not (work_dir / TOKENIZER_NAME).is_file() or not (work_dir / ONNX_NAME).is_file():
            raise ExportError(f"the export did not write {ONNX_NAME} and {TOKENIZER_NAME}")
        bar.update()

        bar.set_description("validating ONNX Runtime against PyTorch")
        bos = config.bos_token_id
        figure = validate_export(model, tokenizer, work_dir, bos, context)
        bar.update()
        bar.close()
        if not figure.max_abs_diff <= max_validation_diff:
            raise ExportError(
                f"validation failed: max |delta log p| = {figure.max_abs_diff:.3g} "
                f"exceeds {max_validation_diff:g}"
            )
        opset, fused_layers = _graph_facts(work_dir / ONNX_NAME)
        manifest = Manifest(
            format_version=FORMAT_VERSION,
            name=variant_name(source.name, dtype),
            source=source.description,
            source_sha256=source.sha256(),
            architecture=(config.architectures or [type(model).__name__])[0],
            model_type=config.model_type,
            vocab_size=int(config.vocab_size),
            bos_token_id=None if bos is None else int(bos),
            eos_token_id=_first_id(config.eos_token_id),
            max_context=context,
            dtype=dtype,
            opset=opset,
            onnxruntime_version=onnxruntime.__version__,
            optimum_version=metadata.version("optimum-onnx"),
            transformers_version=metadata.version("transformers"),
            torch_version=torch.__version__,
            scoring_head=True,
            layers=int(getattr(config, "num_hidden_layers", 0) or 0),
            fused_attention_layers=fused_layers,
            weights_file=weights_file_in(work_dir),
            validation_max_abs_diff=figure.max_abs_diff,
            validation_tokens=figure.tokens,
            export_seconds=round(time.perf_counter() - started, 2),
            created_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        )
        manifest.write(work_dir)
        if output_dir.exists():
            shutil.rmtree(output_dir)
        work_dir.rename(output_dir)
    return manifest


# Where configs keep the longest sequence the model was trained for.
CONTEXT_ATTRIBUTES = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")


def _context_of(config: Any, requested: int | None) -> int:
    """The model's context: from its config, or `requested` (which may only lower it)."""
    known = next(
        (int(v) for a in CONTEXT_ATTRIBUTES if isinstance(v := getattr(config, a, None), int)),
        None,
    )
    if requested is not None and requested < 2:
        raise ExportError(f"--max-context must be at least 2, got {requested}")
    if known is None and requested is None:
        raise ExportError(
            f"the config of {config.model_type} says no context length (none of "
            f"{', '.join(CONTEXT_ATTRIBUTES)}); give one with --max-context N"
        )
    if known is not None and requested is not None and requested > known:
        raise ExportError(f"--max-context {requested} exceeds the model's own {known}")
    return requested if requested is not None else known  # type: ignore[return-value]


def _output_width(model: object) -> int:
    return int(model.get_output_embeddings().weight.shape[0])  # type: ignore[attr-defined]


def _first_id(value: int | list[int] | None) -> int | None:
    if isinstance(value, list):
        return int(value[0]) if value else None
    return None if value is None else int(value)
