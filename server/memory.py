"""Giving freed memory back to the system (glibc), so RSS falls after a burst of large requests.

ONNX Runtime (with its arena off, the server's default) and the tokenizer free
their buffers with free(), but glibc keeps freed heap pages mapped, so the
process's RSS stays at its peak: 2.3-3.2 GB after bursts on the default model,
against ~0.8 GB fresh. Two settings fix that without a speed cost:

- `malloc_trim(0)` when the model goes idle returns every free page of every
  heap (measured in docs/benchmarks.md, "memory after a burst"), once RSS has
  grown by IDLE_TRIM_GROWTH_BYTES since the last trim: a short request's buffers
  stay for the next one (trimming them after every request cost ~11 ms each);
- at most MALLOC_ARENAS heaps (glibc makes up to 8 per core, one per thread
  that allocates: the model thread, ORT's pool, the planning threads), so
  freed memory is not spread over heaps that are never trimmed together.

On other C libraries (musl, macOS) both are no-ops.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

# mallopt's parameter number for the arena count (malloc.h: M_ARENA_MAX).
_M_ARENA_MAX = -8
MALLOC_ARENAS = 2
# Between the chunks of a long run, trim at most this often: a trim walks the heap
# (milliseconds on a GB heap).
MIN_TRIM_INTERVAL = 1.0
# Going idle trims only past this growth of RSS since the last trim. A short pair's buffers
# (~20 MB on SmolLM2, ~100 MB on Gemma-3's vocabulary) stay: handed back after every
# request, they were paged in again by the next, 11 ms of a 90 ms pair on SmolLM2. A burst
# (0.5 GB for 8 x 128 tokens on SmolLM2, GBs at 8k tokens) is still handed back.
IDLE_TRIM_GROWTH_BYTES = 128 * 2**20


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    if libc is None or not hasattr(libc, "malloc_trim") or not hasattr(libc, "mallopt"):
        return None
    return libc


_LIBC = _libc()
_lock = threading.Lock()
_last_trim = 0.0
# RSS just after the last idle trim: the model's resting size (weights, kept caches).
_resting_rss = 0


def limit_arenas() -> None:
    """Call once at start, before the threads that allocate."""
    if _LIBC is not None and _LIBC.mallopt(_M_ARENA_MAX, MALLOC_ARENAS) != 1:
        log.debug("mallopt(M_ARENA_MAX) was refused")


def resident_bytes() -> int | None:
    """This process's RSS (Linux), None where /proc is not there."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def release_free_memory(min_interval: float = 0.0) -> bool:
    """Return free heap pages to the system; False when skipped (less than `min_interval`
    seconds after the last time, or not glibc)."""
    global _last_trim
    if _LIBC is None:
        return False
    with _lock:
        now = time.monotonic()
        if now - _last_trim < min_interval:
            return False
        _last_trim = now
        _LIBC.malloc_trim(0)
    return True


def release_after_burst(free_arenas: Callable[[], object] | None = None) -> bool:
    """What the model thread runs whenever it goes idle: a trim once RSS is
    IDLE_TRIM_GROWTH_BYTES above its resting size (trims between a long run's chunks do
    not move that). `free_arenas` first hands back what allocators above malloc keep (ONNX
    Runtime's CPU arena, where it is on)."""
    global _resting_rss
    rss = resident_bytes()
    if rss is not None and rss - _resting_rss < IDLE_TRIM_GROWTH_BYTES:
        return False
    if free_arenas is not None:
        free_arenas()
    released = release_free_memory()
    if released:
        _resting_rss = resident_bytes() or 0
    return released
