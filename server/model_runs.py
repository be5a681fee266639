"""Model runs: token sequences -> padded arrays -> the model's runs -> per-sequence scores.

What the dynamic batcher (lmscore.server.batching) drives, one model run at a time on
the model's thread:

- `run_sequences`: right-padded full sequences scored from an empty past;
- `run_prefix_group`: prefix reuse, one pass over a shared prompt whose key/value
  cache then serves every continuation in one batched pass (the model repeats the
  batch-1 cache along the batch where it lives, `past_repeats`). Causal attention
  makes this equal to separate full passes (tested to 1e-4). The prompt pass reads
  and fills the cross-request prefix cache (lmscore.server.prefix_cache).

Chunked prefill: a batch wider than `prefill_chunk_tokens` runs in chunks of that many
positions, each against the key/value cache of the chunks before it, so a run's memory
is bounded by the chunk, not the sequence (equal to one pass: causal attention sees the
same context either way; tested to 1e-4). Each piece of work is a generator (`Steps`)
that yields between its model runs, so the batcher can give other requests a turn
between the chunks of a long one and stop it there when every caller has left.

Memory goes back to the system by the server's MemoryPolicy: between chunks, and when
the batcher finds the model idle (`on_idle`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Generator, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

import numpy as np

from lmscore.server import metrics
from lmscore.server.config import EngineSettings
from lmscore.server.memory import MemoryPolicy
from lmscore.server.prefix_cache import PrefixCache
from lmscore.server.scoring import BatchScores, PositionScores

# A model's key/value cache by past input name, in whatever form the model keeps it (host
# arrays, or values on its device): the engine only hands it back to the model.
KeyValueCache = Mapping[str, Any]

Result = TypeVar("Result")
# Work on the model thread: yields between its model runs, returns its result.
Steps = Generator[None, None, Result]


class TokenScorer(Protocol):
    """What the model runs need of a model (lmscore.server.runtime.OnnxCausalLM)."""

    def score(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        target_ids: np.ndarray,
        top_k: int = 0,
        past: KeyValueCache | None = None,
        past_repeats: int = 1,
        return_present: bool = False,
        # Passed only when a run gathers distributions (a model with `gathers`).
        gather_positions: np.ndarray | None = None,
        gather_ids: np.ndarray | None = None,
    ) -> tuple[BatchScores, KeyValueCache | None]: ...

    def shrink_arena(self) -> bool: ...


class ModelThread(ThreadPoolExecutor):
    """The thread model runs take turns on: one run at a time, since ONNX Runtime already
    spreads one run over the cores (two at once would oversubscribe them).

    Shared by the models of one server, it takes their runs first come, first served, so
    a model's run waits for at most the one run of another model in progress. For that
    wait to stay short, a model's runs are kept to `turn_s` seconds (by their measured
    cost per position) while another model has run within the last `ACTIVE_S` seconds:
    a quiet model's short pair waits for one turn, not for one full chunk of a long
    request to a large model (issue 23: 750 ms a chunk for Gemma-3 at 8k tokens).
    """

    def __init__(self, turn_s: float = 0.0) -> None:
        super().__init__(max_workers=1, thread_name_prefix="lmscore-model")
        self.turn_s = turn_s
        # Each model's last model run (time.monotonic()), by model name.
        self._last_run: dict[str, float] = {}

    def note_run(self, name: str) -> None:
        """On the model thread: `name`'s model has just run."""
        self._last_run[name] = time.monotonic()

    def turn_limit(self, name: str) -> float:
        """Seconds `name`'s next model run should take at most (0: no limit, no other
        model is active)."""
        if not self.turn_s:
            return 0.0
        since = time.monotonic() - ACTIVE_S
        others = (at for other, at in self._last_run.items() if other != name)
        return self.turn_s if any(at >= since for at in others) else 0.0


# How recently another model must have run for this one's runs to be kept to a turn.
ACTIVE_S = 5.0
# Positions a run keeps however short the turn (fewer only cost per-run overhead).
MIN_TURN_POSITIONS = 16


@dataclasses.dataclass
class Gather:
    """Distributions a run also reads (candidate labels, whole distributions): the
    log-probs of `ids` at each row's `positions` (ascending), through the head's
    gathered_logprobs; `values[row]` collects them chunk by chunk."""

    positions: Sequence[Sequence[int]]
    ids: np.ndarray
    values: list[list[np.ndarray]] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self.values = [[] for _ in self.positions]

    def feeds(self, start: int, end: int) -> tuple[list[list[int]], dict[str, np.ndarray]]:
        """The rows' positions in [start, end), relative to start, and the model's feeds."""
        local = [[p - start for p in own if start <= p < end] for own in self.positions]
        read = np.zeros((len(local), max(map(len, local))), np.int64)
        for row, row_positions in enumerate(local):
            read[row, : len(row_positions)] = row_positions
        return local, {"gather_positions": read, "gather_ids": self.ids}

    def collect(self, local: list[list[int]], scores: BatchScores) -> None:
        if not any(local):
            return
        if scores.gathered_logprobs is None:
            raise RuntimeError("the model returned no gathered_logprobs")
        for row, row_positions in enumerate(local):
            self.values[row].append(scores.gathered_logprobs[row, : len(row_positions)])

    def of_row(self, row: int) -> np.ndarray:
        """[len(positions[row]), len(ids)] log-probs."""
        parts = self.values[row]
        return np.concatenate(parts) if parts else np.zeros((0, len(self.ids)), np.float32)


def new_model_thread(turn_s: float = 0.0) -> ModelThread:
    return ModelThread(turn_s)


def run_to_end(steps: Steps[Result]) -> Result:
    """Every step of `steps` in the calling thread; its result."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]


def _padded(
    inputs: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], past_len: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-padded [rows, width] input and target ids, and the attention mask over
    `past_len` cached positions (all attended) plus the inputs."""
    width = max(len(ids) for ids in inputs)
    input_ids = np.zeros((len(inputs), width), dtype=np.int64)
    target_ids = np.zeros_like(input_ids)
    attention_mask = np.zeros((len(inputs), past_len + width), dtype=np.int64)
    attention_mask[:, :past_len] = 1
    for row, (ids, targets_of_row) in enumerate(zip(inputs, targets, strict=True)):
        input_ids[row, : len(ids)] = ids
        target_ids[row, : len(targets_of_row)] = targets_of_row
        attention_mask[row, past_len : past_len + len(ids)] = 1
    return input_ids, attention_mask, target_ids


class ModelRunner:
    """One model's runs, on its own thread or on `model_thread` shared with other models'
    runners (so no two models' runs overlap). `memory`: the server's memory policy
    (default: one of its own); `name`: the model's label in the metrics."""

    def __init__(
        self,
        model: TokenScorer,
        settings: EngineSettings,
        vocab_size: int = 0,
        *,
        memory: MemoryPolicy | None = None,
        model_thread: Executor | None = None,
        name: str = "",
    ) -> None:
        self.model = model
        self.settings = settings
        self.name = name
        self.memory = memory or MemoryPolicy(hold_s=settings.memory_hold)
        # Positions one run may score: its [tokens, vocab] float32 scores within
        # max_logits_bytes (0 vocab_size: no bound).
        self.max_run_tokens = (
            max(1, settings.max_logits_bytes // (4 * vocab_size)) if vocab_size else 0
        )
        # A hit shorter than a reuse worth making splits a pass for nothing.
        self.prefix_cache = PrefixCache(
            settings.prefix_cache_bytes, settings.min_prefix_reuse_tokens, name=name
        )
        # Every model run, and those that were one chunk of a wider batch.
        self.model_runs = 0
        self.chunk_runs = 0
        self._chunk_metric = metrics.PREFILL_CHUNKS.labels(name)
        # Seconds per position (row x position) of the last model run: what sizes a turn.
        self._position_s = 0.0
        # A shared thread is its owner's to shut down.
        self._owns_thread = model_thread is None
        self.thread: Executor = model_thread or new_model_thread()

    def close(self) -> None:
        if self._owns_thread:
            self.thread.shutdown(wait=True)

    def on_idle(self, idle_s: float = 0.0) -> bool:
        """On the model thread, `idle_s` seconds after the work ran out: memory back after a
        burst, or once idle past the memory hold."""
        return self.memory.after_burst(self.model.shrink_arena, idle_s)

    def release_memory(self) -> bool:
        """On the model thread: the arena and free heap pages back now, burst or not."""
        return self.memory.release_now(self.model.shrink_arena)

    def _turn_positions(self, rows: int, chunk: int) -> int:
        """Positions of the next run of `rows` rows: `chunk`, or fewer where another model
        is active and the turn allows fewer at this model's last cost per position."""
        if not isinstance(self.thread, ModelThread) or not self._position_s:
            return chunk
        turn_s = self.thread.turn_limit(self.name)
        if not turn_s:
            return chunk
        return max(MIN_TURN_POSITIONS, min(chunk, int(turn_s / (self._position_s * rows))))

    def _ran(self, seconds: float, positions: int) -> None:
        """On the model thread, after each model run of `positions` rows x positions."""
        self.model_runs += 1
        self._position_s = seconds / positions
        if isinstance(self.thread, ModelThread):
            self.thread.note_run(self.name)

    def _chunked(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        target_ids: np.ndarray,
        top_k: int,
        past: KeyValueCache | None = None,
        past_repeats: int = 1,
        return_present: bool = False,
        gather: Gather | None = None,
    ) -> Steps[tuple[BatchScores, KeyValueCache | None]]:
        """model.score over right-padded rows, in chunks of `prefill_chunk_tokens` positions
        (each against the cache of the chunks before it); yields between the chunks.
        `gather`: distributions each chunk also reads where its positions fall in it."""
        rows, width = input_ids.shape
        chunk = self.settings.prefill_chunk_tokens or width
        if self.max_run_tokens:  # a big vocabulary: fewer positions per run
            chunk = min(chunk, max(1, self.max_run_tokens // rows))
        past_len = attention_mask.shape[1] - width
        parts: list[BatchScores] = []
        present: KeyValueCache | None = None
        start = 0
        while start < width:
            if start:
                yield
                self.memory.between_chunks()
            # Equal chunks, none longer than the turn allows: 257 positions run as 129 + 128,
            # not 256 + 1.
            remaining = width - start
            count = -(-remaining // self._turn_positions(rows, chunk))
            end = start + -(-remaining // count)
            local, gather_feeds = gather.feeds(start, end) if gather else ([], {})
            began = time.perf_counter()
            scores, present = self.model.score(
                input_ids[:, start:end],
                attention_mask[:, : past_len + end],
                target_ids[:, start:end],
                top_k,
                past,
                past_repeats,
                return_present=return_present or end < width,
                **gather_feeds,
            )
            self._ran(time.perf_counter() - began, rows * (end - start))
            if gather:
                gather.collect(local, scores)
            past, past_repeats = present, 1
            parts.append(scores)
            if end - start < width:
                self.chunk_runs += 1
                self._chunk_metric.inc()
            start = end
        return BatchScores.concat(parts), present

    def run_sequences(
        self, sequences: Sequence[tuple[int, ...]], top_k: int, gather: Gather | None = None
    ) -> Steps[list[PositionScores]]:
        """Score right-padded full sequences (empty past): one model run, or one per chunk.
        Sequence i's scores: position j scores token j + 1. `gather`: distributions the
        runs also read (lmscore.server.gather_runs)."""
        # Every token is an input, the last one's target unused: a full pass over the sequence.
        input_ids, attention_mask, target_ids = _padded(sequences, [ids[1:] for ids in sequences])
        scores, _ = yield from self._chunked(
            input_ids, attention_mask, target_ids, top_k, gather=gather
        )
        return [scores.row(row, len(ids) - 1) for row, ids in enumerate(sequences)]

    def run_prefix_group(
        self, prefix: tuple[int, ...], sequences: Sequence[tuple[int, ...]], top_k: int
    ) -> Steps[list[PositionScores]]:
        """Score `sequences`, each starting with `prefix`: one pass over the prefix, then
        the continuations against its key/value cache.

        The prefix pass runs prefix[:-1] and scores prefix[1:]; each continuation runs
        [prefix[-1]] + its own tokens[:-1] and scores its own tokens, so every token keeps
        exactly the context of a full pass. Sequence i's scores as run_sequences'.
        """
        past_len = len(prefix) - 1
        past: KeyValueCache | None = None
        prefix_scores = PositionScores.empty(top_k)
        if past_len > 0:
            past, prefix_scores = yield from self._prefix_pass(prefix, top_k)
        # Each continuation: the prompt's last token, then the sequence's own tokens.
        continuations = [ids[past_len:] for ids in sequences]
        # A sequence that is the prefix itself is scored by the prefix pass alone.
        results = [prefix_scores] * len(sequences)
        runs = [i for i, tokens in enumerate(continuations) if len(tokens) >= 2]
        lengths = [len(continuations[i]) - 1 for i in runs]
        for number, batch in enumerate(pack_by_length(lengths, self.settings.max_batch_tokens)):
            if past_len > 0 or number:
                yield  # another request's turn before the next model run
            rows = [continuations[runs[b]] for b in batch]
            input_ids, attention_mask, target_ids = _padded(
                [tokens[:-1] for tokens in rows], [tokens[1:] for tokens in rows], past_len
            )
            scores, _ = yield from self._chunked(
                input_ids, attention_mask, target_ids, top_k, past, past_repeats=len(rows)
            )
            for row, b in enumerate(batch):
                own = scores.row(row, len(rows[row]) - 1)
                results[runs[b]] = PositionScores.concat([prefix_scores, own])
        return results

    def _prefix_pass(
        self, prefix: tuple[int, ...], top_k: int
    ) -> Steps[tuple[KeyValueCache, PositionScores]]:
        """The pass over prefix[:-1] scoring prefix[1:]: its key/value cache and scores. The
        part the prefix cache holds is not run again."""
        cache = self.prefix_cache
        tokens = np.asarray(prefix, dtype=np.int64)
        positions = len(prefix) - 1
        hit = cache.lookup(tokens, top_k) if cache.enabled else None
        start = hit.length if hit is not None else 0
        if start == positions and hit is not None:
            return hit.past, hit.scores
        scores, present = yield from self._chunked(
            tokens[None, start:-1],
            np.ones((1, positions), dtype=np.int64),
            tokens[None, start + 1 :],
            top_k,
            hit.past if hit is not None else None,
            return_present=True,
        )
        assert present is not None
        own = scores.row(0, positions - start)
        prefix_scores = PositionScores.concat([hit.scores, own]) if hit is not None else own
        if cache.enabled:
            cache.store(tokens, present, prefix_scores)
        return present, prefix_scores


def pack_by_length(lengths: Sequence[int], max_batch_tokens: int) -> list[list[int]]:
    """Indices of `lengths` grouped shortest first, so that rows * longest <= max_batch_tokens
    (a single longer sequence gets a batch of its own)."""
    batches: list[list[int]] = []
    current: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if current and (len(current) + 1) * lengths[index] > max_batch_tokens:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches
