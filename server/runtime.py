"""ONNX Runtime session over an exported model: token ids in, logits out."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort

from lmscore.export.graph_io import full_sequence_feeds
from lmscore.export.manifest import ONNX_NAME

Device = Literal["auto", "cpu", "cuda"]
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

log = logging.getLogger(__name__)


class DeviceError(RuntimeError):
    """The requested execution provider did not load."""


def _session_options(intra_op_threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if intra_op_threads > 0:
        options.intra_op_num_threads = intra_op_threads
    # One run at a time per session (the engine serialises them), so no inter-op pool.
    options.inter_op_num_threads = 1
    return options


class OnnxCausalLM:
    """Runs the exported graph on right-padded batches with an empty past."""

    def __init__(self, model_dir: Path, device: Device = "auto", intra_op_threads: int = 0):
        path = str(model_dir / ONNX_NAME)
        options = _session_options(intra_op_threads)
        want_cuda = device == "cuda" or (device == "auto" and CUDA in ort.get_available_providers())
        providers = [CUDA, CPU] if want_cuda else [CPU]
        self.session = ort.InferenceSession(path, sess_options=options, providers=providers)
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
        logits_output = next(o for o in self.session.get_outputs() if o.name == "logits")
        self.vocab_size = int(logits_output.shape[-1])

    @property
    def device(self) -> str:
        return "cuda" if CUDA in self.providers else "cpu"

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Logits [batch, seq, vocab] as float32 for right-padded ``input_ids`` [batch, seq]."""
        feeds = full_sequence_feeds(self._inputs, input_ids, attention_mask)
        (logits,) = self.session.run(["logits"], feeds)
        return np.asarray(logits, dtype=np.float32)
