"""Quantization recipes for the exported graph (see docs/quantization.md for every one tried).

Each recipe rewrites the linear layers (MatMul nodes with a constant weight) of
a float32 export; the scoring head and everything else stay float32. A recipe may
return what it measured on the way (recorded in the manifest's `quantization`).
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from lmscore.export.external_data import load_graph, save_model, tensor_array
from lmscore.export.head import is_head_node


@dataclasses.dataclass(frozen=True)
class Recipe:
    dtype: str
    description: str
    apply: Callable[[Path, Path], dict[str, Any] | None]


def _weight_matmuls(model, excluded: tuple[str, ...] = ()) -> list[str]:  # model: onnx.ModelProto
    constants = {i.name for i in model.graph.initializer}
    return [
        n.name
        for n in model.graph.node
        if n.op_type == "MatMul"
        and n.input[1] in constants
        and not is_head_node(n)
        and not any(x in n.name for x in excluded)
    ]


def _q4_blocks(weight: np.ndarray, block: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric 4-bit per block of `block` input rows, as MatMulNBits wants it:
    w = (q - zero_point) * scale. Weights that came from a GGUF Q4_0/Q4_1 file take at most 16
    values per block on exactly this grid, so they are re-packed without loss."""
    k, n = weight.shape
    # A few output columns at a time: the float64 working copies of a whole [hidden, vocab]
    # output layer would take several GB.
    columns = max(1, 2**22 // k)
    parts = [_q4_column_blocks(weight[:, j : j + columns], block) for j in range(0, n, columns)]
    packed, scales, zero_points = (np.concatenate(p) for p in zip(*parts, strict=True))
    return packed, scales, zero_points


def _q4_column_blocks(weight: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    k, n = weight.shape
    blocks = np.asarray(weight).T.reshape(n, k // block, block).astype(np.float64)
    low, high = blocks.min(-1), blocks.max(-1)
    step = np.where(high > low, (high - low) / 15.0, 1.0)
    q = np.clip(np.rint((blocks - low[..., None]) / step[..., None]), 0, 15).astype(np.uint8)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)  # low nibble: even row
    return packed, step.astype(np.float32), (-low / step).astype(np.float32)


def _q4_exact(source: Path, target: Path) -> None:
    from onnx import helper, numpy_helper

    # One weight at a time, mapped from the data file: the float32 model is never in memory.
    model = load_graph(source)
    constants = {i.name: i for i in model.graph.initializer}
    for name in _weight_matmuls(model):
        node = next(n for n in model.graph.node if n.name == name)
        weight = tensor_array(constants[node.input[1]], source.parent)
        k, n = weight.shape
        if k % 32:
            continue  # MatMulNBits needs whole blocks; this layer stays float32
        packed, scales, zero_points = _q4_blocks(weight)
        base = node.input[1]
        tensors = [
            numpy_helper.from_array(packed, f"{base}_q4"),
            numpy_helper.from_array(scales, f"{base}_q4_scales"),
            numpy_helper.from_array(zero_points, f"{base}_q4_zero_points"),
        ]
        model.graph.initializer.extend(tensors)
        replacement = helper.make_node(
            "MatMulNBits",
            [node.input[0], *(t.name for t in tensors)],
            list(node.output),
            name=f"{node.name}_q4",
            domain="com.microsoft",
            K=k,
            N=n,
            bits=4,
            block_size=32,
        )
        position = list(model.graph.node).index(node)
        model.graph.node.remove(node)
        model.graph.node.insert(position, replacement)
    used = {name for node in model.graph.node for name in node.input}
    for tensor in [t for t in model.graph.initializer if t.name not in used]:
        model.graph.initializer.remove(tensor)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    save_model(model, target, weights_dir=source.parent)


def _int8_dynamic(source: Path, target: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # down_proj sees the activation outliers that per-tensor int8 handles worst.
    nodes = _weight_matmuls(load_graph(source), ("down_proj",))
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        quantize_dynamic(
            source,
            Path(tmp) / "q.onnx",
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul"],
            nodes_to_quantize=nodes,
            extra_options={"MatMulConstBOnly": True},
            use_external_data_format=True,  # written beside q.onnx, whatever the size
        )
        save_model(load_graph(Path(tmp) / "q.onnx"), target, weights_dir=Path(tmp))


def _int8(source: Path, target: Path) -> dict[str, Any]:
    from lmscore.export.int8 import quantize_int8

    return quantize_int8(source, target)


RECIPES: dict[str, Recipe] = {
    "q4-exact": Recipe(
        "q4 weights (MatMulNBits, block 32) + float32",
        "4-bit block-32 asymmetric weights with float zero points; exact for weights that came "
        "from a GGUF Q4 file (the default model), round-to-nearest otherwise",
        _q4_exact,
    ),
    "int8-dynamic": Recipe(
        "int8 dynamic (MatMulInteger) + float32",
        "ORT quantize_dynamic, int8 per-tensor activations, every linear layer except down_proj "
        "(the lm_head is the embedding's transpose and stays float32)",
        _int8_dynamic,
    ),
    "int8": Recipe(
        "int8 (per-channel weights, chosen MatMuls) + float32",
        "int8 MatMuls chosen by their measured deviation on calibration text (CC0-1.0, "
        "Artistic) within a budget; per-channel weights rounded by GPTQ (8-bit with an int8 dot "
        "product, 7-bit without), uint8 activations with the scaling measured best per kind of "
        "layer (lmscore.export.int8)",
        _int8,
    ),
}


def apply_recipe(source: Path, target: Path, recipe: str) -> dict[str, Any]:
    """Write `recipe`'s graph for `source` to `target`; what it measured on the way."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; known: {', '.join(RECIPES)}")
    return RECIPES[recipe].apply(source, target) or {}
