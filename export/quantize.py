"""Quantized CPU variant of an exported model: `lmscore export --quantize RECIPE`.

The float32 export (graph with the scoring head, tokenizer, config) is the
input; the output is a sibling directory `NAME-RECIPE` whose manifest records
the recipe, and what was measured against float32 on this machine, side by
side in one process: the throughput ratio on 8 x 128 tokens of GPL-3 text and
the deviation |log p_quantized - log p_float32| per token on held-out text
(Apache-2.0 and MPL-2.0, never used for calibration), with the KL divergence
KL(p_float32 || p_quantized) over the whole vocabulary and how often the two
agree on the most likely next token, from the logits of both graphs (a copy of
each graph, in memory, that also returns its `logits`). The recipes and the
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

from lmscore.export.external_data import load_graph
from lmscore.export.graph_io import model_feeds
from lmscore.export.head import LOGITS, TARGET_LOGPROBS
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
    kl_divergence: float  # mean over held-out tokens of KL(p_float32 || p_quantized), nats
    top1_agreement: float  # fraction of held-out positions with the same most likely token
    held_out_tokens: int


def _windows(ids: list[int], bos: int | None, count: int, length: int) -> np.ndarray:
    prefix = [] if bos is None else [bos]
    rows = [prefix + ids[i * length : (i + 1) * length] for i in range(count)]
    return np.asarray([r for r in rows if len(r) == len(prefix) + length], dtype=np.int64)


def _session(path: Path):  # -> onnxruntime.InferenceSession
    import onnxruntime as ort

    # Pre-packed weights, as the server runs; no CPU arena: the server bounds a run's
    # vocabulary-wide tensors and shrinks its one arena when idle, but these two sessions'
    # arenas would each keep the peak of the interleaved whole-batch runs (many GB at
    # Gemma-3's vocabulary). `lmscore bench` measures the variant again under the server's
    # own settings.
    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = False
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _logits_session(path: Path):  # -> onnxruntime.InferenceSession
    """The graph at `path` with the head's input, the logits, as an output too."""
    import onnxruntime as ort
    from onnx import helper

    model = load_graph(path)
    if not any(LOGITS in node.output for node in model.graph.node):
        raise ValueError(f"{path} computes no {LOGITS!r} tensor")
    model.graph.output.append(helper.make_empty_tensor_value_info(LOGITS))
    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = False  # vocabulary-wide buffers freed after each run
    options.add_session_config_entry("session.disable_prepacking", "1")
    options.add_session_config_entry(
        "session.model_external_initializers_file_folder_path", str(path.parent)
    )
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def _logprobs(session, batch: np.ndarray, outputs: tuple[str, ...] = (TARGET_LOGPROBS,)):
    targets = np.zeros_like(batch)
    targets[:, :-1] = batch[:, 1:]
    feeds = model_feeds(session.get_inputs(), batch, np.ones_like(batch), target_ids=targets)
    values = session.run(list(outputs), feeds)
    return values[0][:, :-1] if len(outputs) == 1 else [v[:, :-1] for v in values]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    wide = logits.astype(np.float64)
    wide -= wide.max(axis=-1, keepdims=True)
    return wide - np.log(np.exp(wide).sum(axis=-1, keepdims=True))


def compare(
    fp32_session, quantized_session, batch: np.ndarray, rows_per_run: int = 2
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per scored position: |delta log p| of the target, KL(p_float32 || p_quantized) over
    the vocabulary, and whether the most likely tokens agree (sessions from _logits_session).
    A few rows per run: the vocabulary-wide tensors are [rows, seq, vocab], 1 GB each for
    8 x 128 tokens at Gemma-3's 262,144."""
    outputs = (TARGET_LOGPROBS, LOGITS)
    deviation, kl, agree = [], [], []
    for start in range(0, batch.shape[0], rows_per_run):
        rows = batch[start : start + rows_per_run]
        fp32_lp, fp32_logits = _logprobs(fp32_session, rows, outputs)
        quantized_lp, quantized_logits = _logprobs(quantized_session, rows, outputs)
        deviation.append(np.abs(quantized_lp.astype(np.float64) - fp32_lp).ravel())
        for row in range(rows.shape[0]):  # [seq, vocab] float64 each
            p, q = _log_softmax(fp32_logits[row]), _log_softmax(quantized_logits[row])
            kl.append((np.exp(p) * (p - q)).sum(axis=-1))
            agree.append(p.argmax(axis=-1) == q.argmax(axis=-1))
    return np.concatenate(deviation), np.concatenate(kl), np.concatenate(agree)


def measure(
    fp32_dir: Path, quantized_dir: Path, bos: int | None, max_context: int, repeats: int = 5
) -> QuantizationFigures:
    """Throughput ratio (interleaved runs, median); per-token deviation, KL divergence and
    top-1 agreement on held-out text."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(fp32_dir / TOKENIZER_NAME))

    def encode(path: Path) -> list[int]:
        return tokenizer.encode(path.read_text(encoding="utf-8"), add_special_tokens=False).ids

    length = min(128, max_context - 1)
    sessions = [_logits_session(d / ONNX_NAME) for d in (fp32_dir, quantized_dir)]
    batches = [_windows(encode(path), bos, 8, length) for path in HELD_OUT_TEXTS]
    held_out = [compare(*sessions, batch) for batch in batches]
    del sessions
    deviation, kl, agree = (np.concatenate(parts) for parts in zip(*held_out, strict=True))

    fp32 = _session(fp32_dir / ONNX_NAME)
    quantized = _session(quantized_dir / ONNX_NAME)

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
        kl_divergence=float(kl.mean()),
        top1_agreement=float(agree.mean()),
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
        details = apply_recipe(fp32_dir / ONNX_NAME, work_dir / ONNX_NAME, recipe)
        figures = measure(fp32_dir, work_dir, manifest.bos_token_id, manifest.max_context)
        quantized = dataclasses.replace(
            manifest,
            name=f"{manifest.name}-{recipe}",
            dtype=RECIPES[recipe].dtype,
            export_seconds=round(manifest.export_seconds + time.perf_counter() - started, 2),
            quantization={"recipe": recipe, **dataclasses.asdict(figures), **details},
            weights_file=weights_file_in(work_dir),
        )
        quantized.write(work_dir)
        if output_dir.exists():
            shutil.rmtree(output_dir)
        work_dir.rename(output_dir)
    return quantized
