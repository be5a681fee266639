"""ONNX Runtime session over an exported model: token ids in, per-token scores out.

The graph carries lmscore's scoring head (lmscore.export.head), so a run
returns log-probs, ranks and top-k of the target ids, never the logits.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort

from lmscore.export.graph_io import PRESENT_PREFIX, model_feeds, past_name_for
from lmscore.export.head import HEAD_OUTPUTS
from lmscore.export.manifest import ONNX_NAME

Device = Literal["auto", "cpu", "cuda"]
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

log = logging.getLogger(__name__)


class DeviceError(RuntimeError):
    """The requested execution provider did not load."""


@dataclasses.dataclass(frozen=True)
class BatchScores:
    """Scores of target_ids[b, t] under the logits at [b, t]."""

    logprobs: np.ndarray  # float32 [batch, seq]
    ranks: np.ndarray  # int64 [batch, seq]
    top_logprobs: np.ndarray  # float32 [batch, seq, top_k]
    top_ids: np.ndarray  # int64 [batch, seq, top_k]


PastKeyValues = Mapping[str, np.ndarray]


def session_options(intra_op_threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if intra_op_threads > 0:
        options.intra_op_num_threads = intra_op_threads
    # One run at a time per session (the engine serialises them), so no inter-op pool.
    options.inter_op_num_threads = 1
    return options


class OnnxCausalLM:
    """Runs the exported graph on right-padded batches, with an empty or a given past."""

    def __init__(self, model_dir: Path, device: Device = "auto", intra_op_threads: int = 0) -> None:
        path = str(model_dir / ONNX_NAME)
        want_cuda = device == "cuda" or (device == "auto" and CUDA in ort.get_available_providers())
        providers = [CUDA, CPU] if want_cuda else [CPU]
        self.session = ort.InferenceSession(
            path, sess_options=session_options(intra_op_threads), providers=providers
        )
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
            raise ValueError(f"{path} lacks the scoring head outputs {missing}; export it again")
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
