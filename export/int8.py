"""The `int8` recipe: int8 MatMuls chosen by their measured effect on the scores.

Each weight MatMul (a MatMul with a constant weight: the linear layers, and the output layer
where it is not the tied embedding) has an int8 form: weights symmetric per output channel on
7 bits (±63; without VNNI, ONNX Runtime's AVX2 u8 x s8 kernel sums pairs of products in int16,
which full-range int8 weights overflow), activations quantized to uint8 per tensor, with one
of three activation scalings (VARIANTS): dynamic (a scale per run, DynamicQuantizeMatMul),
dynamic after SmoothQuant (x / s into the weights as s * W, s_j = max|x_j|^a / max|W_j|^(1-a)),
or static after SmoothQuant (QuantizeLinear with the calibration range, MatMulIntegerToFloat).

What to quantize is measured, not guessed, on calibration text (CALIBRATION_TEXTS: never the
speed or held-out text of lmscore.export.quantize), in one *gated* graph: every candidate
computes both its float32 and its int8 output, and a boolean input per candidate picks which
one flows on, so any set of int8 MatMuls costs one run of one session, computed exactly as
the final graph computes it. Deviation = mean |log p_int8 - log p_float32| per token.

1. Activation scaling, per kind of MatMul (q_proj, ..., down_proj): each variant with every
   MatMul of the kind int8; the variant with the least deviation is used for the kind.
2. Sensitivity, per group (one kind, a block of consecutive layers, GROUPS_PER_KIND blocks):
   the deviation with that group alone int8.
3. Selection: the groups in order of deviation per weight (the cheapest first); the longest
   prefix whose measured deviation is within the budget (binary search, each step measured).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lmscore.export.external_data import load_graph, save_model, tensor_array
from lmscore.export.graph_io import model_feeds
from lmscore.export.head import is_head_node

LICENSES = Path("/usr/share/common-licenses")
CALIBRATION_TEXTS = [LICENSES / "GPL-2", LICENSES / "LGPL-2.1"]
CALIBRATION_WINDOWS = 2  # per text
CALIBRATION_LENGTH = 96  # tokens per window (less where the context is shorter)
# Mean |delta log p| per calibration token allowed; held-out text, not calibrated on, comes
# out somewhat worse (docs/quantization.md), and the target there is 0.1.
BUDGET = 0.05
GROUPS_PER_KIND = 3
WEIGHT_LEVELS = 63  # 7-bit symmetric weights: no int16 overflow in AVX2's u8 x s8 kernel
GATE = "lmscore_int8_gate"


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    smoothing: float  # SmoothQuant's alpha; 0: none
    static: bool  # static activation range from calibration, else a range per run


VARIANTS = (
    Variant("dynamic", 0.0, False),
    Variant("dynamic-smoothed", 0.5, False),
    Variant("static-smoothed", 0.5, True),
)


@dataclasses.dataclass(frozen=True)
class Candidate:
    node: str
    kind: str  # the node name without its layer, e.g. "self_attn/q_proj"
    layer: int | None
    input: str
    weight: str
    output: str
    elements: int


@dataclasses.dataclass(frozen=True)
class Group:
    kind: str
    layers: tuple[int, ...]
    members: tuple[int, ...]  # indices into the candidates
    elements: int

    @property
    def label(self) -> str:
        if not self.layers:
            return self.kind
        first, last = self.layers[0], self.layers[-1]
        return f"{self.kind} layers {first}-{last}" if last > first else f"{self.kind} layer {last}"


@dataclasses.dataclass(frozen=True)
class ChannelRange:
    low: np.ndarray  # per input channel, over the calibration tokens
    high: np.ndarray

    @property
    def absmax(self) -> np.ndarray:
        return np.maximum(np.abs(self.low), np.abs(self.high))


def candidates(model) -> list[Candidate]:  # model: onnx.ModelProto
    constants = {t.name: t for t in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in constants or is_head_node(node):
            continue
        dims = constants[node.input[1]].dims
        if len(dims) != 2:
            continue
        match = re.search(r"layers\.(\d+)", node.name)
        kind = re.sub(r"^/?(model/)?(layers\.\d+/)?", "", node.name).removesuffix("/MatMul")
        found.append(
            Candidate(
                node.name,
                kind or node.name,
                int(match.group(1)) if match else None,
                node.input[0],
                node.input[1],
                node.output[0],
                int(dims[0]) * int(dims[1]),
            )
        )
    return found


def groups(found: Sequence[Candidate], per_kind: int = GROUPS_PER_KIND) -> list[Group]:
    result = []
    for kind in dict.fromkeys(c.kind for c in found):
        members = [i for i, c in enumerate(found) if c.kind == kind]
        layers = sorted({found[i].layer for i in members if found[i].layer is not None})
        size = max(1, math.ceil(len(layers) / per_kind))
        blocks = [layers[i : i + size] for i in range(0, len(layers), size)] or [[]]
        for block in blocks:
            chosen = tuple(i for i in members if not layers or found[i].layer in block)
            elements = sum(found[i].elements for i in chosen)
            result.append(Group(kind, tuple(block), chosen, elements))
    return result


def quantized_nodes(
    candidate: Candidate,
    weight: np.ndarray,
    channels: ChannelRange,
    variant: Variant,
    output: str,
) -> tuple[list[Any], list[Any]]:
    """(nodes, initializers) computing `output` from the candidate's input in int8."""
    from onnx import helper, numpy_helper

    prefix = f"{candidate.node}/int8"
    nodes, tensors = [], []
    w = np.asarray(weight, dtype=np.float64)
    x = candidate.input
    shrink = np.ones(w.shape[0])
    if variant.smoothing:
        alpha = variant.smoothing
        rows = np.abs(w).max(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            s = channels.absmax.astype(np.float64) ** alpha / rows ** (1 - alpha)
        s = np.where(np.isfinite(s) & (s > 1e-6), s, 1.0)
        w = w * s[:, None]
        shrink = 1.0 / s
        tensors.append(numpy_helper.from_array(shrink.astype(np.float32), f"{prefix}/smooth"))
        nodes.append(helper.make_node("Mul", [x, f"{prefix}/smooth"], [f"{prefix}/x"]))
        x = f"{prefix}/x"
    scale = np.abs(w).max(axis=0) / WEIGHT_LEVELS
    scale = np.where(scale > 0, scale, 1.0)
    q = np.clip(np.rint(w / scale), -WEIGHT_LEVELS, WEIGHT_LEVELS).astype(np.int8)
    tensors += [
        numpy_helper.from_array(q, f"{prefix}/w"),
        numpy_helper.from_array(scale.astype(np.float32), f"{prefix}/w_scale"),
    ]
    if not variant.static:
        nodes.append(
            helper.make_node(
                "DynamicQuantizeMatMul",
                [x, f"{prefix}/w", f"{prefix}/w_scale"],
                [output],
                domain="com.microsoft",
            )
        )
        return nodes, tensors
    low = min(0.0, float((channels.low * shrink).min()))
    high = max(0.0, float((channels.high * shrink).max()))
    a_scale = (high - low) / 255 if high > low else 1.0
    zero = np.uint8(np.clip(np.rint(-low / a_scale), 0, 255))
    tensors += [
        numpy_helper.from_array(np.array(a_scale, np.float32), f"{prefix}/x_scale"),
        numpy_helper.from_array(np.array(zero, np.uint8), f"{prefix}/x_zero"),
    ]
    nodes += [
        helper.make_node(
            "QuantizeLinear", [x, f"{prefix}/x_scale", f"{prefix}/x_zero"], [f"{prefix}/xq"]
        ),
        helper.make_node(
            "MatMulIntegerToFloat",
            [f"{prefix}/{name}" for name in ("xq", "w", "x_scale", "w_scale", "x_zero")],
            [output],
            domain="com.microsoft",
        ),
    ]
    return nodes, tensors


def _with_contrib_opset(model) -> None:
    from onnx import helper

    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def rewrite(
    model,
    weights_dir: Path,
    found: Sequence[Candidate],
    ranges: dict[str, ChannelRange],
    chosen: dict[int, Variant],
    gated: bool = False,
) -> None:
    """Replace the candidates in `chosen` (index -> variant) by their int8 form, in place.

    `gated`: every chosen candidate keeps its float32 MatMul too, and input GATE (bool, one per
    chosen candidate in index order) picks which output flows on."""
    from onnx import TensorProto, helper, numpy_helper

    by_node = {found[i].node: i for i in chosen}
    order = {i: n for n, i in enumerate(sorted(chosen))}
    constants = {t.name: t for t in model.graph.initializer}
    nodes = []
    added = []
    for node in model.graph.node:
        index = by_node.get(node.name)
        if index is None:
            nodes.append(node)
            continue
        c = found[index]
        weight = tensor_array(constants[c.weight], weights_dir)
        target = f"{c.output}/int8" if gated else c.output
        branch, tensors = quantized_nodes(c, weight, ranges[c.input], chosen[index], target)
        added += tensors
        if gated:
            node.output[0] = f"{c.output}/float32"
            position = f"{c.node}/gate_index"
            added.append(numpy_helper.from_array(np.array(order[index], np.int64), position))
            nodes += [
                node,
                *branch,
                helper.make_node("Gather", [GATE, position], [f"{c.node}/gate"]),
                helper.make_node(
                    "Where", [f"{c.node}/gate", target, f"{c.output}/float32"], [c.output]
                ),
            ]
        else:
            nodes += branch
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(added)
    if gated:
        model.graph.input.append(
            helper.make_tensor_value_info(GATE, TensorProto.BOOL, [len(chosen)])
        )
    else:
        used = {name for node in model.graph.node for name in node.input}
        for tensor in [t for t in model.graph.initializer if t.name not in used]:
            model.graph.initializer.remove(tensor)
    _with_contrib_opset(model)


def session_from(model, weights_dir: Path):  # -> onnxruntime.InferenceSession
    """A session of an in-memory graph whose external weights live in `weights_dir`."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry(
        "session.model_external_initializers_file_folder_path", str(weights_dir)
    )
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def calibration_batch(model_dir: Path, bos: int | None, max_context: int) -> np.ndarray:
    from tokenizers import Tokenizer

    from lmscore.export.manifest import TOKENIZER_NAME

    tokenizer = Tokenizer.from_file(str(model_dir / TOKENIZER_NAME))
    length = min(CALIBRATION_LENGTH, max_context - 1)
    prefix = [] if bos is None else [bos]
    rows = []
    for path in CALIBRATION_TEXTS:
        text = path.read_text(encoding="utf-8")
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        rows += [prefix + ids[i * length : (i + 1) * length] for i in range(CALIBRATION_WINDOWS)]
    return np.asarray([r for r in rows if len(r) == len(prefix) + length], dtype=np.int64)


def _run(session, batch: np.ndarray, names: Sequence[str], gates: np.ndarray | None = None):
    targets = np.zeros_like(batch)
    targets[:, :-1] = batch[:, 1:]
    inputs = [i for i in session.get_inputs() if i.name != GATE]
    feeds = model_feeds(inputs, batch, np.ones_like(batch), target_ids=targets)
    if gates is not None:
        feeds[GATE] = gates
    return session.run(list(names), feeds)


def channel_ranges(
    source: Path, found: Sequence[Candidate], batch: np.ndarray
) -> dict[str, ChannelRange]:
    """Per input channel min and max of each candidate's input over the calibration batch."""
    from onnx import helper

    model = load_graph(source)
    names = list(dict.fromkeys(c.input for c in found))
    model.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    values = _run(session_from(model, source.parent), batch, names)
    ranges = {}
    for name, value in zip(names, values, strict=True):
        flat = value.reshape(-1, value.shape[-1])
        ranges[name] = ChannelRange(flat.min(axis=0), flat.max(axis=0))
    return ranges


class GatedGraph:
    """One session of the gated graph with every candidate int8 as `assignment` says."""

    def __init__(
        self,
        source: Path,
        found: Sequence[Candidate],
        ranges: dict[str, ChannelRange],
        assignment: dict[int, Variant],
        batch: np.ndarray,
        reference: np.ndarray | None,
    ) -> None:
        model = load_graph(source)
        rewrite(model, source.parent, found, ranges, assignment, gated=True)
        self.session = session_from(model, source.parent)
        self.order = sorted(assignment)
        self.batch = batch
        self.runs = 0
        self.reference = (
            self.logprobs(()) if reference is None else reference
        )  # every gate closed: float32

    def logprobs(self, indices) -> np.ndarray:
        gates = np.isin(self.order, list(indices))
        self.runs += 1
        (logprobs,) = _run(self.session, self.batch, ["target_logprobs"], gates)
        return logprobs[:, :-1].astype(np.float64)

    def deviation(self, indices) -> float:
        return float(np.abs(self.logprobs(indices) - self.reference).mean())


def search(
    source: Path,
    bos: int | None,
    max_context: int,
    budget: float = BUDGET,
    per_kind: int = GROUPS_PER_KIND,
) -> tuple[list[Candidate], dict[str, ChannelRange], dict[int, Variant], dict[str, Any]]:
    """(candidates, their input ranges, the chosen ones with their variant, what was
    measured)."""
    found = candidates(load_graph(source))
    batch = calibration_batch(source.parent, bos, max_context)
    ranges = channel_ranges(source, found, batch)
    everything = range(len(found))
    kinds = list(dict.fromkeys(c.kind for c in found))

    # 1. Activation scaling per kind.
    reference = None
    by_variant: dict[str, dict[str, float]] = {}
    runs = 0
    for variant in VARIANTS:
        every = dict.fromkeys(everything, variant)
        graph = GatedGraph(source, found, ranges, every, batch, reference)
        reference = graph.reference
        by_variant[variant.name] = {
            kind: graph.deviation([i for i in everything if found[i].kind == kind])
            for kind in kinds
        }
        runs += graph.runs
        del graph
    scaling = {kind: min(VARIANTS, key=lambda v: by_variant[v.name][kind]) for kind in kinds}
    assignment = {i: scaling[found[i].kind] for i in everything}

    # 2. Sensitivity per group, 3. the longest cheap-first prefix within the budget.
    graph = GatedGraph(source, found, ranges, assignment, batch, reference)
    all_groups = groups(found, per_kind)
    sensitivity = [graph.deviation(g.members) for g in all_groups]
    ranked = sorted(range(len(all_groups)), key=lambda g: sensitivity[g] / all_groups[g].elements)

    def members(count: int) -> list[int]:
        return [i for g in ranked[:count] for i in all_groups[g].members]

    measured = {0: 0.0}
    low, high = 0, len(ranked)
    measured[high] = graph.deviation(members(high))
    if measured[high] > budget:
        while high - low > 1:
            middle = (low + high) // 2
            measured[middle] = graph.deviation(members(middle))
            if measured[middle] <= budget:
                low = middle
            else:
                high = middle
        count = low
    else:
        count = high
    runs += graph.runs
    chosen = {i: assignment[i] for i in members(count)}
    kept = [all_groups[g].label for g in ranked[count:]]
    details = {
        "quantized_matmuls": len(chosen),
        "weight_matmuls": len(found),
        "quantized_weight_fraction": sum(found[i].elements for i in chosen)
        / max(1, sum(c.elements for c in found)),
        "float32_groups": kept,
        "activation_scaling": {kind: scaling[kind].name for kind in kinds},
        "calibration_tokens": int(reference.size),
        "calibration_budget": budget,
        "calibration_mean_abs_deviation": measured[count],
        "sensitivity": {all_groups[g].label: round(sensitivity[g], 6) for g in ranked},
        "search_runs": runs,
    }
    return found, ranges, chosen, details


def quantize_int8(source: Path, target: Path, budget: float = BUDGET) -> dict[str, Any]:
    """Search on calibration text, then write the graph with the chosen MatMuls int8."""
    from lmscore.export.manifest import Manifest

    manifest = Manifest.read(source.parent)
    found, ranges, chosen, details = search(
        source, manifest.bos_token_id, manifest.max_context, budget
    )
    model = load_graph(source)
    rewrite(model, source.parent, found, ranges, chosen)
    save_model(model, target, weights_dir=source.parent)
    return details
