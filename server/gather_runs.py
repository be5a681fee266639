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

import numpy as np

from lmscore.server.model_runs import Gather, ModelRunner, Steps, pack_by_length
from lmscore.server.scoring import PositionScores


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
    gather = Gather(positions, np.asarray(gather_ids, np.int64))
    scores = yield from runner.run_sequences(sequences, top_k, gather)
    return [
        dataclasses.replace(
            own, gathered_positions=tuple(positions[row]), gathered_logprobs=gather.of_row(row)
        )
        for row, own in enumerate(scores)
    ]
