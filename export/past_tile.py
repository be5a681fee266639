"""The past-tiling graph, written beside the model at export: Tile(past, [n, 1, 1, 1]) for
every key/value cache input at once.

Prefix reuse scores several completions against one prompt's cache, repeated
along the batch. Under IO binding (CUDA) the cache stays on the device, and the
server (lmscore.server.runtime) runs this graph there to repeat it, instead of
copying it to the host and back. Built with onnx.helper here, so the server
needs only to load it (it does not depend on the onnx package).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmscore.export.graph_io import PAST_PREFIX, TILE_REPEATS, tiled_name
from lmscore.export.manifest import ONNX_NAME, PAST_TILE_NAME

# ONNX Runtime 1.31 runs IR 8 / opset 13 graphs on every provider.
IR_VERSION = 8
OPSET = 13


def build_past_tile(past_inputs: list[tuple[str, int]]) -> Any:  # -> onnx.ModelProto
    """The tiling graph for rank-4 past inputs given as (name, ONNX element type)."""
    from onnx import TensorProto, helper

    def tensor(name: str, elem_type: int, prefix: str) -> Any:
        return helper.make_tensor_value_info(name, elem_type, [f"{prefix}{j}" for j in range(4)])

    graph = helper.make_graph(
        nodes=[
            helper.make_node("Tile", [name, TILE_REPEATS], [tiled_name(name)])
            for name, _ in past_inputs
        ],
        name="lmscore_past_tile",
        inputs=[tensor(name, elem, "in") for name, elem in past_inputs]
        + [helper.make_tensor_value_info(TILE_REPEATS, TensorProto.INT64, [4])],
        outputs=[tensor(tiled_name(name), elem, "out") for name, elem in past_inputs],
    )
    return helper.make_model(
        graph,
        ir_version=IR_VERSION,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="lmscore",
    )


def write_past_tile(model_dir: Path) -> Path:
    """Write PAST_TILE_NAME for the past inputs of the model in `model_dir`."""
    import onnx

    graph = onnx.load(str(model_dir / ONNX_NAME), load_external_data=False).graph
    past = [
        (i.name, i.type.tensor_type.elem_type)
        for i in graph.input
        if i.name.startswith(PAST_PREFIX)
    ]
    model = build_past_tile(past)
    onnx.checker.check_model(model, full_check=True)
    path = model_dir / PAST_TILE_NAME
    onnx.save_model(model, str(path))
    return path
