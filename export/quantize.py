"""Quantized CPU variant of an exported model: `lmscore export --quantize RECIPE`.

The float32 export (graph with the scoring head, tokenizer, config) is the
input; the output is a sibling directory `NAME-RECIPE` whose manifest records
the recipe, and what was measured against float32 on this machine, side by
side in one process: the throughput ratio on 8 x 128 tokens of GPL-3 text and
the deviation |log p_quantized - log p_float32| per token on held-out text
(Apache-2.0 and MPL-2.0, never used for calibration). The recipes and the
whole trade-off table are in docs/quantization.md.
"""

from __future__ import annotations

import dataclasses
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lmscore.export.graph_io import model_feeds
from lmscore.export.manifest import (
    ONNX_DATA_NAME,
    ONNX_NAME,
    TOKENIZER_NAME,
    Manifest,
    weights_file_in,
)
from lmscore.export.quant_recipes import RECIPES, apply_recipe

LICENSES = Path("/usr/share/common-licenses")
SPEED_TEXT = LICENSES / "GPL-3"
HELD_OUT_TEXTS = [LICENSES / "Apache-2.0", LICENSES / "MPL-2.0"]
DEFAULT_RECIPE = next(iter(RECIPES))


@dataclasses.dataclass(frozen=True)
class QuantizationFigures:
    speedup: float
    fp32_tokens_per_s: float
    quantized_tokens_per_s: float
    mean_abs_deviation: float
    max_abs_deviation: float
    held_out_tokens: int


def _windows(ids: list[int], bos: int | None, count: int, length: int) -> np.ndarray:
    prefix = [] if bos is None else [bos]
    rows = [prefix + ids[i * length : (i + 1) * length] for i in range(count)]
    return np.asarray([r for r in rows if len(r) == len(prefix) + length], dtype=np.int64)


def _session(path: Path):  # -> onnxruntime.InferenceSession
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _logprobs(session, batch: np.ndarray) -> np.ndarray:
    targets = np.zeros_like(batch)
    targets[:, :-1] = batch[:, 1:]
    feeds = model_feeds(session.get_inputs(), batch, np.ones_like(batch), target_ids=targets)
    (logprobs,) = session.run(["target_logprobs"], feeds)
    return logprobs[:, :-1]


def measure(
    fp32_dir: Path, quantized_dir: Path, bos: int | None, max_context: int, repeats: int = 5
) -> QuantizationFigures:
    """Throughput ratio (interleaved runs, median) and per-token deviation on held-out text."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(fp32_dir / TOKENIZER_NAME))

    def encode(path: Path) -> list[int]:
        return tokenizer.encode(path.read_text(encoding="utf-8"), add_special_tokens=False).ids

    length = min(128, max_context - 1)
    fp32 = _session(fp32_dir / ONNX_NAME)
    quantized = _session(quantized_dir / ONNX_NAME)
    deviations = []
    for path in HELD_OUT_TEXTS:
        batch = _windows(encode(path), bos, 8, length)
        deviations.append(np.abs(_logprobs(quantized, batch) - _logprobs(fp32, batch)).ravel())
    deviation = np.concatenate(deviations).astype(np.float64)

    batch = _windows(encode(SPEED_TEXT), bos, 8, length)
    times: dict[str, list[float]] = {"fp32": [], "quantized": []}
    runs: dict[str, Callable[[], object]] = {
        "fp32": lambda: _logprobs(fp32, batch),
        "quantized": lambda: _logprobs(quantized, batch),
    }
    for run in runs.values():
        run()  # warm-up
    for _ in range(repeats):
        for name, run in runs.items():  # interleaved: both see the same machine state
            began = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - began)
    tokens = batch.shape[0] * (batch.shape[1] - 1)
    fp32_rate = tokens / statistics.median(times["fp32"])
    quantized_rate = tokens / statistics.median(times["quantized"])
    return QuantizationFigures(
        speedup=quantized_rate / fp32_rate,
        fp32_tokens_per_s=fp32_rate,
        quantized_tokens_per_s=quantized_rate,
        mean_abs_deviation=float(deviation.mean()),
        max_abs_deviation=float(deviation.max()),
        held_out_tokens=int(deviation.size),
    )


def quantize_export(fp32_dir: Path, output_dir: Path, recipe: str = DEFAULT_RECIPE) -> Manifest:
    """Write the quantized variant of the export in `fp32_dir` to `output_dir`."""
    manifest = Manifest.read(fp32_dir)
    if manifest.quantization:
        raise ValueError(f"{fp32_dir} is already quantized ({manifest.quantization['recipe']})")
    started = time.perf_counter()
    output_dir = output_dir.expanduser().resolve()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{output_dir.name}.", dir=output_dir.parent) as tmp:
        work_dir = Path(tmp) / "model"
        # Everything but the graph and its weights, which the recipe writes.
        skipped = shutil.ignore_patterns(ONNX_NAME, ONNX_DATA_NAME, "*.json~")
        shutil.copytree(fp32_dir, work_dir, ignore=skipped)
        apply_recipe(fp32_dir / ONNX_NAME, work_dir / ONNX_NAME, recipe)
        figures = measure(fp32_dir, work_dir, manifest.bos_token_id, manifest.max_context)
        quantized = dataclasses.replace(
            manifest,
            name=f"{manifest.name}-{recipe}",
            dtype=RECIPES[recipe].dtype,
            export_seconds=round(manifest.export_seconds + time.perf_counter() - started, 2),
            quantization={"recipe": recipe, **dataclasses.asdict(figures)},
            weights_file=weights_file_in(work_dir),
        )
        quantized.write(work_dir)
        if output_dir.exists():
            shutil.rmtree(output_dir)
        work_dir.rename(output_dir)
    return quantized
