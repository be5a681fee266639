"""ONNX Runtime session over an exported model: token ids in, per-token scores out.

The graph carries lmscore's scoring head (lmscore.export.head), so a run
returns log-probs, ranks and top-k of the target ids, never the logits.

On CUDA every run goes through an IO binding: the inputs are bound from host
arrays, the scoring outputs ([batch, seq] and [batch, seq, top_k]) are bound to
host memory, and the key/value cache a prefix pass returns (`return_present`)
stays on the GPU as DeviceArray values. Prefix reuse (ScoringEngine) np.repeat's
that cache along the batch for the continuations: DeviceArray.repeat records the
count, and the next run tiles the cache on the GPU (one small ONNX Runtime
graph of Tile nodes) and binds it there, so the cache never crosses PCIe.
Anything else done to a DeviceArray (np.asarray, indexing, other numpy
functions) copies it to the host first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime as ort

from lmscore.export.graph_io import PAST_PREFIX, PRESENT_PREFIX, model_feeds, past_name_for
from lmscore.export.head import HEAD_OUTPUTS
from lmscore.export.manifest import ONNX_NAME, ManifestError

Device = Literal["auto", "cpu", "cuda"]
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

log = logging.getLogger(__name__)


class DeviceError(RuntimeError):
    """The requested execution provider did not load."""


class ModelLoadError(RuntimeError):
    """ONNX Runtime could not load the graph (corrupt or truncated file, unsupported op)."""


@dataclasses.dataclass(frozen=True)
class BatchScores:
    """Scores of target_ids[b, t] under the logits at [b, t]."""

    logprobs: np.ndarray  # float32 [batch, seq]
    ranks: np.ndarray  # int64 [batch, seq]
    top_logprobs: np.ndarray  # float32 [batch, seq, top_k]
    top_ids: np.ndarray  # int64 [batch, seq, top_k]


PastKeyValues = Mapping[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class RuntimeOptions:
    device: Device = "auto"
    # 0 lets ONNX Runtime use one thread per physical core.
    intra_op_threads: int = 0
    # ORT's CPU arena keeps the peak of every batch shape forever (onnxruntime #11627);
    # without it memory goes back after each run, for a few percent of speed.
    cpu_arena: bool = False
    # Where the ORT-optimized graph is cached between starts (CPU only); None: no cache.
    optimized_cache_dir: Path | None = None
    # Run through session.io_binding() (outputs to host, key/value cache left on the device).
    # None: on CUDA only; True forces it on CPU too (the tests hold it to the plain path).
    io_binding: bool | None = None


def session_options(options: RuntimeOptions) -> ort.SessionOptions:
    session = ort.SessionOptions()
    session.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if options.intra_op_threads > 0:
        session.intra_op_num_threads = options.intra_op_threads
    # One run at a time per session (the engine serialises them), so no inter-op pool.
    session.inter_op_num_threads = 1
    session.enable_cpu_mem_arena = options.cpu_arena
    # Pre-packed weight copies cost ~300 MB on the default model and no measurable speed.
    session.add_session_config_entry("session.disable_prepacking", "1")
    return session


def _cpu_identity() -> str:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    names = [line for line in cpuinfo.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(names)))


def optimized_graph_path(cache_dir: Path, model_path: Path) -> Path:
    """A cached optimized graph is valid only for the same graph file, ORT version and CPU.
    The name starts with a digest of the graph's path, so stale versions can be found."""
    stat = model_path.stat()
    where = hashlib.sha256(str(model_path.resolve()).encode()).hexdigest()[:16]
    what = "|".join(
        [
            str(stat.st_size),
            str(stat.st_mtime_ns),
            ort.__version__,
            platform.machine(),
            _cpu_identity(),
        ]
    )
    return cache_dir / f"{where}-{hashlib.sha256(what.encode()).hexdigest()[:16]}.onnx"


def _create_session(
    model_path: Path, options: RuntimeOptions, providers: list[str]
) -> ort.InferenceSession:
    session = session_options(options)
    if options.optimized_cache_dir is None or CUDA in providers:
        return ort.InferenceSession(str(model_path), sess_options=session, providers=providers)
    cached = optimized_graph_path(options.optimized_cache_dir, model_path)
    if cached.is_file():
        session.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        log.info("loading the cached optimized graph %s", cached)
        return ort.InferenceSession(str(cached), sess_options=session, providers=providers)
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_suffix(f".{os.getpid()}.partial")
    session.optimized_model_filepath = str(partial)
    created = ort.InferenceSession(str(model_path), sess_options=session, providers=providers)
    partial.replace(cached)
    prefix = cached.name.split("-")[0]
    for stale in cached.parent.glob(f"{prefix}-*.onnx"):
        if stale != cached:  # an older export of the same path
            stale.unlink(missing_ok=True)
    log.info("cached the optimized graph at %s", cached)
    return created


class DeviceArray:
    """A key/value cache tensor left where ONNX Runtime wrote it (GPU memory under CUDA).

    What OnnxCausalLM.score returns as `present` under IO binding, and takes back as
    `past`. np.repeat(value, n, axis=0) of a batch-1 value stays on the device (the
    tiling runs inside the next score call); any other use copies it to the host.
    """

    def __init__(self, value: ort.OrtValue, repeats: int = 1) -> None:
        self.value = value
        self.repeats = repeats

    @property
    def shape(self) -> tuple[int, ...]:
        batch, *rest = self.value.shape()
        return (batch * self.repeats, *rest)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float16 if self.value.data_type() == "tensor(float16)" else np.float32)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def device(self) -> str:
        return str(self.value.device_name()).lower()

    def numpy(self) -> np.ndarray:
        """Copy to the host (repeated along the batch if repeat() was called)."""
        host = self.value.numpy()
        return host if self.repeats == 1 else np.repeat(host, self.repeats, axis=0)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        host = self.numpy()
        return host if dtype is None else host.astype(dtype, copy=False)

    def __getitem__(self, key: Any) -> np.ndarray:
        return self.numpy()[key]

    def repeat(self, repeats: Any, axis: int | None = None) -> DeviceArray | np.ndarray:
        # np.repeat of a single row along the batch == Tile: stays on the device.
        count = int(repeats) if isinstance(repeats, int | np.integer) else 0
        if self.value.shape()[0] == 1 and axis in (0, -self.ndim) and count >= 1:
            return DeviceArray(self.value, self.repeats * count)
        return np.repeat(self.numpy(), repeats, axis=axis)

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        if func is np.repeat and args and args[0] is self:
            return self.repeat(*args[1:], **kwargs)
        return func(*_to_host(args), **_to_host(kwargs))


def _to_host(value: Any) -> Any:
    """`value` with every DeviceArray in it (through lists, tuples, dicts) copied to the host."""
    if isinstance(value, DeviceArray):
        return value.numpy()
    if isinstance(value, list | tuple):
        return type(value)(_to_host(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_host(v) for k, v in value.items()}
    return value


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes | str | int) -> bytes:
    """One protobuf field: a varint, or a length-delimited string or message."""
    if isinstance(payload, int):
        return _varint(number << 3) + _varint(payload)
    data = payload.encode() if isinstance(payload, str) else payload
    return _varint(number << 3 | 2) + _varint(len(data)) + data


# ONNX TensorProto.DataType of the float types a key/value cache has.
_ONNX_ELEM = {"tensor(float)": 1, "tensor(float16)": 10}


def tile_model_bytes(elem_types: Sequence[int]) -> bytes:
    """A serialized ONNX ModelProto (IR 8, opset 13): y{i} = Tile(x{i}, repeats) for rank-4
    inputs x{i} of the given element types. Encoded by hand, field numbers from onnx.proto,
    because the server does not depend on the onnx package."""

    def dims(prefix: str) -> bytes:  # TensorShapeProto of 4 named dimensions (dim_param)
        return b"".join(_field(1, _field(2, f"{prefix}{j}")) for j in range(4))

    def value_info(name: str, elem: int, shape: bytes) -> bytes:
        tensor = _field(1, elem) + _field(2, shape)  # TypeProto.Tensor: elem_type, shape
        return _field(1, name) + _field(2, _field(1, tensor))  # name, TypeProto.tensor_type

    graph = b"".join(
        _field(
            1, _field(1, f"x{i}") + _field(1, "repeats") + _field(2, f"y{i}") + _field(4, "Tile")
        )
        for i in range(len(elem_types))
    )
    graph += _field(2, "lmscore_tile_past")
    graph += b"".join(
        _field(11, value_info(f"x{i}", e, dims("in"))) for i, e in enumerate(elem_types)
    )
    graph += _field(11, value_info("repeats", 7, _field(1, _field(1, 4))))  # int64 [4]
    graph += b"".join(
        _field(12, value_info(f"y{i}", e, dims("out"))) for i, e in enumerate(elem_types)
    )
    opset = _field(1, "") + _field(2, 13)
    return _field(1, 8) + _field(2, "lmscore") + _field(7, graph) + _field(8, opset)


class _DeviceTiler:
    """Tile(past, [n, 1, 1, 1]) for every past input in one run, output left on the device."""

    def __init__(
        self, past_inputs: Sequence[Any], providers: list[str], device: tuple[str, int]
    ) -> None:
        self.names = [i.name for i in past_inputs]
        options = ort.SessionOptions()
        options.inter_op_num_threads = 1
        model = tile_model_bytes([_ONNX_ELEM[i.type] for i in past_inputs])
        self.session = ort.InferenceSession(model, sess_options=options, providers=providers)
        self.device = device

    def tile(self, past: Mapping[str, DeviceArray], repeats: int) -> dict[str, ort.OrtValue]:
        binding = self.session.io_binding()
        for i, name in enumerate(self.names):
            binding.bind_ortvalue_input(f"x{i}", past[name].value)
            binding.bind_output(f"y{i}", *self.device)
        binding.bind_cpu_input("repeats", np.array([repeats, 1, 1, 1], dtype=np.int64))
        self.session.run_with_iobinding(binding)
        return dict(zip(self.names, binding.get_outputs(), strict=True))


class OnnxCausalLM:
    """Runs the exported graph on right-padded batches, with an empty or a given past."""

    def __init__(self, model_dir: Path, options: RuntimeOptions | None = None) -> None:
        options = options or RuntimeOptions()
        device = options.device
        path = model_dir / ONNX_NAME
        want_cuda = device == "cuda" or (device == "auto" and CUDA in ort.get_available_providers())
        providers = [CUDA, CPU] if want_cuda else [CPU]
        try:
            self.session = _create_session(path, options, providers)
        except Exception as exc:
            # ORT's own exceptions (InvalidProtobuf, NoSuchFile, Fail) are plain Exceptions.
            if not type(exc).__module__.startswith("onnxruntime"):
                raise
            first_line = (
                str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            )
            raise ModelLoadError(f"cannot load {path}: {first_line}") from None
        # ORT lists CUDA as available even without CUDA libraries, then silently
        # falls back to CPU: trust only what the session reports.
        self.providers: list[str] = list(self.session.get_providers())
        if device == "cuda" and CUDA not in self.providers:
            raise DeviceError(
                "--device cuda: CUDAExecutionProvider did not load "
                f"(session providers: {', '.join(self.providers)}); install lmscore[gpu] "
                "with CUDA 13 and cuDNN 9, or use --device cpu"
            )
        if device == "auto" and want_cuda and CUDA not in self.providers:
            log.warning("CUDA is listed but did not load; running on CPU")
        log.info("execution providers: %s", ", ".join(self.providers))
        self._inputs = self.session.get_inputs()
        self.float16 = any(i.type == "tensor(float16)" for i in self._inputs)
        if self.float16 and self.device == "cpu":
            log.warning(
                "%s is a float16 export, made for --device cuda: ONNX Runtime's CPU provider "
                "runs it through inserted Casts, no faster than the float32 export and less "
                "exact; on CPU serve the float32 export",
                model_dir,
            )
        outputs = {o.name: o for o in self.session.get_outputs()}
        missing = [name for name in HEAD_OUTPUTS if name not in outputs]
        if missing:
            raise ManifestError(
                f"{model_dir} lacks the scoring head outputs {missing}; export again"
            )
        self._present = [name for name in outputs if name.startswith(PRESENT_PREFIX)]
        # IO binding: on CUDA unless told otherwise; where outputs and the cache live.
        self.io_binding = (
            options.io_binding if options.io_binding is not None else self.device == "cuda"
        )
        self._bind_device = (
            ("cuda", int(self.session.get_provider_options()[CUDA].get("device_id", 0)))
            if self.device == "cuda"
            else ("cpu", 0)
        )
        self._tiler: _DeviceTiler | None = None
        # Counters for checks and metrics: runs through the IO binding, past caches tiled
        # on the device, and past tensors that had to come from the host.
        self.io_binding_runs = 0
        self.device_past_tiles = 0
        self.host_past_tensors = 0

    @property
    def device(self) -> str:
        return "cuda" if CUDA in self.providers else "cpu"

    def score(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        target_ids: np.ndarray,
        top_k: int = 0,
        past: PastKeyValues | None = None,
        return_present: bool = False,
    ) -> tuple[BatchScores, dict[str, np.ndarray] | None]:
        """Score ``target_ids`` [batch, seq] at each position of right-padded ``input_ids``.

        ``attention_mask`` covers past + new tokens. With ``return_present`` the
        key/value cache of past + new tokens comes back, keyed by past input name.
        """
        feeds = model_feeds(
            self._inputs,
            input_ids,
            attention_mask,
            past=past,
            target_ids=target_ids,
            top_k=top_k,
        )
        wanted = ["target_logprobs", "target_ranks"]
        if top_k > 0:
            wanted += ["top_logprobs", "top_ids"]
        values: dict[str, Any]
        if self.io_binding:
            values = self._run_bound(feeds, wanted, self._present if return_present else [])
        else:
            if return_present:
                wanted += self._present
            values = dict(zip(wanted, self.session.run(wanted, feeds), strict=True))
        batch, seq = input_ids.shape
        scores = BatchScores(
            logprobs=values["target_logprobs"],
            ranks=values["target_ranks"],
            top_logprobs=values.get("top_logprobs", np.zeros((batch, seq, 0), np.float32)),
            top_ids=values.get("top_ids", np.zeros((batch, seq, 0), np.int64)),
        )
        present = (
            {past_name_for(name): values[name] for name in self._present}
            if return_present
            else None
        )
        return scores, present

    def _run_bound(
        self, feeds: Mapping[str, Any], scoring: list[str], present: list[str]
    ) -> dict[str, Any]:
        """One run through an IO binding: scoring outputs to host numpy arrays, `present`
        outputs as DeviceArray values left on the device."""
        binding = self.session.io_binding()
        device_past = {n: v for n, v in feeds.items() if isinstance(v, DeviceArray)}
        bound_past = self._device_past(device_past)
        for name, value in feeds.items():
            if name in bound_past:
                binding.bind_ortvalue_input(name, bound_past[name])
            else:
                if name in device_past:  # could not stay on the device
                    self.host_past_tensors += 1
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in scoring:
            binding.bind_output(name, "cpu")
        for name in present:
            binding.bind_output(name, *self._bind_device)
        self.session.run_with_iobinding(binding)
        self.io_binding_runs += 1
        outputs = binding.get_outputs()
        values: dict[str, Any] = {
            name: value.numpy() for name, value in zip(scoring, outputs, strict=False)
        }
        values.update(
            {name: DeviceArray(v) for name, v in zip(present, outputs[len(scoring) :], strict=True)}
        )
        return values

    def _device_past(self, past: Mapping[str, DeviceArray]) -> dict[str, ort.OrtValue]:
        """The DeviceArray past values that can be bound where they are: all of them, when
        they are on this session's device, with one repeat count (tiled here in one run)."""
        names = [i.name for i in self._inputs if i.name.startswith(PAST_PREFIX)]
        if not past or sorted(past) != sorted(names):
            return {}
        if any(v.device != self._bind_device[0] for v in past.values()):
            return {}
        repeats = {v.repeats for v in past.values()}
        if len(repeats) != 1:
            return {}
        (count,) = repeats
        if count == 1:
            return {name: value.value for name, value in past.items()}
        if self._tiler is None:
            past_inputs = [i for i in self._inputs if i.name.startswith(PAST_PREFIX)]
            self._tiler = _DeviceTiler(past_inputs, self.providers, self._bind_device)
        self.device_past_tiles += 1
        return self._tiler.tile(past, count)
