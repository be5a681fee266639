"""The fused scoring head: extends the exported graph so ONNX Runtime returns per-token
log-probs, ranks and top-k of given target ids instead of the [batch, seq, vocab] logits.

Added inputs:  target_ids [batch, seq] int64 (the token each position is scored on;
               any valid id where nothing is scored), top_k [1] int64 (0 for none).
Added outputs: target_logprobs [batch, seq] float32 = log_softmax(logits)[target],
               target_ranks [batch, seq] int64 = 1 + #{v : logits[v] > logits[target]},
               top_logprobs / top_ids [batch, seq, top_k], most likely first;
               with a word-start mask (lmscore.export.words),
               word_start_logprobs [batch, seq] float32 = log sum of p(v) over the
               tokens v that begin a word (or are EOS), for word scores.
With the research outputs (exports of manifest format 7 on):
  added inputs:  gather_positions [batch, P] int64 (positions whose distributions are
                 read; P may be 0), gather_ids [K] int64 (the vocabulary ids read there),
  added outputs: entropy [batch, seq] float32 = -sum_v p(v) log p(v) in nats, the
                 entropy of each position's next-token distribution;
                 gathered_logprobs [batch, P, K] float32 =
                 log_softmax(logits[b, gather_positions[b, p]])[gather_ids[k]]:
                 candidate labels (K ids at the last position) and whole distributions
                 (K = vocab, ids 0..vocab-1) without the [batch, seq, vocab] logits.
The logits output is removed, so they never leave ONNX Runtime.

log p = logit - logsumexp(logits), in float32 whatever the model dtype, with the
sum of exp taken in two levels (blocks of SUM_BLOCK, then the block sums).
ONNX Runtime's LogSoftmax (like PyTorch's float32 log_softmax) sums the whole
vocabulary (49152 terms on SmolLM2) into one accumulator and drops the tail of
tiny probabilities that fall below its rounding step: every log-prob comes out
too high, a bias that adds up over a text. The two-level sum stays close to
float64 with no bias (docs/design.md, "The fused scoring head").
The entropy is log S - (sum_v e_v s_v) / S with s = logits - max, e = exp(s) and
S = sum e: both terms are >= 0 (s <= 0), so nothing cancels, and the sum of e*s is taken
in the same two levels as S.
lmscore.server.scoring.score_positions is the same computation in numpy, and
the tests hold the two to each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

# Optimum's output that the head reads and removes.
LOGITS = "logits"
TARGET_IDS, TOP_K = "target_ids", "top_k"
HEAD_INPUTS = (TARGET_IDS, TOP_K)
TARGET_LOGPROBS, TARGET_RANKS = "target_logprobs", "target_ranks"
TOP_LOGPROBS, TOP_IDS = "top_logprobs", "top_ids"
HEAD_OUTPUTS = (TARGET_LOGPROBS, TARGET_RANKS, TOP_LOGPROBS, TOP_IDS)
WORD_START_OUTPUT = "word_start_logprobs"
GATHER_POSITIONS, GATHER_IDS = "gather_positions", "gather_ids"
ENTROPY_OUTPUT, GATHERED_OUTPUT = "entropy", "gathered_logprobs"
RESEARCH_OUTPUTS = (ENTROPY_OUTPUT, GATHERED_OUTPUT)
# Every tensor and node the head adds is named with this prefix.
HEAD_PREFIX = "lmscore_"
SUM_BLOCK = 256


def is_head_node(node) -> bool:  # node: onnx.NodeProto
    """Whether a node is the scoring head's (its outputs or its name are lmscore's), not the
    model's: quantization and float16 passes rewrite the model's linear layers only."""
    return node.name.startswith(HEAD_PREFIX) or any(
        o.startswith(HEAD_PREFIX)
        or o in HEAD_OUTPUTS
        or o == WORD_START_OUTPUT
        or o in RESEARCH_OUTPUTS
        for o in node.output
    )


def add_scoring_head(
    onnx_path: Path,
    vocab_size: int | None = None,
    word_start_mask: np.ndarray | None = None,
    *,
    research: bool = True,
) -> None:
    """Rewrite the model at `onnx_path` in place with the scoring head.

    `vocab_size` (the output layer's width) is needed where the graph's logits do not
    declare it (shape inference stops at contrib ops such as fused attention).
    `word_start_mask` (bool [vocab]): also output word_start_logprobs. `research`: also
    the entropy and gathered_logprobs outputs and their inputs (off: the head of manifest
    format 6, for tests of older exports)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from lmscore.export.external_data import load_graph, save_graph

    model = load_graph(onnx_path)  # the head adds nodes only: the weights stay where they are
    graph = model.graph
    logits = next((o for o in graph.output if o.name == LOGITS), None)
    if logits is None:
        raise ValueError(f"{onnx_path} has no {LOGITS!r} output (already has the head?)")
    input_ids = next(i for i in graph.input if i.name == "input_ids")
    batch, seq = (d.dim_param or d.dim_value for d in input_ids.type.tensor_type.shape.dim)

    graph.input.extend(
        [
            helper.make_tensor_value_info(TARGET_IDS, TensorProto.INT64, [batch, seq]),
            helper.make_tensor_value_info(TOP_K, TensorProto.INT64, [1]),
        ]
    )
    vocab = logits.type.tensor_type.shape.dim[-1].dim_value or vocab_size
    if not vocab:
        raise ValueError(f"{onnx_path}: the logits' vocabulary axis has no fixed size")
    padding = -vocab % SUM_BLOCK
    opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([-1], np.int64), "lmscore_last_axis"),
            numpy_helper.from_array(np.array(1, np.int64), "lmscore_one"),
            numpy_helper.from_array(
                np.array([0, 0, (vocab + padding) // SUM_BLOCK, SUM_BLOCK], np.int64),
                "lmscore_blocks",
            ),
        ]
    )
    source = LOGITS
    nodes = []
    if logits.type.tensor_type.elem_type != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", [LOGITS], ["lmscore_logits"], to=TensorProto.FLOAT))
        source = "lmscore_logits"
    node = helper.make_node
    # logsumexp = max + log(sum(exp(logits - max))), the sum in blocks (zeros pad the last).
    exps = "lmscore_exp"
    nodes += [
        # ReduceMax takes its axes as an input from opset 18, as an attribute before.
        node("ReduceMax", [source, "lmscore_last_axis"], ["lmscore_max"], keepdims=1)
        if opset >= 18
        else node("ReduceMax", [source], ["lmscore_max"], axes=[-1], keepdims=1),
        node("Sub", [source, "lmscore_max"], ["lmscore_shifted"]),
        node("Exp", ["lmscore_shifted"], [exps]),
    ]
    if padding:
        pads = np.array([0, 0, 0, 0, 0, padding], np.int64)
        graph.initializer.append(numpy_helper.from_array(pads, "lmscore_pad"))
    nodes += _two_level_sum(exps, "lmscore_sum", padding)
    nodes += [
        node("Log", ["lmscore_sum"], ["lmscore_log_sum"]),
        node("Add", ["lmscore_max", "lmscore_log_sum"], ["lmscore_lse"]),
        node("Unsqueeze", [TARGET_IDS, "lmscore_last_axis"], ["lmscore_targets"]),
        node("GatherElements", [source, "lmscore_targets"], ["lmscore_target_logit"], axis=-1),
        node("Sub", ["lmscore_target_logit", "lmscore_lse"], ["lmscore_lp"]),
        node("Squeeze", ["lmscore_lp", "lmscore_last_axis"], [TARGET_LOGPROBS]),
        node("Greater", [source, "lmscore_target_logit"], ["lmscore_higher"]),
        # Counts below 2**24 are exact in float32 (vocabularies are far smaller).
        node("Cast", ["lmscore_higher"], ["lmscore_higher_f"], to=TensorProto.FLOAT),
        node(
            "ReduceSum",
            ["lmscore_higher_f", "lmscore_last_axis"],
            ["lmscore_count_f"],
            keepdims=0,
        ),
        node("Cast", ["lmscore_count_f"], ["lmscore_count"], to=TensorProto.INT64),
        node("Add", ["lmscore_count", "lmscore_one"], [TARGET_RANKS]),
        node(
            "TopK",
            [source, TOP_K],
            ["lmscore_top_logits", TOP_IDS],
            axis=-1,
            largest=1,
            sorted=1,
        ),
        node("Sub", ["lmscore_top_logits", "lmscore_lse"], [TOP_LOGPROBS]),
    ]
    word_outputs = []
    if word_start_mask is not None:
        if word_start_mask.shape != (vocab,):
            raise ValueError(f"word-start mask {word_start_mask.shape}, vocabulary {vocab}")
        # sum over the word-start tokens of exp(logit - max), as a product with the 0/1 mask:
        # no [batch, seq, vocab] tensor beyond the exps the normalizer already holds. ONNX
        # Runtime's GEMM accumulates along the vocabulary in blocks (held to 5e-6 of float64,
        # no drift, by tests/test_words.py; an Einsum drifted). The node is named as the
        # head's, so that passes over the model's linear layers leave it (is_head_node).
        graph.initializer.append(
            numpy_helper.from_array(
                word_start_mask.astype(np.float32).reshape(vocab, 1), "lmscore_word_start_mask"
            )
        )
        nodes += [
            node(
                "MatMul",
                ["lmscore_exp", "lmscore_word_start_mask"],
                ["lmscore_ws_sum"],
                name="lmscore_word_start_sum",
            ),
            node("Log", ["lmscore_ws_sum"], ["lmscore_ws_log_sum"]),
            node("Sub", ["lmscore_ws_log_sum", "lmscore_log_sum"], ["lmscore_ws_lp"]),
            node("Squeeze", ["lmscore_ws_lp", "lmscore_last_axis"], [WORD_START_OUTPUT]),
        ]
        word_outputs.append(
            helper.make_tensor_value_info(WORD_START_OUTPUT, TensorProto.FLOAT, [batch, seq])
        )
    research_outputs = []
    if research:
        nodes += _research_nodes(graph, source, vocab, padding)
        graph.input.extend(
            [
                helper.make_tensor_value_info(GATHER_POSITIONS, TensorProto.INT64, [batch, "P"]),
                helper.make_tensor_value_info(GATHER_IDS, TensorProto.INT64, ["K"]),
            ]
        )
        research_outputs = [
            helper.make_tensor_value_info(ENTROPY_OUTPUT, TensorProto.FLOAT, [batch, seq]),
            helper.make_tensor_value_info(GATHERED_OUTPUT, TensorProto.FLOAT, [batch, "P", "K"]),
        ]
    graph.node.extend(nodes)
    kept = [o for o in graph.output if o.name != LOGITS]
    del graph.output[:]
    graph.output.extend(
        [
            helper.make_tensor_value_info(TARGET_LOGPROBS, TensorProto.FLOAT, [batch, seq]),
            helper.make_tensor_value_info(TARGET_RANKS, TensorProto.INT64, [batch, seq]),
            helper.make_tensor_value_info(TOP_LOGPROBS, TensorProto.FLOAT, [batch, seq, TOP_K]),
            helper.make_tensor_value_info(TOP_IDS, TensorProto.INT64, [batch, seq, TOP_K]),
            *word_outputs,
            *research_outputs,
            *kept,
        ]
    )
    save_graph(model, onnx_path)


def _two_level_sum(tensor: str, output: str, padding: int) -> list:  # onnx NodeProtos
    """`output` [batch, seq, 1] = the sum of `tensor` [batch, seq, vocab] over the vocabulary
    in blocks of SUM_BLOCK, then over the block sums (zeros pad the last block)."""
    from onnx import helper

    node = helper.make_node
    nodes = []
    if padding:
        padded = f"{tensor}_padded"
        nodes.append(node("Pad", [tensor, "lmscore_pad"], [padded], mode="constant"))
        tensor = padded
    return [
        *nodes,
        node("Reshape", [tensor, "lmscore_blocks"], [f"{tensor}_blocks"]),
        node(
            "ReduceSum",
            [f"{tensor}_blocks", "lmscore_last_axis"],
            [f"{tensor}_block_sums"],
            keepdims=0,
        ),
        node("ReduceSum", [f"{tensor}_block_sums", "lmscore_last_axis"], [output]),
    ]


def _research_nodes(graph, source: str, vocab: int, padding: int) -> list:  # onnx objects
    """The entropy at every position, and the log-probs of gather_ids at gather_positions,
    from the float32 logits `source` and the normalizer's tensors (lmscore_shifted,
    lmscore_exp, lmscore_sum, lmscore_lse)."""
    import numpy as np
    from onnx import helper, numpy_helper

    node = helper.make_node
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([1, 1, vocab], np.int64), "lmscore_vocab_shape"),
            numpy_helper.from_array(np.array([1, 1, -1], np.int64), "lmscore_ids_shape"),
        ]
    )
    # sum of e*s in the normalizer's two levels.
    nodes = [node("Mul", ["lmscore_exp", "lmscore_shifted"], ["lmscore_exp_shifted"])]
    nodes += _two_level_sum("lmscore_exp_shifted", "lmscore_wsum", padding)
    nodes += [
        node("Div", ["lmscore_wsum", "lmscore_sum"], ["lmscore_mean_shifted"]),
        node("Sub", ["lmscore_log_sum", "lmscore_mean_shifted"], ["lmscore_entropy"]),
        node("Squeeze", ["lmscore_entropy", "lmscore_last_axis"], [ENTROPY_OUTPUT]),
        # The logits of the gathered positions, [batch, P, vocab], then their ids, [batch, P, K].
        node("Unsqueeze", [GATHER_POSITIONS, "lmscore_last_axis"], ["lmscore_positions"]),
        node("Expand", ["lmscore_positions", "lmscore_vocab_shape"], ["lmscore_row_index"]),
        node("GatherElements", [source, "lmscore_row_index"], ["lmscore_rows"], axis=1),
        node("GatherElements", ["lmscore_lse", "lmscore_positions"], ["lmscore_row_lse"], axis=1),
        node("Reshape", [GATHER_IDS, "lmscore_ids_shape"], ["lmscore_ids"]),
        node("Shape", ["lmscore_positions"], ["lmscore_positions_shape"]),
        node("Expand", ["lmscore_ids", "lmscore_positions_shape"], ["lmscore_id_index"]),
        node("GatherElements", ["lmscore_rows", "lmscore_id_index"], ["lmscore_row_ids"], axis=2),
        node("Sub", ["lmscore_row_ids", "lmscore_row_lse"], [GATHERED_OUTPUT]),
    ]
    return nodes
