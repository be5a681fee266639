"""ONNX Runtime session over an exported model: token ids in, per-token scores out.

The graph carries lmscore's scoring head (lmscore.export.head), so a run
returns log-probs, ranks and top-k of the target ids, never the logits.

A run may start from the key/value cache (`present`) of an earlier run, with
`past_repeats`: each cache row then stands for that many consecutive rows of the
batch (a prompt's batch-1 cache shared by all its completions).

Every run goes through an IO binding (unless RuntimeOptions.io_binding is off):
the inputs are bound from host arrays, the scoring outputs ([batch, seq] and
[batch, seq, top_k]) are bound to host memory, and `present` stays where ORT
wrote it, as OrtValues (on the GPU under CUDA; on CPU, uncopied). A batch-1 cache given
back with past_repeats > 1 is repeated there by the export's past-tiling graph
(lmscore.export.past_tile), so the cache never crosses PCIe; an export without
that graph repeats it on the host (counted in host_past_tensors).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from lmscore.export.graph_io import (
    PAST_PREFIX,
    PRESENT_PREFIX,
    TILE_REPEATS,
    model_feeds,
    past_name_for,
    tiled_name,
)
from lmscore.export.head import (
    ENTROPY_OUTPUT,
    GATHERED_OUTPUT,
    HEAD_OUTPUTS,
    TARGET_LOGPROBS,
    TARGET_RANKS,
    TOP_IDS,
    TOP_LOGPROBS,
    WORD_START_OUTPUT,
)
from lmscore.export.manifest import ONNX_DATA_NAME, ONNX_NAME, PAST_TILE_NAME, ManifestError
from lmscore.server.config import RuntimeOptions
from lmscore.server.scoring import BatchScores

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
# Run option: free the listed arenas' unused regions at the end of the run.
ARENA_SHRINKAGE = "memory.enable_memory_arena_shrinkage"

log = logging.getLogger(__name__)

# A key/value cache tensor: a host array, or an OrtValue where ORT wrote it (under IO binding).
PastValue = np.ndarray | ort.OrtValue
# A whole key/value cache as ONNX Runtime gives it back, by past input name.
OrtCache = dict[str, PastValue]


class DeviceError(RuntimeError):
    """The requested execution provider did not load."""


class ModelLoadError(RuntimeError):
    """ONNX Runtime could not load the graph (corrupt or truncated file, unsupported op)."""


def session_options(options: RuntimeOptions) -> ort.SessionOptions:
    session = ort.SessionOptions()
    session.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if options.intra_op_threads > 0:
        session.intra_op_num_threads = options.intra_op_threads
    # One run at a time per session (the engine serialises them), so no inter-op pool.
    session.inter_op_num_threads = 1
    session.enable_cpu_mem_arena = options.cpu_arena
    if not options.thread_spinning:
        session.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # Pre-packed weight copies: faster GEMMs for about the model's size in memory.
    if options.low_memory:
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
    """A cached optimized graph is valid only for the same graph and weights files, ORT
    version and CPU. Each lives in a directory of its own (graph and weights file) whose
    name starts with a digest of the graph's path, so stale versions can be found."""
    files = [model_path, model_path.with_name(ONNX_DATA_NAME)]
    stats = [path.stat() for path in files if path.is_file()]
    where = hashlib.sha256(str(model_path.resolve()).encode()).hexdigest()[:16]
    what = "|".join(
        [
            *(f"{stat.st_size}:{stat.st_mtime_ns}" for stat in stats),
            ort.__version__,
            platform.machine(),
            _cpu_identity(),
        ]
    )
    entry = f"{where}-{hashlib.sha256(what.encode()).hexdigest()[:16]}"
    return cache_dir / entry / ONNX_NAME


def _create_session(
    model_path: Path, options: RuntimeOptions, providers: list[str]
) -> ort.InferenceSession:
    session = session_options(options)
    if options.ort_cache_dir is None or CUDA in providers:
        # By path: ONNX Runtime maps the weights file beside the graph, no copy in Python.
        return ort.InferenceSession(str(model_path), sess_options=session, providers=providers)
    cached = optimized_graph_path(options.ort_cache_dir, model_path)
    if cached.is_file():
        session.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        log.info("loading the cached optimized graph %s", cached)
        return ort.InferenceSession(str(cached), sess_options=session, providers=providers)
    entry = cached.parent
    building = entry.with_name(f".{entry.name}.{os.getpid()}")  # renamed into place whole
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    session.optimized_model_filepath = str(building / cached.name)
    # The weights beside the graph, as the export keeps them: one protobuf holding them all
    # cannot exceed 2 GB, and a weights file is mapped rather than read into the heap.
    session.add_session_config_entry(
        "session.optimized_model_external_initializers_file_name", ONNX_DATA_NAME
    )
    created = ort.InferenceSession(str(model_path), sess_options=session, providers=providers)
    try:
        building.rename(entry)
    except OSError:  # another server cached the same graph meanwhile
        shutil.rmtree(building, ignore_errors=True)
    prefix = entry.name.split("-")[0]
    for stale in entry.parent.glob(f"{prefix}-*"):
        if stale != entry:  # an older export of the same path
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
    log.info("cached the optimized graph at %s", cached)
    return created


class _PastTiler:
    """Repeats a batch-1 key/value cache along the batch where it lives: the export's
    past-tiling graph (lmscore.export.past_tile) run on the model's device, outputs left there."""

    def __init__(self, path: Path, providers: list[str], device: tuple[str, int]) -> None:
        options = ort.SessionOptions()
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        self.names = [i.name for i in self.session.get_inputs() if i.name != TILE_REPEATS]
        self.device = device

    def tile(self, past: Mapping[str, ort.OrtValue], repeats: int) -> dict[str, ort.OrtValue]:
        binding = self.session.io_binding()
        for name in self.names:
            binding.bind_ortvalue_input(name, past[name])
            binding.bind_output(tiled_name(name), *self.device)
        binding.bind_cpu_input(TILE_REPEATS, np.array([repeats, 1, 1, 1], dtype=np.int64))
        self.session.run_with_iobinding(binding)
        tiled = dict(zip(self.names, binding.get_outputs(), strict=True))
        binding.clear_binding_inputs()  # see OnnxCausalLM._run_bound
        binding.clear_binding_outputs()
        return tiled


def _on_host(value: PastValue) -> np.ndarray:
    return value.numpy() if isinstance(value, ort.OrtValue) else np.asarray(value)


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
        # Whether the head sums the word-start tokens' probability (exports with words do).
        self.word_starts = WORD_START_OUTPUT in outputs
        # Whether the head computes each position's entropy and reads chosen distributions
        # (gathered_logprobs): exports of manifest format 7 on; older ones serve the rest.
        self.entropy = ENTROPY_OUTPUT in outputs
        self.gathers = GATHERED_OUTPUT in outputs
        self.io_binding = options.io_binding
        self.cpu_arena = options.cpu_arena and self.device == "cpu"
        self._bind_device = (
            ("cuda", int(self.session.get_provider_options()[CUDA].get("device_id", 0)))
            if self.device == "cuda"
            else ("cpu", 0)
        )
        tile_path = model_dir / PAST_TILE_NAME
        self._tiler = (
            _PastTiler(tile_path, self.providers, self._bind_device)
            if self.io_binding and tile_path.is_file()
            else None
        )
        self._past_names = [i.name for i in self._inputs if i.name.startswith(PAST_PREFIX)]
        # Counters for checks and metrics: runs through the IO binding, past caches tiled
        # on the device, and device past tensors that had to be copied to the host.
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
        past: Mapping[str, PastValue] | None = None,
        past_repeats: int = 1,
        return_present: bool = False,
        gather_positions: np.ndarray | None = None,
        gather_ids: np.ndarray | None = None,
    ) -> tuple[BatchScores, OrtCache | None]:
        """Score ``target_ids`` [batch, seq] at each position of right-padded ``input_ids``.

        ``attention_mask`` covers past + new tokens. ``past`` is a key/value cache by past
        input name (a `present` of an earlier call, or host arrays), each row repeated
        ``past_repeats`` times along the batch. With ``return_present`` the key/value cache
        of past + new tokens comes back, keyed by past input name: host arrays, or OrtValues
        left on the device under IO binding. ``gather_positions`` [batch, P] and
        ``gather_ids`` [K] (a model with `gathers`): the log-probs of those ids at those
        positions of each row come back too, [batch, P, K].
        """
        wanted = [TARGET_LOGPROBS, TARGET_RANKS]
        if self.word_starts:
            wanted.append(WORD_START_OUTPUT)
        if self.entropy:
            wanted.append(ENTROPY_OUTPUT)
        gathering = gather_positions is not None and gather_positions.shape[1] > 0
        if gathering:
            wanted.append(GATHERED_OUTPUT)
        if top_k > 0:
            wanted += [TOP_LOGPROBS, TOP_IDS]
        if past is None:
            past_feeds = None
        elif self.io_binding:
            past_feeds = self._bound_past(past, past_repeats)
        else:
            past_feeds = {n: np.repeat(_on_host(v), past_repeats, axis=0) for n, v in past.items()}
        feeds = model_feeds(
            self._inputs,
            input_ids,
            attention_mask,
            past=past_feeds,
            target_ids=target_ids,
            top_k=top_k,
            gather_positions=gather_positions if gathering else None,
            gather_ids=gather_ids if gathering else None,
        )
        values: dict[str, Any]
        if self.io_binding:
            values = self._run_bound(feeds, wanted, self._present if return_present else [])
        else:
            if return_present:
                wanted += self._present
            values = dict(zip(wanted, self.session.run(wanted, feeds), strict=True))
        batch, seq = input_ids.shape
        scores = BatchScores(
            logprobs=values[TARGET_LOGPROBS],
            ranks=values[TARGET_RANKS],
            top_logprobs=values.get(TOP_LOGPROBS, np.zeros((batch, seq, 0), np.float32)),
            top_ids=values.get(TOP_IDS, np.zeros((batch, seq, 0), np.int64)),
            word_start_logprobs=values.get(WORD_START_OUTPUT),
            entropies=values.get(ENTROPY_OUTPUT),
            gathered_logprobs=values.get(GATHERED_OUTPUT),
        )
        present = (
            {past_name_for(name): values[name] for name in self._present}
            if return_present
            else None
        )
        return scores, present

    def shrink_arena(self) -> bool:
        """Hand the CPU arena's unused regions back to the system; False without an arena.
        ONNX Runtime shrinks an arena only at the end of a run that asks for it, so this is
        a one-token run (milliseconds) with that option."""
        if not self.cpu_arena:
            return False
        ids = np.zeros((1, 1), dtype=np.int64)
        feeds = model_feeds(self._inputs, ids, np.ones_like(ids), target_ids=ids)
        run_options = ort.RunOptions()
        run_options.add_run_config_entry(ARENA_SHRINKAGE, "cpu:0")
        # The output in a buffer of ours: one ONNX Runtime allocated would still be alive
        # when the run shrinks the arena, and keep its region (after the first shrink the
        # arena grows by one region as large as a whole batch's buffers) from going back.
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        output = np.zeros((1, 1), dtype=np.float32)
        binding.bind_output(
            TARGET_LOGPROBS, "cpu", 0, np.float32, list(output.shape), output.ctypes.data
        )
        self.session.run_with_iobinding(binding, run_options)
        return True

    def _bound_past(self, past: Mapping[str, PastValue], repeats: int) -> dict[str, PastValue]:
        """The past feeds of an IO-bound run: OrtValues stay where they are (a batch-1 cache
        repeated there by the tiling graph); everything else is repeated on the host."""
        device = [v for v in past.values() if isinstance(v, ort.OrtValue)]
        here = sorted(past) == sorted(self._past_names) and all(
            isinstance(v, ort.OrtValue)
            and str(v.device_name()).lower() == self._bind_device[0]
            and (repeats == 1 or v.shape()[0] == 1)
            for v in past.values()
        )
        if here and repeats == 1:
            return dict(past)
        if here and self._tiler is not None:
            self.device_past_tiles += 1
            return dict(self._tiler.tile(past, repeats))  # type: ignore[arg-type]
        self.host_past_tensors += len(device)
        return {n: np.repeat(_on_host(v), repeats, axis=0) for n, v in past.items()}

    def _run_bound(
        self, feeds: Mapping[str, PastValue], scoring: list[str], present: list[str]
    ) -> dict[str, Any]:
        """One run through an IO binding: scoring outputs to host numpy arrays, `present`
        outputs as OrtValues left on the device."""
        binding = self.session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in scoring:
            binding.bind_output(name, "cpu")
        for name in present:
            binding.bind_output(name, *self._bind_device)
        self.session.run_with_iobinding(binding)
        self.io_binding_runs += 1
        outputs = binding.get_outputs()
        # Else the binding keeps its inputs and outputs (the whole key/value cache of the
        # last run) alive past this call: RSS grew by two caches per chunk, not one.
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        values: dict[str, Any] = {
            name: value.numpy() for name, value in zip(scoring, outputs, strict=False)
        }
        values.update(zip(present, outputs[len(scoring) :], strict=True))
        return values
