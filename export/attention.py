"""Fused attention in the exported graph: one ONNX Runtime `MultiHeadAttention` node per layer.

Optimum exports attention as the ops PyTorch runs (MatMul, mask Where, Softmax,
MatMul, with the mask rebuilt and NaN-guarded in every layer). ONNX Runtime runs
those one by one over [batch, heads, S, T] tensors, several times over. At export,
lmscore registers an attention implementation with transformers
(`ATTENTION_IMPLEMENTATION`, through its AttentionInterface, so every architecture
that dispatches attention there gets it) whose ONNX form is ORT's contrib op
`com.microsoft.MultiHeadAttention`:

    query  [B, S, heads * head_dim]   (the rotated queries)
    key    [B, heads, T, head_dim]    (past + new, already concatenated by the cache;
    value  [B, heads, T, head_dim]     grouped-query heads repeated, linear in T)
    attention_bias [B, 1, S, T]       (transformers' own additive mask: causal,
                                       padding and sliding window all in it)

so the mask is built once per run, not per layer, and ORT computes each layer's
scores, softmax and weighted sum in one kernel on CPU and CUDA. Its working memory
is [B, heads, S, T] for the new tokens S only: chunked prefill (the server's
`--prefill-chunk-tokens`) bounds S, so memory grows linearly with T.

Attention that MultiHeadAttention cannot express stays as exported: logit soft-capping
(Gemma-2), head masks, GPT-2 variants with other scalings. `fused_attention_layers`
counts what was fused; the manifest records it.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

ATTENTION_IMPLEMENTATION = "lmscore_fused"
FUSED_OP = "MultiHeadAttention"
FUSED_DOMAIN = "com.microsoft"


def _unfusable(module: Any, kwargs: dict[str, Any]) -> bool:
    if kwargs.get("softcap") or kwargs.get("head_mask") is not None:
        return True
    if kwargs.get("output_attentions"):
        return True
    # GPT-2's scaling options (no scaling, by layer index, upcast) are not the default 1/sqrt(d).
    if getattr(module, "scale_attn_weights", True) is False:
        return True
    return bool(
        getattr(module, "scale_attn_by_inverse_layer_idx", False)
        or getattr(module, "reorder_and_upcast_attn", False)
    )


def _fused_attention_function() -> Any:
    import torch
    from transformers.integrations.sdpa_attention import repeat_kv
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    class MultiHeadAttention(torch.autograd.Function):
        """Runs attention in PyTorch; exports as one com.microsoft.MultiHeadAttention node."""

        @staticmethod
        def forward(  # type: ignore[override]
            ctx: Any,
            query: torch.Tensor,
            key: torch.Tensor,
            value: torch.Tensor,
            bias: torch.Tensor,
            scale: float,
            heads: int,
            head_dim: int,
        ) -> torch.Tensor:
            scores = torch.matmul(query, key.transpose(-1, -2)) * scale + bias
            probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
            return torch.matmul(probs, value).transpose(1, 2).contiguous()

        @staticmethod
        def symbolic(
            g: Any,
            query: Any,
            key: Any,
            value: Any,
            bias: Any,
            scale: float,
            heads: int,
            head_dim: int,
        ) -> Any:
            from torch.onnx import symbolic_helper

            flat = g.op("Constant", value_t=torch.tensor([0, 0, -1], dtype=torch.int64))
            split = g.op("Constant", value_t=torch.tensor([0, 0, heads, head_dim]))
            query_bsd = g.op("Reshape", g.op("Transpose", query, perm_i=[0, 2, 1, 3]), flat)
            none = symbolic_helper._optional_input_placeholder_tensor(g)
            output = g.op(
                f"{FUSED_DOMAIN}::{FUSED_OP}",
                query_bsd,
                key,
                value,
                none,  # bias of the projections (folded into them already)
                none,  # key padding mask (the padding is in attention_bias)
                bias,  # attention_bias
                num_heads_i=heads,
                scale_f=scale,
            )
            # ONNX's shape inference does not know contrib ops: declare what comes out.
            output.setType(query.type().with_sizes([None, None, heads * head_dim]))
            result = g.op("Reshape", output, split)
            result.setType(query.type().with_sizes([None, None, heads, head_dim]))
            return result

    def fused_attention(
        module: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None = None,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        if (
            attention_mask is None
            or attention_mask.dtype == torch.bool
            or dropout
            or _unfusable(module, kwargs)
        ):
            return ALL_ATTENTION_FUNCTIONS["sdpa"](
                module,
                query,
                key,
                value,
                attention_mask,
                scaling=scaling,
                dropout=dropout,
                **kwargs,
            )
        groups = query.shape[1] // key.shape[1]
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
        bias = attention_mask[:, :, :, : key.shape[-2]]
        with warnings.catch_warnings():
            # Heads and head size are fixed by the architecture: constants are what we want.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            heads, head_dim = int(query.shape[1]), int(query.shape[3])
        scale = float(scaling) if scaling is not None else head_dim**-0.5
        return MultiHeadAttention.apply(query, key, value, bias, scale, heads, head_dim), None

    return fused_attention


def _eager_mask(*args: Any, **kwargs: Any) -> Any:
    """transformers' additive float mask, looked up at call time: during Optimum's export
    that is its traceable replacement."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    return ALL_MASK_ATTENTION_FUNCTIONS["eager"](*args, **kwargs)


@contextlib.contextmanager
def fused_attention(model: Any) -> Iterator[None]:
    """Within the block, `model` dispatches attention to the fused implementation."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ALL_ATTENTION_FUNCTIONS.register(ATTENTION_IMPLEMENTATION, _fused_attention_function())
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_IMPLEMENTATION, _eager_mask)
    before = model.config._attn_implementation
    model.config._attn_implementation = ATTENTION_IMPLEMENTATION
    try:
        yield
    finally:
        model.config._attn_implementation = before


def fused_attention_layers(graph: Any) -> int:
    """How many fused attention nodes an onnx GraphProto holds."""
    return sum(1 for n in graph.node if n.op_type == FUSED_OP and n.domain == FUSED_DOMAIN)
