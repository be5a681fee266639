"""Inputs of the ONNX graph Optimum exports for `text-generation-with-past`.

The graph takes `input_ids`, `attention_mask` (past + new length),
`position_ids` and, per layer, `past_key_values.{i}.key/value` shaped
[batch, kv_heads, past_len, head_dim]; it returns `logits` for every position.
Scoring a whole sequence from scratch feeds an empty (zero-length) past.
numpy only, so the server can use it without torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

PAST_PREFIX = "past_key_values."


class OnnxInput(Protocol):
    name: str
    shape: Sequence[Any]
    type: str


def position_ids_for(attention_mask: np.ndarray) -> np.ndarray:
    """0, 1, 2, ... over the real tokens of each row; padding positions get 0.

    With right padding this is plain arange, but deriving it from the mask keeps
    positions right for any padding side (optimum PR #2326).
    """
    positions = np.cumsum(attention_mask, axis=-1, dtype=np.int64) - 1
    return np.where(attention_mask > 0, positions, 0).astype(np.int64)


def _dtype_of(onnx_type: str) -> type[np.generic]:
    return np.float16 if onnx_type == "tensor(float16)" else np.float32


def full_sequence_feeds(
    graph_inputs: Sequence[OnnxInput], input_ids: np.ndarray, attention_mask: np.ndarray
) -> dict[str, np.ndarray]:
    """Feeds that run `input_ids` [batch, seq] (right-padded) with an empty past."""
    batch = input_ids.shape[0]
    feeds: dict[str, np.ndarray] = {}
    for graph_input in graph_inputs:
        name = graph_input.name
        if name == "input_ids":
            feeds[name] = input_ids.astype(np.int64, copy=False)
        elif name == "attention_mask":
            feeds[name] = attention_mask.astype(np.int64, copy=False)
        elif name == "position_ids":
            feeds[name] = position_ids_for(attention_mask)
        elif name.startswith(PAST_PREFIX):
            _, kv_heads, _, head_dim = graph_input.shape
            feeds[name] = np.zeros(
                (batch, int(kv_heads), 0, int(head_dim)), dtype=_dtype_of(graph_input.type)
            )
        else:
            raise ValueError(f"unexpected ONNX model input {name!r}")
    return feeds
