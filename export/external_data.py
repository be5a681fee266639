"""The exported graph on disk: `model.onnx` (the graph) + `model.onnx_data` (its weights), read
and written without ever building one protobuf over 2 GB.

A protobuf cannot exceed 2 GB, so a model with more weights than that (every 1B+ model in
float32) can be neither serialized whole nor checked in memory. Every export therefore
keeps each tensor of EXTERNAL_MIN_BYTES or more in the data file beside the graph, whatever
the model's size: one layout, which the tiny test models exercise as the big ones need it.
ONNX Runtime maps that file into memory instead of reading the weights into its heap: the
session starts sooner, and its weights are file pages shared by every server process on
the machine (docs/design.md, "The export's files").

The export steps use:
- `load_graph`: the graph, with external tensors left where they are (their data is not
  read): for edits that only add or rewire nodes;
- `tensor_array`: one tensor's values, memory-mapped from the data file;
- `save_graph`: rewrite the graph file only (the weights are unchanged);
- `save_model`: rewrite both files (weights added, dropped, or converted on the way as a
  `Recast` says), one tensor at a time, checked by path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

# Smaller tensors (shapes, scalars, norm weights of tiny models) stay in the graph file.
EXTERNAL_MIN_BYTES = 1024
# Each tensor starts at a multiple of this in the data file, so it can be mapped as is.
ALIGNMENT = 4096
_COPY_CHUNK = 64 * 2**20


def load_graph(onnx_path: Path) -> Any:  # -> onnx.ModelProto
    """The model at `onnx_path` without the data of its external tensors."""
    import onnx

    return onnx.load(str(onnx_path), load_external_data=False)


def _tensors(graph: Any) -> Iterator[Any]:
    """Every TensorProto of a graph: initializers and node attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _tensors(subgraph)


def _external_location(tensor: Any) -> tuple[str, int, int | None] | None:
    """(file, offset, length) of a tensor stored outside the graph, or None."""
    from onnx import TensorProto

    if tensor.data_location != TensorProto.EXTERNAL:
        return None
    entries = {entry.key: entry.value for entry in tensor.external_data}
    offset, length = int(entries.get("offset", 0)), entries.get("length")
    return entries["location"], offset, None if length is None else int(length)


def tensor_array(tensor: Any, weights_dir: Path) -> np.ndarray:
    """The values of `tensor`, read-only: memory-mapped when it lives in a data file in
    `weights_dir`, so comparing or quantizing a 1 GB matrix does not read it all at once."""
    from onnx import helper, numpy_helper

    location = _external_location(tensor)
    if location is None:
        return numpy_helper.to_array(tensor)
    name, offset, _ = location
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    shape = tuple(int(d) for d in tensor.dims)
    return np.memmap(weights_dir / name, dtype=dtype, mode="r", offset=offset, shape=shape)


def _check_path(onnx_path: Path) -> None:
    import onnx

    # By path: the only way to check a model whose weights exceed 2 GB.
    onnx.checker.check_model(str(onnx_path))


def save_graph(model: Any, onnx_path: Path) -> None:
    """Rewrite the graph file at `onnx_path` with `model` (from `load_graph`, with nodes and
    small tensors changed): its external tensors keep pointing into the data file beside
    it, which is left untouched, so a server that has it mapped keeps running."""
    import onnx

    staged = onnx_path.with_name(f".{onnx_path.name}.{os.getpid()}.tmp")
    try:
        onnx.save_model(model, str(staged))
        _check_path(staged)
        staged.replace(onnx_path)
    finally:
        staged.unlink(missing_ok=True)


def _copy_range(source: BinaryIO, offset: int, length: int | None, target: BinaryIO) -> None:
    source.seek(offset)
    remaining = length
    while remaining is None or remaining > 0:
        chunk = source.read(_COPY_CHUNK if remaining is None else min(_COPY_CHUNK, remaining))
        if not chunk:
            if remaining:
                raise ValueError(f"{source.name} ends {remaining} bytes early")
            break
        target.write(chunk)
        if remaining is not None:
            remaining -= len(chunk)


@dataclasses.dataclass(frozen=True)
class Recast:
    """A tensor's values as stored (`stored`) and the function that converts a 1-D chunk
    of them to the values to write (e.g. float32 -> float16)."""

    stored: type[np.generic]
    convert: Callable[[np.ndarray], np.ndarray]


def _recast_range(path: Path, offset: int, count: int, recast: Recast, target: BinaryIO) -> None:
    values = np.memmap(path, dtype=recast.stored, mode="r", offset=offset, shape=(count,))
    step = _COPY_CHUNK // values.itemsize
    for start in range(0, count, step):
        target.write(np.ascontiguousarray(recast.convert(values[start : start + step])).tobytes())


def _data_file(onnx_path: Path) -> Path:
    # Optimum's name for it; for model.onnx that is manifest.ONNX_DATA_NAME.
    return onnx_path.with_name(f"{onnx_path.name}_data")


def save_model(
    model: Any,
    onnx_path: Path,
    weights_dir: Path | None = None,
    recast: Mapping[str, Recast] | None = None,
) -> None:
    """Write `model` as `onnx_path` + its data file, replacing both.

    Each tensor of EXTERNAL_MIN_BYTES or more goes to the data file at an aligned offset:
    from memory, or copied from the file it already lives in (relative to `weights_dir`,
    by default the directory of `onnx_path`); `recast` names external tensors whose values
    are converted on the way, a chunk at a time (the TensorProto already has the new
    type). Both files are written under temporary names and renamed into place, so the old
    data file is never modified in place (a running server may have it mapped); data files
    beside it that only the old graph read are removed.
    """
    import onnx

    directory = onnx_path.parent
    weights_dir = directory if weights_dir is None else weights_dir
    recast = recast or {}
    data_path = _data_file(onnx_path)
    read_from: set[Path] = set()
    with (
        tempfile.TemporaryDirectory(prefix=f".{onnx_path.name}.", dir=directory) as tmp,
        contextlib.ExitStack() as open_files,
    ):
        staged_graph, staged_data = Path(tmp) / onnx_path.name, Path(tmp) / data_path.name
        sources: dict[Path, BinaryIO] = {}
        with staged_data.open("wb") as data:
            for tensor in _tensors(model.graph):
                location = _external_location(tensor)
                if location is None and not (
                    tensor.HasField("raw_data") and tensor.ByteSize() >= EXTERNAL_MIN_BYTES
                ):
                    continue
                data.write(b"\0" * (-data.tell() % ALIGNMENT))
                offset = data.tell()
                if location is None:
                    data.write(tensor.raw_data)
                    tensor.ClearField("raw_data")
                else:
                    path = weights_dir / location[0]
                    read_from.add(path)
                    if tensor.name in recast:
                        count = int(np.prod(tensor.dims, dtype=np.int64))
                        _recast_range(path, location[1], count, recast[tensor.name], data)
                    else:
                        if path not in sources:
                            sources[path] = open_files.enter_context(path.open("rb"))
                        _copy_range(sources[path], location[1], location[2], data)
                _set_location(tensor, data_path.name, offset, data.tell() - offset)
            has_data = data.tell() > 0
        onnx.save_model(model, str(staged_graph))
        _check_path(staged_graph)
        if has_data:
            staged_data.replace(data_path)
        else:
            data_path.unlink(missing_ok=True)
        staged_graph.replace(onnx_path)
    for stale in read_from - {data_path}:
        if stale.parent.resolve() == directory.resolve():
            stale.unlink(missing_ok=True)  # e.g. one file per tensor, as torch.onnx writes them


def _set_location(tensor: Any, location: str, offset: int, length: int) -> None:
    from onnx import TensorProto

    del tensor.external_data[:]
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, str(value)
