"""The cross-request prefix cache: key/value caches of recently scored prompts, reused exactly.

Few-shot evaluation sends the same long preamble with every question, one question per
request. Prefix reuse (lmscore.server.execution) already runs a prompt once for all its
completions; this cache keeps, after each such prompt pass, the pass's key/value cache
and scores, so that a later request whose prompt starts with the same tokens runs only
the tokens after the shared part.

An entry is a prefix pass: its tokens t₀ … t_m (the prompt, BOS included), the
key/value cache of the inputs t₀ … t_{m-1} (host arrays, one per past input, the
sequence axis 2) and their scores: position i scores t_{i+1} under the context
t₀ … t_i. A new prefix pass over s₀ … s_n finds the entry sharing the longest common
prefix of L tokens with it. Causal attention makes the first L - 1 positions (inputs
and targets both shared) exactly what the new pass would compute, keys, values and
scores. The pass then runs only s_{L-1} … s_{n-1} against those positions' cache, as
chunked prefill does (equal to one pass to float32 rounding, tested to 1e-4); a prompt
wholly inside a cached one runs nothing.

Entries are kept under a byte budget, least recently used first out. Everything runs on
the model thread; the metrics are lmscore_prefix_cache_*.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from lmscore.server import metrics
from lmscore.server.scoring import PositionScores

# The sequence axis of a key/value tensor: [batch, kv_heads, sequence, head_dim].
SEQUENCE_AXIS = 2


@dataclasses.dataclass
class CacheEntry:
    tokens: np.ndarray  # int64 [m + 1]: the inputs, then the last position's target
    past: dict[str, np.ndarray]  # past input name -> [1, heads, m, dim]
    scores: PositionScores  # m positions; position i scores tokens[i + 1]
    nbytes: int


@dataclasses.dataclass(frozen=True)
class CacheHit:
    """The first `length` positions of a cached pass: their cache and their scores."""

    length: int
    past: dict[str, np.ndarray]
    scores: PositionScores


class PrefixCache:
    def __init__(self, max_bytes: int, min_tokens: int = 1, name: str = "") -> None:
        self.max_bytes = max_bytes
        # A hit shorter than this is not worth a run split in two.
        self.min_tokens = max(1, min_tokens)
        self.name = name
        self._entries: collections.OrderedDict[int, CacheEntry] = collections.OrderedDict()
        self._next_key = 0
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.hit_tokens = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, tokens: np.ndarray, top_k: int) -> CacheHit | None:
        """The longest usable cached part of a prefix pass over `tokens` (inputs
        tokens[:-1], targets tokens[1:]): at least min_tokens positions, scored with at
        least `top_k` alternatives; or None. Counts a hit or a miss."""
        best: tuple[int, int] | None = None
        for key, entry in self._entries.items():
            if entry.scores.top_ids.shape[1] < top_k:
                continue
            n = min(len(entry.tokens), len(tokens))
            same = entry.tokens[:n] == tokens[:n]
            shared = n if same.all() else int(np.argmin(same))
            usable = shared - 1  # position i needs inputs and target, tokens 0 .. i + 1
            if best is None or usable > best[1]:
                best = (key, usable)
        if best is None or best[1] < self.min_tokens:
            self.misses += 1
            metrics.PREFIX_CACHE_LOOKUPS.labels(self.name, "miss").inc()
            return None
        key, usable = best
        self._entries.move_to_end(key)
        entry = self._entries[key]
        self.hits += 1
        self.hit_tokens += usable
        metrics.PREFIX_CACHE_LOOKUPS.labels(self.name, "hit").inc()
        metrics.PREFIX_CACHE_HIT_TOKENS.labels(self.name).inc(usable)
        scores = entry.scores.with_top_k(top_k)
        return CacheHit(
            usable,
            {n: v[:, :, :usable] for n, v in entry.past.items()},
            PositionScores(
                scores.logprobs[:usable],
                scores.ranks[:usable],
                scores.top_ids[:usable],
                scores.top_logprobs[:usable],
            ),
        )

    def store(self, tokens: np.ndarray, past: Mapping[str, Any], scores: PositionScores) -> None:
        """Keep the prefix pass over `tokens` (the key/value cache of tokens[:-1], batch 1,
        copied to host arrays; the scores of its positions) unless it alone exceeds the
        budget; drops the least recently used entries to fit."""
        positions = len(tokens) - 1
        if positions < 1:
            return
        views = {name: _host_view(value) for name, value in past.items()}
        arrays = [*(v for v, _ in views.values()), scores.logprobs, scores.ranks, scores.top_ids]
        nbytes = sum(a.nbytes for a in arrays) + scores.top_logprobs.nbytes + tokens.nbytes
        if nbytes > self.max_bytes:
            return
        # Copied only when kept, and only what ONNX Runtime still owns: an entry holding a
        # view of its buffers would keep a whole arena region (up to a GB) from going back.
        host = {name: v if owned else v.copy() for name, (v, owned) in views.items()}
        scores = own_arrays(scores)
        if any(v.shape[0] != 1 or v.shape[SEQUENCE_AXIS] != positions for v in host.values()):
            raise ValueError("a prefix cache entry is one sequence's cache of all its inputs")
        if len(scores) != positions:
            raise ValueError(f"{len(scores)} scores for a pass of {positions} positions")
        # An entry whose tokens start the new one's is superseded by it.
        for key in [k for k, e in self._entries.items() if _is_prefix(e.tokens, tokens)]:
            self._drop(key)
        while self._entries and self.bytes + nbytes > self.max_bytes:
            self._drop(next(iter(self._entries)))
        self._entries[self._next_key] = CacheEntry(np.array(tokens), host, scores, nbytes)
        self._next_key += 1
        self.bytes += nbytes
        metrics.PREFIX_CACHE_BYTES.labels(self.name).set(self.bytes)

    def clear(self) -> None:
        for key in list(self._entries):
            self._drop(key)

    def _drop(self, key: int) -> None:
        entry = self._entries.pop(key)
        self.bytes -= entry.nbytes
        metrics.PREFIX_CACHE_BYTES.labels(self.name).set(self.bytes)


def _is_prefix(shorter: np.ndarray, longer: np.ndarray) -> bool:
    return len(shorter) <= len(longer) and bool((longer[: len(shorter)] == shorter).all())


def _host_view(value: Any) -> tuple[np.ndarray, bool]:
    """A key/value tensor as a host array, and whether that array is ours: a CPU OrtValue's
    array, like a session.run output, is a view of a buffer ONNX Runtime owns (copy to keep
    it); a device OrtValue comes back as a fresh host copy."""
    if isinstance(value, np.ndarray):
        return value, owns_its_memory(value)
    on_cpu = str(value.device_name()).lower() == "cpu"
    return value.numpy(), not on_cpu


def owns_its_memory(array: np.ndarray) -> bool:
    """Whether `array`'s memory is numpy's (not a view of another owner's buffer, such as
    ONNX Runtime's outputs)."""
    root = array
    while isinstance(root.base, np.ndarray):
        root = root.base
    return root.base is None


def own_arrays(scores: PositionScores) -> PositionScores:
    """`scores` with every array that is a view of another owner's buffer copied."""
    copies = {
        f.name: value.copy()
        for f in dataclasses.fields(scores)
        if isinstance(value := getattr(scores, f.name), np.ndarray) and not owns_its_memory(value)
    }
    return dataclasses.replace(scores, **copies)
