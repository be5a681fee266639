"""Tied input and output embeddings, stored and loaded once.

A model that ties its output layer to its input embedding (config.tie_word_embeddings:
SmolLM2, Gemma-3, GPT-2, OPT) computes logits = hidden @ embedding^T. As Optimum exports
it, that [vocab, hidden] matrix is held twice, one way or another:

- when Optimum recognizes the pair (SmolLM2, GPT-2, OPT) the file holds it once and the
  output MatMul reads Transpose(embedding); but ONNX Runtime's constant folding computes
  that Transpose at session start, a second copy in memory (113 MB on SmolLM2);
- when it does not (Gemma-3, whose embedding class it does not know), the file holds it
  twice: once for the Gather, once transposed as the MatMul's weight (671 MB of Gemma-3
  270M's 1.74 GB in float32).

`share_tied_embeddings` rewrites such an output MatMul as ONNX Runtime's
FusedMatMul(hidden, embedding, transB=1), the node ORT's own optimizer makes of
MatMul + Transpose, written directly so that constant folding finds no Transpose to fold,
and drops the copy. Measured on SmolLM2 (server session options): the same scores, bit for
bit; no transposed initializer in ORT's optimized graph. A MatMul weight counts as a copy
of the embedding only when it is, byte for byte, the transpose of a matrix a Gather reads:
checked on the values, never guessed from names.

Runs on the float32 graph before the float16 conversion (which then converts the one
matrix) and before the scoring head. The quantization recipes quantize MatMul nodes, so
the shared output layer, a FusedMatMul, stays in float32.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from lmscore.export.external_data import tensor_array

FUSED_MATMUL = "FusedMatMul"
MS_DOMAIN = "com.microsoft"
# Rows of the embedding compared at a time: bounds the memory of the comparison.
_COMPARE_ELEMENTS = 2**24


@dataclasses.dataclass(frozen=True)
class SharedEmbedding:
    embedding: str  # the initializer the Gather and the output layer both read
    output_node: str
    # Bytes of the duplicate dropped from the file (0: Optimum's graph read the one matrix
    # through a Transpose; without it, ONNX Runtime makes no copy in memory either).
    dropped_bytes: int


def _equal_transposed(weight: np.ndarray, embedding: np.ndarray) -> bool:
    """weight [hidden, vocab] == embedding [vocab, hidden] transposed, bit for bit."""
    if weight.shape != embedding.shape[::-1] or weight.dtype != embedding.dtype:
        return False
    bits = np.dtype(f"u{embedding.dtype.itemsize}")
    rows = max(1, _COMPARE_ELEMENTS // max(1, embedding.shape[1]))
    for start in range(0, embedding.shape[0], rows):
        part = np.asarray(embedding[start : start + rows]).view(bits)
        if not np.array_equal(np.asarray(weight[:, start : start + rows]).T.view(bits), part):
            return False
    return True


def _is_2d_transpose(node: Any) -> bool:
    perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
    return node.op_type == "Transpose" and perm in (None, [1, 0])


def share_tied_embeddings(model: Any, weights_dir: Path) -> list[SharedEmbedding]:
    """Rewrite each MatMul of `model` (an onnx.ModelProto, external tensors read from
    `weights_dir`) whose weight is the transpose of a Gather's embedding matrix to read
    that matrix itself, and drop what it read before. Returns what was shared."""
    from onnx import helper

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    embeddings = [
        initializers[node.input[0]]
        for node in graph.node
        if node.op_type == "Gather"
        and node.input[0] in initializers
        and len(initializers[node.input[0]].dims) == 2
        and all(a.i == 0 for a in node.attribute if a.name == "axis")
    ]
    producers = {name: node for node in graph.node for name in node.output}

    def shared_matrix(weight: str) -> tuple[Any, int] | None:
        """(embedding, bytes dropped) when `weight` is the transpose of an embedding."""
        producer = producers.get(weight)
        if producer is not None and _is_2d_transpose(producer):
            match = [e for e in embeddings if e.name == producer.input[0]]
            return (match[0], 0) if match else None
        tensor = initializers.get(weight)
        if tensor is None:
            return None
        for embedding in embeddings:
            if list(tensor.dims) != list(embedding.dims)[::-1]:
                continue
            array = tensor_array(tensor, weights_dir)
            if _equal_transposed(array, tensor_array(embedding, weights_dir)):
                return embedding, int(array.nbytes)
        return None

    shared: list[SharedEmbedding] = []
    replaced: set[str] = set()
    for index, node in enumerate(list(graph.node)):
        if node.op_type != "MatMul" or (found := shared_matrix(node.input[1])) is None:
            continue
        embedding, dropped = found
        fused = helper.make_node(
            FUSED_MATMUL,
            [node.input[0], embedding.name],
            list(node.output),
            name=node.name,
            domain=MS_DOMAIN,
            transB=1,
        )
        graph.node.remove(node)
        graph.node.insert(index, fused)
        replaced.add(node.input[1])
        shared.append(SharedEmbedding(embedding.name, node.name, dropped))
    if shared:
        _drop_unread(graph, replaced)
        if not any(o.domain == MS_DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return shared


def _drop_unread(graph: Any, replaced: set[str]) -> None:
    """Remove the replaced weights (an initializer, or a Transpose node and its output's
    value_info) that nothing reads any more."""
    read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    dropped = replaced - read
    for node in [n for n in graph.node if n.op_type == "Transpose" and n.output[0] in dropped]:
        graph.node.remove(node)
    for tensor in [t for t in graph.initializer if t.name in dropped]:
        graph.initializer.remove(tensor)
    for info in [v for v in graph.value_info if v.name in dropped]:
        graph.value_info.remove(info)
