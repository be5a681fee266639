"""The architectures users bring, as tiny random models exported through lmscore's export:
attention fused where ONNX Runtime's MultiHeadAttention can express it (kept as exported
where it cannot: Gemma-2's soft-capping, Falcon's own attention), and for each, chunked
prefill equal to one pass and to PyTorch within 1e-4."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lmscore.export.manifest import TOKENIZER_NAME, Manifest
from lmscore.server.config import EngineSettings
from lmscore.server.engine import ScoringEngine
from lmscore.server.requests import ItemInput, ModelFacts
from lmscore.server.runtime import OnnxCausalLM
from lmscore.server.tokenization import TextTokenizer
from lmscore.v1.options import ScoreOptions
from reference import sequence_logprobs
from tiny_model import LICENSES, save_tiny_model

TOLERANCE = 1e-4
CONTEXT = 512
# (config class, its keywords beyond tiny_model's, attention layers fused)
ARCHITECTURES: dict[str, tuple[str, dict[str, Any], int]] = {
    "gpt2": ("GPT2Config", {"n_positions": CONTEXT}, 2),
    "gpt_neox": ("GPTNeoXConfig", {"max_position_embeddings": CONTEXT}, 2),
    "qwen2": ("Qwen2Config", {"max_position_embeddings": CONTEXT}, 2),
    "qwen3": ("Qwen3Config", {"max_position_embeddings": CONTEXT, "head_dim": 16}, 2),
    "phi3": ("Phi3Config", {"max_position_embeddings": CONTEXT, "pad_token_id": 0}, 2),
    "gemma3_text": (
        "Gemma3TextConfig",
        {
            "max_position_embeddings": CONTEXT,
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "sliding_window": 16,
            "layer_types": ["sliding_attention", "full_attention"],
        },
        2,
    ),
    # Logit soft-capping: no MultiHeadAttention form.
    "gemma2": (
        "Gemma2Config",
        {"max_position_embeddings": CONTEXT, "head_dim": 16, "sliding_window": 16},
        0,
    ),
    "opt": (
        "OPTConfig",
        {"ffn_dim": 128, "word_embed_proj_dim": 64, "max_position_embeddings": CONTEXT},
        2,
    ),
    # Its own attention code, not transformers' attention interface.
    "falcon": ("FalconConfig", {}, 0),
}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_architecture_fuses_attention_and_chunks_exactly(name: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from lmscore.export.convert import export_model

    class_name, keywords, _ = ARCHITECTURES[name]
    source = save_tiny_model(tmp_path / "hf", class_name, 0, **keywords)
    output = tmp_path / "onnx"
    manifest = export_model(str(source), output, progress=False)
    assert manifest.layers == 2
    assert manifest.fused_attention_layers == ARCHITECTURES[name][2]
    facts = ModelFacts(CONTEXT, manifest.vocab_size, manifest.bos_token_id, None)
    tokenizer = TextTokenizer(output / TOKENIZER_NAME)
    ids = tokenizer.encode((LICENSES / "GPL-3").read_text())[:120]
    items = [ItemInput(ids[:70], [ids[70:119]]), ItemInput(ids[:20], [ids[20:40]])]
    runtime = OnnxCausalLM(output)
    rows = {}
    for chunk in (0, 9, 64):
        engine = ScoringEngine(
            runtime, tokenizer, facts, EngineSettings(prefill_chunk_tokens=chunk)
        )
        plan = engine.plan(items, ScoreOptions(token_details=True))
        rows[chunk] = [
            [r.joint_logprob, *(t.logprob for t in r.tokens[1:])] for r in engine.score_sync(plan)
        ]
    model = AutoModelForCausalLM.from_pretrained(str(source)).eval()
    bos = [] if Manifest.read(output).bos_token_id is None else [manifest.bos_token_id]
    for item, row in zip(items, rows[0], strict=True):
        logprobs, _, _ = sequence_logprobs(model, bos + list(item.prompt) + item.completions[0])
        np.testing.assert_allclose(row, [logprobs.sum(), *logprobs], atol=TOLERANCE, rtol=0)
    for chunk in (9, 64):
        for got, want in zip(rows[chunk], rows[0], strict=True):
            np.testing.assert_allclose(got, want, atol=TOLERANCE, rtol=0)
