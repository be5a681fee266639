"""The export's validation figure: max |log p_ORT - log p_PyTorch| on a short natural text.

log p_ORT comes from the exported graph's scoring head (lmscore.export.head),
so the figure covers exactly what the server computes.

Optimum's own validation only warns on a tolerance miss; this figure is
measured on the exported files (ONNX graph and tokenizer.json) and recorded
in the manifest, and the export fails when it exceeds the tolerance.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from lmscore.export.graph_io import model_feeds
from lmscore.export.head import TARGET_LOGPROBS
from lmscore.export.manifest import ONNX_NAME, TOKENIZER_NAME

VALIDATION_TEXT = Path(__file__).with_name("data") / "validation.txt"


@dataclasses.dataclass(frozen=True)
class ValidationFigure:
    max_abs_diff: float
    tokens: int


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def validate_export(
    model: Any,
    hf_tokenizer: Any,
    export_dir: Path,
    bos_token_id: int | None,
    max_context: int | None = None,
) -> ValidationFigure:
    """Score the validation text with the PyTorch `model` and with ONNX Runtime on `export_dir`
    (its first `max_context` tokens, BOS included)."""
    import onnxruntime as ort
    import torch
    from tokenizers import Tokenizer

    text = VALIDATION_TEXT.read_text(encoding="utf-8").strip()
    ids = (
        Tokenizer.from_file(str(export_dir / TOKENIZER_NAME))
        .encode(text, add_special_tokens=False)
        .ids
    )
    reference_ids = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    if ids != reference_ids:
        raise RuntimeError("the exported tokenizer.json tokenizes differently from the source")
    if bos_token_id is not None:
        ids = [bos_token_id, *ids]
    if max_context is not None:
        ids = ids[:max_context]
    input_ids = np.asarray([ids], dtype=np.int64)
    targets = input_ids[0, 1:]

    with torch.no_grad():
        torch_logits = model(torch.from_numpy(input_ids)).logits[0, :-1].float().numpy()
    torch_logprobs = _log_softmax(torch_logits)[np.arange(len(targets)), targets]

    # The scoring head's own output: exactly what the server returns.
    options = ort.SessionOptions()
    # As the server runs it (lmscore.server.runtime): no pre-packed copies of the weights.
    options.add_session_config_entry("session.disable_prepacking", "1")
    session = ort.InferenceSession(
        str(export_dir / ONNX_NAME), options, providers=["CPUExecutionProvider"]
    )
    target_ids = np.zeros_like(input_ids)
    target_ids[0, :-1] = targets
    feeds = model_feeds(
        session.get_inputs(), input_ids, np.ones_like(input_ids), target_ids=target_ids
    )
    (head_logprobs,) = session.run([TARGET_LOGPROBS], feeds)
    ort_logprobs = head_logprobs[0, :-1]
    diff = float(np.max(np.abs(ort_logprobs.astype(np.float64) - torch_logprobs)))
    return ValidationFigure(max_abs_diff=diff, tokens=len(ids))
