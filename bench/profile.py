"""Where a batch-scoring run's time goes, ONNX Runtime beside PyTorch eager.

    python -m lmscore.bench.profile [--model DIR] [--source NAME] [--runs 2]

Both score the benchmark's batch (8 x 128 tokens of GPL-3, BOS first): ONNX Runtime
runs the exported graph with the server's session options and its profiler on,
PyTorch runs HFLM's path (forward, log_softmax, gather) under torch.profiler. Each
kernel's time is put in one of four groups: GEMMs (the linear layers and the output
layer), attention, the vocabulary-wide scoring (ONNX Runtime: every kernel whose output
spans the vocabulary, and the reductions over it; PyTorch: log_softmax and gather) and
the rest. How far ONNX Runtime can pull ahead of PyTorch on a CPU is bounded by the GEMM
row: when both libraries' GEMMs take the same time, only the other rows can differ.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from lmscore.export.cpu import vector_flags

GROUPS = ("GEMM", "attention", "vocabulary-wide scoring", "other")
ORT_GEMMS = {
    "MatMul",
    "FusedMatMul",
    "Gemm",
    "MatMulNBits",
    "MatMulInteger",
    "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul",
}
ORT_ATTENTION = {"MultiHeadAttention", "GroupQueryAttention", "Attention"}
TORCH_GEMMS = {"aten::mm", "aten::addmm", "aten::bmm"}
TORCH_SCORING = {"aten::_log_softmax", "aten::gather"}


def _batch_ids(model_dir: Path) -> np.ndarray:
    from lmscore.bench.workloads import build_workloads
    from lmscore.export.manifest import Manifest
    from lmscore.server.tokenization import TextTokenizer

    manifest = Manifest.read(model_dir)
    work = build_workloads(TextTokenizer(model_dir / "tokenizer.json"))
    bos = [] if manifest.bos_token_id is None else [manifest.bos_token_id]
    return np.array([bos + list(i.completions[0]) for i in work.batch], np.int64)  # type: ignore[arg-type]


def _ort_group(event: dict, vocab: int) -> str:
    op = event["args"]["op_name"]
    if op in ORT_GEMMS:
        return "GEMM"
    if op in ORT_ATTENTION:
        return "attention"
    shapes = [d for out in event["args"].get("output_type_shape", []) for d in out.values()]
    inputs = [d for i in event["args"].get("input_type_shape", []) for d in i.values()]
    if any(s and s[-1] >= vocab for s in shapes + inputs):
        return "vocabulary-wide scoring"
    return "other"


def profile_ort(model_dir: Path, ids: np.ndarray, runs: int) -> dict[str, float]:
    """Milliseconds per run by group, from ONNX Runtime's own profiler."""
    import onnxruntime as ort

    from lmscore.export.graph_io import model_feeds
    from lmscore.export.head import WORD_START_OUTPUT
    from lmscore.server.config import RuntimeOptions
    from lmscore.server.runtime import session_options

    config = json.loads((model_dir / "config.json").read_text())
    options = session_options(RuntimeOptions())
    with tempfile.TemporaryDirectory() as scratch:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(scratch) / "ort")
        session = ort.InferenceSession(
            str(model_dir / "model.onnx"), sess_options=options, providers=["CPUExecutionProvider"]
        )
        targets = np.concatenate([ids[:, 1:], ids[:, :1]], axis=1)
        feeds = model_feeds(session.get_inputs(), ids, np.ones_like(ids), target_ids=targets)
        outputs = ["target_logprobs", "target_ranks"]
        if WORD_START_OUTPUT in {o.name for o in session.get_outputs()}:
            outputs.append(WORD_START_OUTPUT)
        session.run(outputs, feeds)  # warm-up, profiled too: dropped below
        walls = []
        for _ in range(runs):
            began = time.perf_counter()
            session.run(outputs, feeds)
            walls.append(time.perf_counter() - began)
        events = json.loads(Path(session.end_profiling()).read_text())
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    per_run = len(kernels) // (runs + 1)
    totals: dict[str, float] = collections.defaultdict(float)
    for event in kernels[per_run:]:
        totals[_ort_group(event, config["vocab_size"])] += event["dur"] / 1000 / runs
    totals["run (wall)"] = 1000 * sum(walls) / runs
    return dict(totals)


def profile_torch(source: str, ids: np.ndarray, runs: int) -> dict[str, float]:
    """Milliseconds per run by group, from torch.profiler's self CPU times."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM

    from lmscore.export.source import resolve_source

    resolved = resolve_source(source)
    kwargs = {"gguf_file": resolved.gguf_file} if resolved.gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(
        str(resolved.directory), dtype=torch.float32, **kwargs
    ).eval()
    batch = torch.from_numpy(ids)

    def run() -> float:
        with torch.no_grad():
            logprobs = torch.log_softmax(model(batch).logits[:, :-1].float(), dim=-1)
            return float(logprobs.gather(-1, batch[:, 1:, None]).double().sum())

    run()
    walls = []
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(runs):
            began = time.perf_counter()
            run()
            walls.append(time.perf_counter() - began)
    totals: dict[str, float] = collections.defaultdict(float)
    for op in profiler.key_averages():
        if op.key in TORCH_GEMMS:
            group = "GEMM"
        elif "scaled_dot_product" in op.key:
            group = "attention"
        elif op.key in TORCH_SCORING:
            group = "vocabulary-wide scoring"
        else:
            group = "other"
        totals[group] += op.self_cpu_time_total / 1000 / runs
    totals["run (wall)"] = 1000 * sum(walls) / runs
    return dict(totals)


def table(ort_ms: dict[str, float], torch_ms: dict[str, float]) -> str:
    flags = vector_flags()
    lines = [
        f"{os.cpu_count()} CPUs; CPU flags: {' '.join(flags)}",
        "| ms per run | ONNX Runtime | PyTorch eager | PyTorch / ONNX Runtime |",
        "|---|---|---|---|",
    ]
    for group in (*GROUPS, "run (wall)"):
        ours, theirs = ort_ms.get(group, 0.0), torch_ms.get(group, 0.0)
        ratio = f"{theirs / ours:.2f}x" if ours else "-"
        lines.append(f"| {group} | {ours:.0f} | {theirs:.0f} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from lmscore.export.paths import default_model_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="an exported model's dir")
    parser.add_argument("--source", default="default", help="the model's source, for PyTorch")
    parser.add_argument("--runs", type=int, default=2, help="profiled runs after a warm-up")
    args = parser.parse_args(argv)
    model_dir = args.model or default_model_dir(os.environ)
    ids = _batch_ids(model_dir)
    print(table(profile_ort(model_dir, ids, args.runs), profile_torch(args.source, ids, args.runs)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
