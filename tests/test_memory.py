"""Going idle hands a burst's freed memory back to the system, but keeps a short request's."""

from __future__ import annotations

import gc

import pytest

from lmscore.server import memory

pytestmark = pytest.mark.skipif(
    not memory.can_release() or memory.resident_bytes() is None, reason="needs glibc and /proc"
)

MIB = 2**20


def _burst(total: int, piece: int = 64 * 1024) -> bytes:
    """Allocate and touch `total` bytes in heap-sized pieces, then free them all but a last
    piece above them, which is returned: as a model run's buffers are freed with the
    longer-lived allocations above them, so free() alone cannot shrink the heap."""
    pieces = [b"x" * piece for _ in range(total // piece)]
    above = b"y" * piece
    del pieces
    gc.collect()
    return above


def test_idle_trim_keeps_a_short_requests_buffers_and_returns_a_burst() -> None:
    policy = memory.MemoryPolicy()
    kept = [_burst(memory.IDLE_TRIM_GROWTH_BYTES + 64 * MIB)]
    assert policy.after_burst()  # the resting size: RSS just after it
    kept.append(_burst(16 * MIB))  # what a short pair leaves free (~20 MB on SmolLM2)
    before = memory.resident_bytes()
    assert not policy.after_burst()
    assert memory.resident_bytes() >= before - 4 * MIB  # nothing was handed back

    kept.append(_burst(memory.IDLE_TRIM_GROWTH_BYTES + 64 * MIB))
    grown = memory.resident_bytes()
    assert grown - before > memory.IDLE_TRIM_GROWTH_BYTES // 2
    assert policy.after_burst()
    assert memory.resident_bytes() < grown - memory.IDLE_TRIM_GROWTH_BYTES // 2


def test_a_trim_is_skipped_within_its_interval() -> None:
    policy = memory.MemoryPolicy()
    assert policy.trim_heap()
    assert not policy.trim_heap(min_interval=3600)


def test_a_trim_between_chunks_does_not_raise_the_resting_size() -> None:
    """A long run's caches are alive at its trims between chunks and freed at its end: going
    idle afterwards must still hand them back."""
    policy = memory.MemoryPolicy()
    kept = [_burst(memory.IDLE_TRIM_GROWTH_BYTES + 64 * MIB)]
    assert policy.after_burst()
    piece = 64 * 1024
    caches = [b"c" * piece for _ in range((memory.IDLE_TRIM_GROWTH_BYTES + 64 * MIB) // piece)]
    kept.append(b"y" * piece)  # allocated after the caches: the heap cannot shrink from the top
    policy.trim_heap()  # between two chunks, the caches alive
    del caches
    gc.collect()
    grown = memory.resident_bytes()
    assert policy.after_burst()
    assert memory.resident_bytes() < grown - memory.IDLE_TRIM_GROWTH_BYTES // 2


def test_going_idle_frees_the_arenas_only_after_a_burst() -> None:
    """ONNX Runtime's arena (on by default) is handed back with the heap after a burst, and
    kept, like the heap, after a short request."""
    policy = memory.MemoryPolicy()
    freed: list[int] = []
    kept = [_burst(memory.IDLE_TRIM_GROWTH_BYTES + 64 * MIB)]
    assert policy.after_burst(lambda: freed.append(1))
    assert freed == [1]
    kept.append(_burst(16 * MIB))
    assert not policy.after_burst(lambda: freed.append(2))
    assert freed == [1]


def test_a_shrunk_arena_scores_as_before(tiny_export) -> None:  # type: ignore[no-untyped-def]
    """The CPU arena: shrinking is a one-token run that leaves every later score as it was,
    the same as without the arena; without the arena there is nothing to shrink."""
    import numpy as np

    from lmscore.server.config import RuntimeOptions
    from lmscore.server.runtime import OnnxCausalLM

    ids = np.random.default_rng(0).integers(3, 500, (4, 40))
    mask, targets = np.ones_like(ids), np.roll(ids, -1, axis=1)
    arena = OnnxCausalLM(tiny_export, RuntimeOptions(cpu_arena=True))
    plain = OnnxCausalLM(tiny_export, RuntimeOptions(cpu_arena=False))
    before, _ = arena.score(ids, mask, targets, top_k=3)
    assert arena.shrink_arena()
    after, _ = arena.score(ids, mask, targets, top_k=3)
    reference, _ = plain.score(ids, mask, targets, top_k=3)
    assert not plain.shrink_arena()
    for scores in (after, reference):
        np.testing.assert_array_equal(scores.logprobs, before.logprobs)
        np.testing.assert_array_equal(scores.top_ids, before.top_ids)
