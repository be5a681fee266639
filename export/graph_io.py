"""Inputs and outputs of the exported graph (Optimum `text-generation-with-past` + scoring head).

Optimum's graph takes `input_ids`, `attention_mask` (past + new length),
`position_ids` and, per layer, `past_key_values.{i}.key/value` shaped
[batch, kv_heads, past_len, head_dim], and returns `present.{i}.key/value`.
lmscore.export.head adds `target_ids` and `top_k` and replaces `logits` by
per-token scores. Scoring a sequence from scratch feeds an empty
(zero-length) past; prefix reuse feeds the `present` of a prompt pass.
numpy only, so the server can use it without torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from lmscore.export.head import GATHER_IDS, GATHER_POSITIONS, TARGET_IDS, TOP_K

PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."


class OnnxInput(Protocol):
    name: str
    shape: Sequence[Any]
    type: str


def position_ids_for(attention_mask: np.ndarray, past_len: int = 0) -> np.ndarray:
    """Positions of the new tokens: 0, 1, 2, ... over the real tokens of each row, counting the
    past; padding positions get 0. Deriving them from the mask keeps them right for any padding
    side (optimum PR #2326)."""
    positions = np.cumsum(attention_mask, axis=-1, dtype=np.int64) - 1
    positions = np.where(attention_mask > 0, positions, 0).astype(np.int64)
    return positions[:, past_len:]


def past_name_for(present_name: str) -> str:
    return PAST_PREFIX + present_name[len(PRESENT_PREFIX) :]


# The past-tiling graph (lmscore.export.past_tile): its inputs are the past_key_values names and
# `repeats` [4] int64; its outputs are the tiled caches, named by tiled_name().
TILE_REPEATS = "repeats"


def tiled_name(past_name: str) -> str:
    return f"{past_name}.tiled"


def _dtype_of(onnx_type: str) -> type[np.generic]:
    return np.float16 if onnx_type == "tensor(float16)" else np.float32


def model_feeds(
    graph_inputs: Sequence[OnnxInput],
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    *,
    past: Mapping[str, Any] | None = None,
    target_ids: np.ndarray | None = None,
    top_k: int = 0,
    gather_positions: np.ndarray | None = None,
    gather_ids: np.ndarray | None = None,
) -> dict[str, Any]:
    """Feeds for right-padded `input_ids` [batch, seq].

    `attention_mask` covers past + new tokens; `past` maps past_key_values names to
    tensors [batch, kv_heads, past_len, head_dim], host arrays or (for an IO binding) values
    on the device (None: an empty past). `gather_positions` [batch, P] and `gather_ids` [K]:
    the distributions the head reads whole or in part (None: none).
    """
    batch, new_len = input_ids.shape
    past_len = attention_mask.shape[1] - new_len
    feeds: dict[str, Any] = {}
    for graph_input in graph_inputs:
        name = graph_input.name
        if name == "input_ids":
            feeds[name] = input_ids.astype(np.int64, copy=False)
        elif name == "attention_mask":
            feeds[name] = attention_mask.astype(np.int64, copy=False)
        elif name == "position_ids":
            feeds[name] = position_ids_for(attention_mask, past_len)
        elif name.startswith(PAST_PREFIX):
            if past is not None:
                feeds[name] = past[name]
            else:
                _, kv_heads, _, head_dim = graph_input.shape
                feeds[name] = np.zeros(
                    (batch, int(kv_heads), 0, int(head_dim)), dtype=_dtype_of(graph_input.type)
                )
        elif name == TARGET_IDS:
            feeds[name] = (
                np.zeros_like(input_ids, dtype=np.int64)
                if target_ids is None
                else target_ids.astype(np.int64, copy=False)
            )
        elif name == TOP_K:
            feeds[name] = np.array([top_k], dtype=np.int64)
        elif name == GATHER_POSITIONS:
            feeds[name] = (
                np.zeros((batch, 0), np.int64)
                if gather_positions is None
                else gather_positions.astype(np.int64, copy=False)
            )
        elif name == GATHER_IDS:
            feeds[name] = (
                np.zeros(0, np.int64)
                if gather_ids is None
                else gather_ids.astype(np.int64, copy=False)
            )
        else:
            raise ValueError(f"unexpected ONNX model input {name!r}")
    return feeds
