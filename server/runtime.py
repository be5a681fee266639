"""ONNX Runtime session over an exported model: token ids in, per-token scores out.

The graph carries lmscore's scoring head (lmscore.export.head), so a run
returns log-probs, ranks and top-k of the target ids, never the logits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort

from lmscore.export.graph_io import PRESENT_PREFIX, model_feeds, past_name_for
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
        outputs = {o.name: o for o in self.session.get_outputs()}
        missing = [name for name in HEAD_OUTPUTS if name not in outputs]
        if missing:
            raise ManifestError(
                f"{model_dir} lacks the scoring head outputs {missing}; export again"
            )
        self._present = [name for name in outputs if name.startswith(PRESENT_PREFIX)]

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
