"""Half-precision variant of the export (`lmscore export --dtype fp16`), for CUDA.

Optimum exports float16 only on a CUDA device, so the float32 graph (Optimum's,
before the scoring head) is converted with ONNX Runtime's float16 converter:
weights, activations, `past_key_values.*` inputs and `present.*` outputs become
float16 (the key/value cache takes half the memory and half the copies); the
integer inputs are untouched. Kept float32, as transformers itself keeps them
when it runs a model in float16:

- the rotary angles (every node feeding a Cos or Sin): positions above 2048 are
  not even integers in float16, and cos/sin of a rounded angle is wrong;
- the statistics of every RMS norm (Pow -> ReduceMean -> Add -> Sqrt -> Div and
  the Mul that applies them): x**2 overflows float16 once |x| > 256, and
  SmolLM2-135M's residual stream reaches |x| = 24912.

The converter rounds the output of every node it leaves in float32 back to
float16 and casts it up again for the next one; those Cast pairs are removed
(and the Casts to float32 transformers wrote, which the conversion turns into
float16 -> float16), so each kept region runs end to end in float32 with one
Cast in and one out.

Converting before the scoring head is added (rather than converting the whole
graph and blocking the head's ops) leaves the head exactly as for float32:
lmscore.export.head sees float16 logits and puts one Cast to float32 in front of
all its arithmetic (log-sum-exp, ranks, TopK, GatherElements).

Against PyTorch float32 on the same weights, the float16 graph deviates less than
PyTorch's own float16 run, and far less than a conversion that keeps nothing in
float32 (docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

DTYPE_FLOAT16 = "float16"
# `lmscore export --dtype` -> the manifest's dtype.
DTYPES = {"fp32": "float32", "fp16": DTYPE_FLOAT16}
# Default validation tolerance per dtype: max |log p_ORT - log p_PyTorch float32| per token
# on the validation text (lmscore.export.validate). float16: a few times the worst token
# measured on held-out text, and well below a broken conversion (the rotary angles in
# float16); both figures in docs/benchmarks.md.
MAX_VALIDATION_DIFF = {"float32": 1e-3, DTYPE_FLOAT16: 0.25}

_NORM_CHAIN = ("Add", "Sqrt", "Div", "Reciprocal")


def variant_name(name: str, dtype: str) -> str:
    """The export's name and default directory name: NAME for float32, NAME-fp16 for float16."""
    return name if dtype == "float32" else f"{name}-fp16"


def _producers(graph: Any) -> dict[str, Any]:
    return {output: node for node in graph.node for output in node.output}


def _consumers(graph: Any) -> dict[str, list[Any]]:
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def rotary_nodes(graph: Any) -> set[str]:
    """Cos and Sin nodes and everything that feeds them (the rotary angle computation), up
    to the Shape nodes: a shape does not depend on the values it is taken of (Gemma-3 takes
    the positions from the embeddings' shape, and its embedding stayed float32)."""
    producers = _producers(graph)
    stack = [node for node in graph.node if node.op_type in ("Cos", "Sin")]
    seen: set[str] = set()
    while stack:
        node = stack.pop()
        if node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type != "Shape":
            stack += [producers[name] for name in node.input if name in producers]
    return seen


def norm_nodes(graph: Any) -> set[str]:
    """RMS-norm statistics: Pow(x, 2) -> ReduceMean -> [Add eps] -> [Sqrt] -> [Div|Reciprocal]
    and the Mul that scales x by them."""
    producers, consumers = _producers(graph), _consumers(graph)
    found: set[str] = set()
    for node in graph.node:
        if node.op_type != "ReduceMean":
            continue
        power = producers.get(node.input[0])
        if power is None or power.op_type != "Pow":
            continue
        found |= {power.name, node.name}
        last = node
        while True:
            following = consumers.get(last.output[0], [])
            if len(following) != 1 or following[0].op_type not in _NORM_CHAIN:
                break
            last = following[0]
            found.add(last.name)
        found |= {m.name for m in consumers.get(last.output[0], []) if m.op_type == "Mul"}
    return found


def float32_nodes(graph: Any) -> set[str]:
    """The nodes the float16 graph keeps in float32 (see the module docstring), with the
    Constant nodes that feed only them (the converter would round those to float16)."""
    kept = rotary_nodes(graph) | norm_nodes(graph)
    consumers = _consumers(graph)
    for node in graph.node:
        readers = consumers.get(node.output[0], []) if node.output else []
        if node.op_type == "Constant" and readers and all(r.name in kept for r in readers):
            kept.add(node.name)
    return kept


def _tidy_casts(model: Any) -> int:
    """Drop the Casts that only round: a Cast to the type its input already has (transformers'
    `.to(float32)` of the float32 export, float16 -> float16 once converted), and, where
    Cast(float -> float16) feeds Cast(float16 -> float), the second (its readers read the float
    tensor) and the first too when nothing else reads it. Returns how many Casts were removed."""
    import onnx
    from onnx import TensorProto

    graph = model.graph
    inferred = onnx.shape_inference.infer_shapes(model).graph
    types = {
        v.name: v.type.tensor_type.elem_type
        for v in [*inferred.value_info, *inferred.input, *inferred.output]
    }
    types.update({t.name: t.data_type for t in graph.initializer})
    outputs = {o.name for o in graph.output}
    nodes = list(graph.node)
    dropped: set[int] = set()  # indices into nodes

    def cast_to(index: int) -> int | None:
        node = nodes[index]
        if node.op_type != "Cast" or index in dropped:
            return None
        return next((a.i for a in node.attribute if a.name == "to"), None)

    def bypass(index: int, source: str) -> None:
        output = nodes[index].output[0]
        for reader in nodes:
            for i, name in enumerate(reader.input):
                if name == output:
                    reader.input[i] = source
        dropped.add(index)

    for index, node in enumerate(nodes):
        target = cast_to(index)
        no_op = target is not None and target == types.get(node.input[0])
        if no_op and node.output[0] not in outputs:
            bypass(index, node.input[0])
    consumers: dict[str, list[int]] = {}
    for index, node in enumerate(nodes):
        for name in node.input:
            consumers.setdefault(name, []).append(index)
    for index, down in enumerate(nodes):
        source = down.input[0] if down.input else ""
        if cast_to(index) != TensorProto.FLOAT16 or types.get(source) != TensorProto.FLOAT:
            continue
        for up in consumers.get(down.output[0], []):
            if cast_to(up) == TensorProto.FLOAT and nodes[up].output[0] not in outputs:
                bypass(up, source)
        readers = [r for r in consumers.get(down.output[0], []) if r not in dropped]
        if not readers and down.output[0] not in outputs:
            dropped.add(index)
    del graph.node[:]
    graph.node.extend(n for i, n in enumerate(nodes) if i not in dropped)
    names = {name for node in graph.node for name in node.output}
    live = [v for v in graph.value_info if v.name in names]
    del graph.value_info[:]
    graph.value_info.extend(live)
    return len(dropped)


def _topological_sort(graph: Any) -> None:
    """Order the nodes so each comes after the producers of its inputs (the converter
    appends the Casts it inserts at the end)."""
    nodes = list(graph.node)
    producer = {name: i for i, node in enumerate(nodes) for name in node.output}
    waiting = [0] * len(nodes)
    readers: dict[int, list[int]] = {}
    for i, node in enumerate(nodes):
        for before in {producer[name] for name in node.input if name in producer}:
            waiting[i] += 1
            readers.setdefault(before, []).append(i)
    ready = [i for i, count in enumerate(waiting) if count == 0]
    ordered = []
    while ready:
        i = ready.pop(0)
        ordered.append(i)
        for after in readers.get(i, []):
            waiting[after] -= 1
            if waiting[after] == 0:
                ready.append(after)
    if len(ordered) != len(nodes):
        raise ValueError("the float16 graph has a cycle")
    del graph.node[:]
    graph.node.extend(nodes[i] for i in ordered)


def _stand_ins(graph: Any) -> dict[str, Any]:
    """Swap each float32 weight kept in the data file for a one-element stand-in, so that
    the converter decides its type from the nodes that read it without loading it (and
    without its float64 temporaries, several times the size of the largest weight).
    Returns the weights swapped out, by name."""
    from onnx import TensorProto, helper

    weights = {}
    for tensor in graph.initializer:
        if tensor.data_type == TensorProto.FLOAT and tensor.data_location == TensorProto.EXTERNAL:
            weights[tensor.name] = TensorProto()
            weights[tensor.name].CopyFrom(tensor)
            tensor.CopyFrom(helper.make_tensor(tensor.name, TensorProto.FLOAT, [1], [0.0]))
    return weights


def _restore(graph: Any, weights: dict[str, Any]) -> list[str]:
    """Put the weights back in place of their stand-ins, typed float16 where the converter
    made the stand-in float16 (their values are converted as they are saved); returns
    those. The stand-ins' shapes ([1]) the converter copied into value_info are dropped
    (value_info is only a hint)."""
    from onnx import TensorProto

    halved = []
    for tensor in graph.initializer:
        if tensor.name in weights:
            halved_type = tensor.data_type
            tensor.CopyFrom(weights[tensor.name])
            if halved_type == TensorProto.FLOAT16:
                tensor.data_type = TensorProto.FLOAT16
                halved.append(tensor.name)
    casts = {n.output[0] for n in graph.node if n.op_type == "Cast" and n.input[0] in weights}
    hints = [v for v in graph.value_info if v.name not in weights and v.name not in casts]
    del graph.value_info[:]
    graph.value_info.extend(hints)
    return halved


def convert_to_float16(onnx_path: Path, keep_float32: Iterable[str] | None = None) -> None:
    """Rewrite Optimum's float32 graph at `onnx_path` (no scoring head yet) in float16.

    The graph is converted without its weights (shape inference serializes the model,
    which cannot exceed 2 GB); the weights in the data file are converted as they are
    written, a chunk at a time, by the converter's own rounding."""
    import numpy as np
    import onnx
    from onnxruntime.transformers.float16 import (
        DEFAULT_OP_BLOCK_LIST,
        convert_float_to_float16,
        convert_np_to_float16,
    )

    from lmscore.export.external_data import Recast, load_graph, save_model
    from lmscore.export.graph_io import PRESENT_PREFIX
    from lmscore.export.head import LOGITS

    model = onnx.shape_inference.infer_shapes(load_graph(onnx_path))
    if any(o.name != LOGITS and not o.name.startswith(PRESENT_PREFIX) for o in model.graph.output):
        raise ValueError(f"{onnx_path}: convert before the scoring head is added")
    blocked = float32_nodes(model.graph) if keep_float32 is None else set(keep_float32)
    weights = _stand_ins(model.graph)
    half = convert_float_to_float16(
        model,
        keep_io_types=False,
        disable_shape_infer=True,
        op_block_list=list(DEFAULT_OP_BLOCK_LIST),
        node_block_list=sorted(blocked),
    )
    to_half = Recast(np.float32, convert_np_to_float16)
    recast = dict.fromkeys(_restore(half.graph, weights), to_half)
    _tidy_casts(half)
    _topological_sort(half.graph)  # the converter appends the Casts it inserts
    save_model(half, onnx_path, recast=recast)
