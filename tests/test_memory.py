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


class FakeProcess:
    """RSS and time for a MemoryPolicy, moved by the test; the arena's release sets RSS back
    to the resting size."""

    def __init__(self, resting: int) -> None:
        self.resting = self.rss = resting
        self.now = 0.0
        self.released: list[float] = []

    def free_arena(self) -> None:
        self.released.append(self.now)
        self.rss = self.resting

    def policy(self, hold_s: float) -> memory.MemoryPolicy:
        policy = memory.MemoryPolicy(
            hold_s=hold_s, resident=lambda: self.rss, clock=lambda: self.now
        )
        policy.release_now(self.free_arena)  # the server's first idle point
        self.released.clear()
        return policy

    def request(self, at: float, needs: int) -> None:
        self.now = at
        self.rss = max(self.rss, self.resting + needs)


def test_the_arena_is_kept_for_requests_that_need_no_more_than_recent_ones() -> None:
    """Sporadic traffic (issue 23): a batch every few seconds keeps the arena it faulted in,
    so it runs as back to back; the first such batch's memory goes back (nothing before it
    needed as much), and everything once the model is idle for the hold."""
    process = FakeProcess(resting=750 * MIB)
    policy = process.policy(hold_s=60)
    process.request(at=10, needs=830 * MIB)
    assert policy.after_burst(process.free_arena, idle_s=1)  # a burst: nothing recent as large
    for at in (13, 16, 30, 70):  # 3 s, 3 s, 14 s, 40 s apart: within the hold of the last
        process.request(at, needs=830 * MIB)
        assert not policy.after_burst(process.free_arena, idle_s=1)
        assert process.rss == process.resting + 830 * MIB
    assert process.released == [10]
    assert policy.after_burst(process.free_arena, idle_s=60)  # idle for the hold
    assert process.released == [10, 70] and process.rss == process.resting


def test_a_burst_larger_than_recent_requests_goes_back_at_once() -> None:
    """The arena held for a batch every few seconds, a long input needing 3x more: its memory
    goes back at the first idle point, not a minute later."""
    process = FakeProcess(resting=750 * MIB)
    policy = process.policy(hold_s=60)
    for at in (10, 13):
        process.request(at, needs=830 * MIB)
        policy.after_burst(process.free_arena, idle_s=1)
    process.request(at=16, needs=2500 * MIB)
    assert policy.after_burst(process.free_arena, idle_s=1)
    assert process.released == [10, 16] and process.rss == process.resting
    # Past the hold, a batch is a burst again: what the last minute needed is forgotten.
    process.request(at=100, needs=830 * MIB)
    assert policy.after_burst(process.free_arena, idle_s=1)


def test_without_a_hold_every_burst_goes_back_at_its_first_idle_point() -> None:
    """--memory-hold 0, for a tight memory limit: each batch's arena back after it, a short
    request's buffers kept."""
    process = FakeProcess(resting=750 * MIB)
    policy = process.policy(hold_s=0)
    for at in (10, 13, 16):
        process.request(at, needs=830 * MIB)
        assert policy.after_burst(process.free_arena, idle_s=1)
    process.request(at=19, needs=20 * MIB)
    assert not policy.after_burst(process.free_arena, idle_s=1)
    assert process.released == [10, 13, 16]
    assert policy.idle_points == ()
