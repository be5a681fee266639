"""The `int8` recipe: int8 MatMuls chosen by their measured effect on the scores.

Each weight MatMul (a MatMul with a constant weight: the linear layers, and the output layer
where it is not the tied embedding) has an int8 form: weights symmetric per output channel,
rounded by GPTQ (each input row's rounding error spread over the rows not yet rounded,
weighted by the inputs' second moments on fitting text), on 8 bits where the CPU has an int8
dot product (VNNI, AMX) and 7 bits elsewhere (±63: AVX2's u8 x s8 kernel sums pairs of products
in int16, which full-range weights overflow); activations quantized to uint8 with one of the
six scalings in VARIANTS: per tensor, dynamic (a scale per run, DynamicQuantizeMatMul), plain
or after SmoothQuant (x / s into the weights as s * W, s_j = max|x_j|^a / max|W_j|^(1-a)), or
static after SmoothQuant (QuantizeLinear with the fitting text's range, MatMulIntegerToFloat);
or per token (a scale per row, MatMulIntegerToFloat), plain or after SmoothQuant with a = 0.5
or 0.75.

Two texts, neither the speed nor the held-out text of lmscore.export.quantize: the fitting
text (FIT_TEXTS) gives each candidate's input range and second moments; the calibration text
(CALIBRATION_TEXTS) is what deviations are measured on, in one *gated* graph: every candidate
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

from lmscore.export.cpu import INT8_DOT_PRODUCT_FLAGS, REQUIRES_KEY, has_int8_dot_product
from lmscore.export.external_data import load_graph, save_model, tensor_array
from lmscore.export.graph_io import model_feeds
from lmscore.export.head import TARGET_LOGPROBS, is_head_node

LICENSES = Path("/usr/share/common-licenses")
# Fitting text: each candidate's input range (per channel) and second moments (GPTQ).
FIT_TEXTS = [LICENSES / "GPL-2", LICENSES / "LGPL-2.1", LICENSES / "GFDL-1.3"]
FIT_WINDOWS = 16  # per text, where the text is that long
# Calibration text: the deviations the search ranks and selects by; disjoint from the fitting
# text, so that GPTQ's fit to its own inputs does not flatter the measurement.
CALIBRATION_TEXTS = [LICENSES / "CC0-1.0", LICENSES / "Artistic"]
CALIBRATION_WINDOWS = 2  # per text
CALIBRATION_LENGTH = 96  # tokens per window (less where the context is shorter)
# Mean |delta log p| per calibration token allowed. The calibration text is not fitted on, so
# held-out text comes out close to it (docs/quantization.md); the target there is 0.1.
BUDGET = 0.085
GROUPS_PER_KIND = 6  # blocks of 5 layers in a 30-layer model
# Symmetric weight levels: 8 bits where the CPU has an int8 dot product (VNNI, AMX); 7 bits
# elsewhere, as AVX2's u8 x s8 kernel sums pairs of products in int16, which 8-bit weights
# overflow (255 * 127 * 2 > 32767). The variant records what it needs (REQUIRES_KEY).
WEIGHT_LEVELS_VNNI = 127
WEIGHT_LEVELS_AVX2 = 63
GATE = "lmscore_int8_gate"


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    smoothing: float  # SmoothQuant's alpha; 0: none
    static: bool  # static activation range from calibration, else a range per run
    per_token: bool = False  # a scale per token (row) rather than one per run


VARIANTS = (
    Variant("dynamic", 0.0, False),
    Variant("dynamic-smoothed", 0.5, False),
    Variant("static-smoothed", 0.5, True),
    Variant("per-token", 0.0, False, True),
    Variant("per-token-smoothed", 0.5, False, True),
    Variant("per-token-smoothed-0.75", 0.75, False, True),
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
    transposed: bool = False  # the constant is W^T (a tied output layer reading the embedding)


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
    gram: np.ndarray  # X^T X over the fitting tokens (float64), for GPTQ

    @property
    def absmax(self) -> np.ndarray:
        return np.maximum(np.abs(self.low), np.abs(self.high))


@dataclasses.dataclass(frozen=True)
class RoundedWeight:
    """A candidate's int8 weights for one smoothing: x @ W = ((x * shrink) @ q) * scale."""

    q: np.ndarray  # int8 [K, N]
    scale: np.ndarray  # per output channel
    shrink: np.ndarray | None  # per input channel (1 / s); None: no smoothing


class Roundings:
    """Each candidate's GPTQ-rounded weights, once per smoothing: the search builds a graph per
    activation scaling and then the chosen one, from the same few roundings, and rounding is
    most of the search's time."""

    def __init__(self, source: Path, ranges: dict[str, ChannelRange], levels: int) -> None:
        self.weights_dir = source.parent
        self.constants = {t.name: t for t in load_graph(source).graph.initializer}
        self.ranges = ranges
        self.levels = levels
        self.rounded: dict[tuple[str, float], RoundedWeight] = {}

    def get(self, candidate: Candidate, smoothing: float) -> RoundedWeight:
        key = (candidate.node, smoothing)
        if key not in self.rounded:
            weight = tensor_array(self.constants[candidate.weight], self.weights_dir)
            weight = weight.T if candidate.transposed else weight
            channels = self.ranges[candidate.input]
            self.rounded[key] = round_weight(weight, channels, smoothing, self.levels)
        return self.rounded[key]

    def keep(self, wanted: Sequence[tuple[Candidate, float]]) -> None:
        """Forget every rounding but these (the rest are not needed again)."""
        keys = {(c.node, smoothing) for c, smoothing in wanted}
        self.rounded = {k: v for k, v in self.rounded.items() if k in keys}


def round_weight(
    weight: np.ndarray, channels: ChannelRange, smoothing: float, levels: int
) -> RoundedWeight:
    """`weight` [K, N] on `levels` levels each side of 0 per output channel, after SmoothQuant
    with alpha `smoothing` (0: none), rounded by GPTQ against the fitting text's second
    moments."""
    w = np.asarray(weight, dtype=np.float64)
    shrink = None
    gram = channels.gram
    if smoothing:
        rows = np.abs(w).max(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            s = channels.absmax.astype(np.float64) ** smoothing / rows ** (1 - smoothing)
        s = np.where(np.isfinite(s) & (s > 1e-6), s, 1.0)
        w = w * s[:, None]
        shrink = 1.0 / s
        gram = gram * np.outer(shrink, shrink)  # the second moments of x / s
    scale = np.abs(w).max(axis=0) / levels
    scale = np.where(scale > 0, scale, 1.0)
    return RoundedWeight(gptq(w, scale, gram, levels), scale, shrink)


def _attribute(node, name: str, default: float) -> float:
    from onnx import helper

    found = [a for a in node.attribute if a.name == name]
    return helper.get_attribute_value(found[0]) if found else default


def _weight_operand(node, constants) -> bool | None:
    """None where the node is no x @ W with a constant 2-D W; else whether the constant is
    W^T (a FusedMatMul with transB, as the output layer tied to the embedding is)."""
    if node.input[1] not in constants or len(constants[node.input[1]].dims) != 2:
        return None
    if node.op_type == "MatMul":
        return False
    plain = all(_attribute(node, name, 0) == 0 for name in ("transA", "transBatchA", "transBatchB"))
    if node.op_type == "FusedMatMul" and plain and _attribute(node, "alpha", 1.0) == 1.0:
        return bool(_attribute(node, "transB", 0))
    return None


def candidates(model) -> list[Candidate]:  # model: onnx.ModelProto
    constants = {t.name: t for t in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "FusedMatMul") or is_head_node(node):
            continue
        transposed = _weight_operand(node, constants)
        if transposed is None:
            continue
        dims = constants[node.input[1]].dims
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
                transposed,
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
    rounded: RoundedWeight,
    channels: ChannelRange,
    variant: Variant,
    output: str,
) -> tuple[list[Any], list[Any]]:
    """(nodes, initializers) computing `output` from the candidate's input in int8 with the
    weights `rounded` for the variant's smoothing."""
    from onnx import helper, numpy_helper

    prefix = f"{candidate.node}/int8"
    nodes, tensors = [], []
    x = candidate.input
    if rounded.shrink is not None:
        smooth = rounded.shrink.astype(np.float32)
        tensors.append(numpy_helper.from_array(smooth, f"{prefix}/smooth"))
        nodes.append(helper.make_node("Mul", [x, f"{prefix}/smooth"], [f"{prefix}/x"]))
        x = f"{prefix}/x"
    tensors += [
        numpy_helper.from_array(rounded.q, f"{prefix}/w"),
        numpy_helper.from_array(rounded.scale.astype(np.float32), f"{prefix}/w_scale"),
    ]
    if variant.per_token:
        per_token, constants = per_token_nodes(prefix, x, *rounded.q.shape, output)
        return nodes + per_token, tensors + constants
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
    shrink = 1.0 if rounded.shrink is None else rounded.shrink  # the range of x / s
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


def gptq(
    w: np.ndarray,
    scale: np.ndarray,
    gram: np.ndarray,
    levels: int,
    damping: float = 0.01,
    block: int = 128,
    columns: int = 8192,
) -> np.ndarray:
    """Integer weights q (int8, like w: [K, N]) for x @ (q * scale), rounded one input row at a
    time with the error of each row spread over the rows not yet rounded, weighted by the
    inputs' second moments `gram` = X^T X (GPTQ, Frantar et al. 2022), so that the error of
    the *output* on calibration inputs, not of the weights, is what is small. Output channels
    are independent, so they are rounded `columns` at a time: the same result, in less time
    and memory on a wide output layer (Gemma-3's is 640 x 262,144)."""
    k, n = w.shape
    hessian = np.array(gram, dtype=np.float64)
    dead = np.diag(hessian) == 0
    hessian[dead, dead] = 1.0
    hessian[np.diag_indices(k)] += damping * np.mean(np.diag(hessian))
    inverse = np.linalg.inv(hessian)
    upper = np.linalg.cholesky((inverse + inverse.T) / 2).T  # H^-1 = U^T U
    q = np.zeros(w.shape, dtype=np.int8)
    for first in range(0, n, columns):
        last = min(first + columns, n)
        work = np.array(w[:, first:last], dtype=np.float64)
        work[dead, :] = 0.0
        step = scale[first:last]
        for start in range(0, k, block):
            stop = min(start + block, k)
            part = work[start:stop]
            errors = np.zeros_like(part)
            local = upper[start:stop, start:stop]
            for i in range(stop - start):
                row = part[i]
                rounded = np.clip(np.rint(row / step), -levels, levels)
                q[start + i, first:last] = rounded
                error = (row - rounded * step) / local[i, i]
                part[i:] -= np.outer(local[i, i:], error)
                errors[i] = error
            work[stop:] -= upper[start:stop, stop:].T @ errors
    return q


def per_token_nodes(
    prefix: str, x: str, k: int, n: int, output: str
) -> tuple[list[Any], list[Any]]:
    """`output` = x @ (w * w_scale) with x quantized symmetrically per token (row) to u8 around
    128: one zero point for every row, so that MatMulIntegerToFloat takes the u8 x s8 path,
    and the row's scale applied to the float result."""
    from onnx import TensorProto, helper, numpy_helper

    constants = [
        numpy_helper.from_array(np.array(value, dtype), f"{prefix}/{name}")
        for name, value, dtype in (
            ("rows", [-1, k], np.int64),
            ("levels", 127.0, np.float32),
            ("tiny", 1e-30, np.float32),
            ("one", 1.0, np.float32),
            ("x_zero", 128, np.uint8),
            ("axis1", [1], np.int64),
            ("columns", [n], np.int64),
        )
    ]
    v = f"{prefix}/"
    nodes = [
        helper.make_node("Reshape", [x, v + "rows"], [v + "x2"]),
        helper.make_node("Abs", [v + "x2"], [v + "abs"]),
        helper.make_node("ReduceMax", [v + "abs", v + "axis1"], [v + "absmax"], keepdims=0),
        helper.make_node("Max", [v + "absmax", v + "tiny"], [v + "absmax_nz"]),
        helper.make_node("Div", [v + "absmax_nz", v + "levels"], [v + "x_scale"]),
        helper.make_node("Shape", [v + "x_scale"], [v + "count"]),
        helper.make_node(
            "ConstantOfShape",
            [v + "count"],
            [v + "x_zeros"],
            value=helper.make_tensor("zero", TensorProto.UINT8, [1], [128]),
        ),
        helper.make_node(
            "QuantizeLinear", [v + "x2", v + "x_scale", v + "x_zeros"], [v + "xq"], axis=0
        ),
        helper.make_node(
            "MatMulIntegerToFloat",
            [v + "xq", v + "w", v + "one", v + "w_scale", v + "x_zero"],
            [v + "y2"],
            domain="com.microsoft",
        ),
        helper.make_node("Unsqueeze", [v + "x_scale", v + "axis1"], [v + "row_scale"]),
        helper.make_node("Mul", [v + "y2", v + "row_scale"], [v + "y2_scaled"]),
        helper.make_node("Shape", [x], [v + "lead"], end=-1),
        helper.make_node("Concat", [v + "lead", v + "columns"], [v + "y_shape"], axis=0),
        helper.make_node("Reshape", [v + "y2_scaled", v + "y_shape"], [output]),
    ]
    return nodes, constants


def _with_contrib_opset(model) -> None:
    from onnx import helper

    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def rewrite(
    model,
    found: Sequence[Candidate],
    chosen: dict[int, Variant],
    roundings: Roundings,
    gated: bool = False,
) -> None:
    """Replace the candidates in `chosen` (index -> variant) by their int8 form, in place.

    `gated`: every chosen candidate keeps its float32 MatMul too, and input GATE (bool, one per
    chosen candidate in index order) picks which output flows on."""
    from onnx import TensorProto, helper, numpy_helper

    by_node = {found[i].node: i for i in chosen}
    order = {i: n for n, i in enumerate(sorted(chosen))}
    nodes = []
    added = []
    for node in model.graph.node:
        index = by_node.get(node.name)
        if index is None:
            nodes.append(node)
            continue
        c, variant = found[index], chosen[index]
        target = f"{c.output}/int8" if gated else c.output
        rounded = roundings.get(c, variant.smoothing)
        channels = roundings.ranges[c.input]
        branch, tensors = quantized_nodes(c, rounded, channels, variant, target)
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


def calibration_batch(
    model_dir: Path,
    bos: int | None,
    max_context: int,
    texts: Sequence[Path] = tuple(CALIBRATION_TEXTS),
    windows: int = CALIBRATION_WINDOWS,
) -> np.ndarray:
    from tokenizers import Tokenizer

    from lmscore.export.manifest import TOKENIZER_NAME

    tokenizer = Tokenizer.from_file(str(model_dir / TOKENIZER_NAME))
    length = min(CALIBRATION_LENGTH, max_context - 1)
    prefix = [] if bos is None else [bos]
    rows = []
    for path in texts:
        text = path.read_text(encoding="utf-8")
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        rows += [prefix + ids[i * length : (i + 1) * length] for i in range(windows)]
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
    source: Path, found: Sequence[Candidate], batch: np.ndarray, rows_per_run: int = 8
) -> dict[str, ChannelRange]:
    """Per input channel min and max, and X^T X, of each candidate's input over `batch` (the
    fitting text), a few rows per run so that the inputs of every layer never are in memory
    at once for the whole batch."""
    from onnx import helper

    model = load_graph(source)
    names = list(dict.fromkeys(c.input for c in found))
    model.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    session = session_from(model, source.parent)
    low: dict[str, np.ndarray] = {}
    high: dict[str, np.ndarray] = {}
    gram: dict[str, np.ndarray] = {}
    for start in range(0, len(batch), rows_per_run):
        values = _run(session, batch[start : start + rows_per_run], names)
        for name, value in zip(names, values, strict=True):
            flat = value.reshape(-1, value.shape[-1])
            wide = flat.astype(np.float64)
            low[name] = np.minimum(low.get(name, np.inf), flat.min(axis=0))
            high[name] = np.maximum(high.get(name, -np.inf), flat.max(axis=0))
            gram[name] = gram.get(name, 0.0) + wide.T @ wide
    return {name: ChannelRange(low[name], high[name], gram[name]) for name in names}


class GatedGraph:
    """One session of the gated graph with every candidate int8 as `assignment` says."""

    def __init__(
        self,
        source: Path,
        found: Sequence[Candidate],
        assignment: dict[int, Variant],
        roundings: Roundings,
        batch: np.ndarray,
        reference: np.ndarray | None,
    ) -> None:
        model = load_graph(source)
        rewrite(model, found, assignment, roundings, gated=True)
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
        (logprobs,) = _run(self.session, self.batch, [TARGET_LOGPROBS], gates)
        return logprobs[:, :-1].astype(np.float64)

    def deviation(self, indices) -> float:
        return float(np.abs(self.logprobs(indices) - self.reference).mean())


def search(
    source: Path,
    bos: int | None,
    max_context: int,
    budget: float = BUDGET,
    per_kind: int = GROUPS_PER_KIND,
    int8_dot_product: bool | None = None,
) -> tuple[list[Candidate], Roundings, dict[int, Variant], dict[str, Any]]:
    """(candidates, the chosen ones' rounded weights, the chosen ones with their variant, what
    was measured). `int8_dot_product`: whether the CPU the variant is for has one (default:
    this one's), which decides the weights' levels."""
    if int8_dot_product is None:
        int8_dot_product = has_int8_dot_product()
    levels = WEIGHT_LEVELS_VNNI if int8_dot_product else WEIGHT_LEVELS_AVX2
    found = candidates(load_graph(source))
    batch = calibration_batch(source.parent, bos, max_context)
    fitting = calibration_batch(source.parent, bos, max_context, FIT_TEXTS, FIT_WINDOWS)
    roundings = Roundings(source, channel_ranges(source, found, fitting), levels)
    everything = range(len(found))
    kinds = list(dict.fromkeys(c.kind for c in found))

    # 1. Activation scaling per kind.
    reference = None
    by_variant: dict[str, dict[str, float]] = {}
    runs = 0
    for variant in VARIANTS:
        every = dict.fromkeys(everything, variant)
        graph = GatedGraph(source, found, every, roundings, batch, reference)
        reference = graph.reference
        by_variant[variant.name] = {
            kind: graph.deviation([i for i in everything if found[i].kind == kind])
            for kind in kinds
        }
        runs += graph.runs
        del graph
    scaling = {kind: min(VARIANTS, key=lambda v: by_variant[v.name][kind]) for kind in kinds}
    assignment = {i: scaling[found[i].kind] for i in everything}
    roundings.keep([(found[i], v.smoothing) for i, v in assignment.items()])

    # 2. Sensitivity per group, 3. the longest cheap-first prefix within the budget.
    graph = GatedGraph(source, found, assignment, roundings, batch, reference)
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
        "weight_levels": levels,
        # A variant with 8-bit weights gives wrong scores on a CPU without any of these.
        REQUIRES_KEY: list(INT8_DOT_PRODUCT_FLAGS) if levels > WEIGHT_LEVELS_AVX2 else [],
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
    roundings.keep([(found[i], v.smoothing) for i, v in chosen.items()])
    return found, roundings, chosen, details


def quantize_int8(
    source: Path, target: Path, budget: float = BUDGET, int8_dot_product: bool | None = None
) -> dict[str, Any]:
    """Search on calibration text, then write the graph with the chosen MatMuls int8, for a CPU
    with an int8 dot product or not (default: as this one)."""
    from lmscore.export.manifest import Manifest

    manifest = Manifest.read(source.parent)
    found, roundings, chosen, details = search(
        source,
        manifest.bos_token_id,
        manifest.max_context,
        budget,
        int8_dot_product=int8_dot_product,
    )
    model = load_graph(source)
    rewrite(model, found, chosen, roundings)
    save_model(model, target, weights_dir=source.parent)
    return details
