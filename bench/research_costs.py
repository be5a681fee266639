"""What issue 24's research outputs cost, side by side in one run (`lmscore bench --research`).

- Entropy: the batch workload (8 x 128 tokens) with token details and entropy on the
  export, against the same export whose head lacks the research outputs (the graph of
  manifest format 6, sharing the weights file), timed in turn; the cost is 1 - on / off.
- Candidate labels: one 64-token prompt's pass alone, the same pass reading K = 1,000
  labels at its last position, and today's way of asking the same, K one-token completions
  of the prompt (prefix reuse: the prompt once, then the K completions against its
  cache), timed in turn. Targets: entropy <= 5 % of throughput, labels <= 1.2x one pass.

In-process (ONNX Runtime through the engine, no transport), medians of `repeats` rounds,
each round every variant once, so that load drifts hit them alike.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from lmscore.bench.workloads import BATCH_TEXT, build_workloads
from lmscore.server.app import load_model
from lmscore.server.config import EngineSettings, ServerConfig
from lmscore.server.engine import ScoringEngine
from lmscore.server.requests import ItemInput
from lmscore.v1.options import ScoreOptions

LABELS = 1000
PROMPT_TOKENS = 64


def without_research_outputs(model_dir: Path, output: Path) -> Path:
    """`model_dir`'s export with the head's entropy and gathered_logprobs (and their
    inputs and nodes) cut off, as an export of manifest format 6 has it; the weights file is
    hard-linked where `output` is on the same file system, else copied. While the link
    exists the ONNX checker refuses the export's weights file (several links), so nothing
    should quantize the export meanwhile; `run` removes it when done."""
    import onnx

    from lmscore.export.external_data import load_graph
    from lmscore.export.head import GATHER_IDS, GATHER_POSITIONS, RESEARCH_OUTPUTS
    from lmscore.export.manifest import ONNX_DATA_NAME, ONNX_NAME

    output.mkdir(parents=True, exist_ok=True)
    for path in model_dir.iterdir():
        if path.is_file() and path.name not in (ONNX_NAME, ONNX_DATA_NAME):
            shutil.copy2(path, output / path.name)
    model = load_graph(model_dir / ONNX_NAME)
    graph = model.graph
    kept_outputs = [o for o in graph.output if o.name not in RESEARCH_OUTPUTS]
    del graph.output[:]
    graph.output.extend(kept_outputs)
    kept_inputs = [i for i in graph.input if i.name not in (GATHER_IDS, GATHER_POSITIONS)]
    del graph.input[:]
    graph.input.extend(kept_inputs)
    # Drop every node nothing reads any more, back from the outputs.
    needed = {o.name for o in graph.output}
    kept_nodes: list[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if any(name in needed for name in node.output):
            kept_nodes.append(node)
            needed.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(kept_nodes))
    kept_initializers = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(kept_initializers)
    # A hard link (ONNX Runtime refuses weights behind a symbolic link out of the
    # directory), a copy across file systems.
    weights = model_dir / ONNX_DATA_NAME
    try:
        os.link(weights, output / ONNX_DATA_NAME)
    except OSError:
        shutil.copy2(weights, output / ONNX_DATA_NAME)
    onnx.save_model(model, str(output / ONNX_NAME))  # not save_graph: its check refuses links
    return output


def _seconds(run: Callable[[], Any]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def _rounds(variants: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Each variant once as a warm-up, then `repeats` rounds of each in turn: seconds."""
    for run in variants.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            times[name].append(_seconds(run))
    return times


def measure_entropy(
    with_entropy: ScoringEngine, without: ScoringEngine, repeats: int
) -> dict[str, Any]:
    """The batch workload with entropy (token details) against the head without it."""
    work = build_workloads(with_entropy.tokenizer)
    on = with_entropy.plan(work.batch, ScoreOptions(token_details=True, entropy=True))
    off = without.plan(work.batch, ScoreOptions(token_details=True))
    times = _rounds(
        {"on": lambda: with_entropy.score_sync(on), "off": lambda: without.score_sync(off)},
        repeats,
    )
    rate = {name: work.batch_tokens / statistics.median(t) for name, t in times.items()}
    return {
        "tokens": work.batch_tokens,
        "entropy_on_rate_median": rate["on"],
        "entropy_off_rate_median": rate["off"],
        "cost": 1 - rate["on"] / rate["off"],
        "seconds": times,
    }


def measure_labels(engine: ScoringEngine, repeats: int, count: int = LABELS) -> dict[str, Any]:
    """One prompt's pass, the pass reading `count` labels, and `count` one-token completions."""
    ids = engine.tokenizer.encode(BATCH_TEXT.read_text(encoding="utf-8"))
    prompt = ids[1000 : 1000 + PROMPT_TOKENS]
    vocab = engine.facts.vocab_size
    labels = tuple(int(i) for i in np.random.default_rng(24).choice(vocab, count, replace=False))
    plans = {
        "one_pass": engine.plan([ItemInput(prompt, [[]])], ScoreOptions()),
        "labels": engine.plan([ItemInput(prompt, [[]])], ScoreOptions(label_token_ids=labels)),
        "completions": engine.plan(
            [ItemInput(prompt, [[label] for label in labels])], ScoreOptions()
        ),
    }
    results = {name: engine.score_sync(plan) for name, plan in plans.items()}
    # The same numbers both ways: each completion's conditional is its label's log-prob.
    by_label = np.array(results["labels"][0].label_logprobs)
    by_completion = np.array([r.conditional_logprob for r in results["completions"]])
    times = _rounds(
        {name: (lambda plan=plan: engine.score_sync(plan)) for name, plan in plans.items()},
        repeats,
    )
    median = {name: statistics.median(t) for name, t in times.items()}
    return {
        "labels": count,
        "prompt_tokens": len(prompt),
        "one_pass_s": median["one_pass"],
        "labels_s": median["labels"],
        "completions_s": median["completions"],
        "labels_ratio": median["labels"] / median["one_pass"],
        "completions_ratio": median["completions"] / median["one_pass"],
        "max_abs_diff_labels_vs_completions": float(np.abs(by_label - by_completion).max()),
        "seconds": times,
    }


def run(model_dir: Path, repeats: int = 5) -> dict[str, Any]:
    """Both measurements on the export at `model_dir` (its head must have the research
    outputs: an export of manifest format 7)."""
    # Today's way sends the labels as completions of one item: allow that many.
    settings = EngineSettings(max_completions_per_item=max(LABELS, 256))
    engine = load_model(ServerConfig(model_dir=model_dir, engine=settings)).engine
    if not (engine.facts.entropy and engine.facts.gathers):
        raise ValueError(f"{model_dir} has no research outputs: export it again")
    # Beside the export: the same file system, so the weights are linked, not copied.
    with tempfile.TemporaryDirectory(prefix=".format6-", dir=model_dir.parent) as tmp:
        older = without_research_outputs(model_dir, Path(tmp) / model_dir.name)
        without = load_model(ServerConfig(model_dir=older)).engine
        try:
            entropy = measure_entropy(engine, without, repeats)
        finally:
            without.close()
    try:
        labels = measure_labels(engine, repeats)
    finally:
        engine.close()
    return {"model": model_dir.name, "repeats": repeats, "entropy": entropy, "labels": labels}
