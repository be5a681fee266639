"""Model runs that also read chosen distributions: candidate labels and whole distributions.

A plan with candidate labels or distribution_positions scores each joint sequence by a
full pass (every token an input, as lmscore.server.model_runs.run_sequences does) whose
scoring head also returns, at the positions the plan names for that sequence, the
log-probs of the plan's gather ids (the labels, or every id for whole distributions):
the head's gathered_logprobs, so no [tokens, vocabulary] tensor leaves ONNX Runtime.
The labels of a sequence are read at its last position, after its last token.

The batcher runs these as calls (`DynamicBatcher.submit_call`) on the model thread, in
chunks of what one run may hold, as full passes are; each chunk reads the positions
that fall in it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol, cast

import numpy as np

from lmscore.server.model_runs import ModelRunner, Steps, pack_by_length
from lmscore.server.scoring import BatchScores, PositionScores


class GatheringModel(Protocol):
    """A model whose head reads chosen distributions (lmscore.server.runtime.OnnxCausalLM)."""

    def score(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        target_ids: np.ndarray,
        top_k: int = 0,
        past: Any = None,
        past_repeats: int = 1,
        return_present: bool = False,
        gather_positions: np.ndarray | None = None,
        gather_ids: np.ndarray | None = None,
    ) -> tuple[BatchScores, Any]: ...


def gathered_batches(
    sequences: Sequence[tuple[int, ...]], max_batch_tokens: int
) -> list[list[int]]:
    """Indices of `sequences` packed as full passes are (shortest first, rows * longest
    within max_batch_tokens)."""
    return pack_by_length([len(s) for s in sequences], max_batch_tokens)


def run_gathered(
    runner: ModelRunner,
    sequences: Sequence[tuple[int, ...]],
    positions: Sequence[tuple[int, ...]],
    gather_ids: Sequence[int],
    top_k: int,
) -> Steps[list[PositionScores]]:
    """Score right-padded full sequences (as run_sequences), reading the log-probs of
    `gather_ids` at each sequence's `positions` (ascending, each below its length): each
    result's gathered_logprobs is [len(positions), len(gather_ids)]."""
    rows = len(sequences)
    width = max(len(ids) for ids in sequences)
    input_ids = np.zeros((rows, width), np.int64)
    target_ids = np.zeros_like(input_ids)
    attention_mask = np.zeros_like(input_ids)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = ids
        target_ids[row, : len(ids) - 1] = ids[1:]
        attention_mask[row, : len(ids)] = 1
    ids_array = np.asarray(gather_ids, np.int64)
    # Chunks as ModelRunner's: prefill_chunk_tokens, fewer positions for a big vocabulary.
    chunk = runner.settings.prefill_chunk_tokens or width
    if runner.max_run_tokens:
        chunk = min(chunk, max(1, runner.max_run_tokens // rows))
    count = -(-width // chunk)
    chunk = -(-width // count)
    model = cast(GatheringModel, runner.model)
    parts: list[BatchScores] = []
    gathered: list[list[np.ndarray]] = [[] for _ in range(rows)]
    past = None
    for start in range(0, width, chunk):
        if start:
            yield
            runner.memory.between_chunks()
        end = min(start + chunk, width)
        local = [[p - start for p in own if start <= p < end] for own in positions]
        read = np.zeros((rows, max(len(p) for p in local)), np.int64)
        for row, row_positions in enumerate(local):
            read[row, : len(row_positions)] = row_positions
        scores, past = model.score(
            input_ids[:, start:end],
            attention_mask[:, :end],
            target_ids[:, start:end],
            top_k,
            past,
            1,
            return_present=end < width,
            gather_positions=read,
            gather_ids=ids_array,
        )
        runner.model_runs += 1
        parts.append(scores)
        if read.shape[1]:
            values = scores.gathered_logprobs
            if values is None:
                raise RuntimeError("the model returned no gathered_logprobs")
            for row, row_positions in enumerate(local):
                gathered[row].append(values[row, : len(row_positions)])
    joined = BatchScores.concat(parts)
    results = []
    for row, ids in enumerate(sequences):
        own = joined.row(row, len(ids) - 1)
        values = (
            np.concatenate(gathered[row])
            if gathered[row]
            else np.zeros((0, len(ids_array)), np.float32)
        )
        results.append(
            dataclasses.replace(
                own, gathered_positions=tuple(positions[row]), gathered_logprobs=values
            )
        )
    return results
