"""Memory policy: when the server hands freed memory back to the system, so RSS falls after a
burst of large requests and stays put between small ones.

Two allocators keep what a run frees: ONNX Runtime's CPU arena (on by default, see
RuntimeOptions.cpu_arena) and glibc's heap, which keeps freed pages mapped. Left alone,
RSS stays at the peak of the largest burst. `MemoryPolicy` decides when to give them back:

- when the model goes idle after a burst (`after_burst`): the arena shrinks first (a
  callable the model runs supply), then the heap is trimmed; only once RSS has grown by
  IDLE_TRIM_GROWTH_BYTES since the last such release, so a short request's buffers stay
  for the next one instead of being paged in again every time;
- between the chunks of a long run (`between_chunks`): the heap only, at most once per
  MIN_TRIM_INTERVAL, since a trim walks the whole heap.

`limit_arenas` caps glibc's heaps so freed memory is not spread over heaps that are never
trimmed together. On other C libraries (musl, macOS) all of it is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

# mallopt's parameter number for the arena count (malloc.h: M_ARENA_MAX).
_M_ARENA_MAX = -8
# glibc makes up to 8 heaps per core, one per allocating thread (the model thread, ONNX
# Runtime's pool, the planning threads); two keep the freed pages where a trim finds them.
MALLOC_ARENAS = 2
# Between the chunks of a long run, trim at most this often: a trim walks the heap.
MIN_TRIM_INTERVAL = 1.0
# Going idle releases only past this growth of RSS since the last release: a short pair's
# buffers (tens of MB, more with a large vocabulary) stay for the next request; a burst's
# (hundreds of MB and up) go back.
IDLE_TRIM_GROWTH_BYTES = 128 * 2**20


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc, or None where malloc_trim and mallopt are not there."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    if libc is None or not hasattr(libc, "malloc_trim") or not hasattr(libc, "mallopt"):
        return None
    return libc


def can_release() -> bool:
    """Whether this process can hand heap pages back (glibc)."""
    return _libc() is not None


def limit_arenas() -> None:
    """Call once at start, before the threads that allocate."""
    libc = _libc()
    if libc is not None and libc.mallopt(_M_ARENA_MAX, MALLOC_ARENAS) != 1:
        log.debug("mallopt(M_ARENA_MAX) was refused")


def resident_bytes() -> int | None:
    """This process's RSS (Linux), None where /proc is not there."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class MemoryPolicy:
    """When freed memory goes back to the system. The heap is the process's, so every model
    of a server shares one policy (the app makes it); an engine on its own makes its own."""

    def __init__(self, idle_growth_bytes: int = IDLE_TRIM_GROWTH_BYTES) -> None:
        self.idle_growth_bytes = idle_growth_bytes
        self._lock = threading.Lock()
        self._last_trim = 0.0
        # RSS just after the last release after a burst: the resting size (weights, caches kept).
        self._resting_rss = 0

    def trim_heap(self, min_interval: float = 0.0) -> bool:
        """Return free heap pages to the system; False when skipped (less than
        `min_interval` seconds after the last trim, or not glibc)."""
        libc = _libc()
        if libc is None:
            return False
        with self._lock:
            now = time.monotonic()
            if now - self._last_trim < min_interval:
                return False
            self._last_trim = now
            libc.malloc_trim(0)
        return True

    def between_chunks(self) -> bool:
        """Between two model runs of one long run: the last chunk's buffers go back before
        the cache grows again (the resting size is not moved: the run's caches are alive)."""
        return self.trim_heap(MIN_TRIM_INTERVAL)

    def after_burst(self, free_arenas: Callable[[], object] | None = None) -> bool:
        """What the model thread runs whenever it goes idle: `free_arenas` (what allocators
        above malloc keep, e.g. ONNX Runtime's arena), then a heap trim, once RSS is
        idle_growth_bytes above its resting size. False when nothing was released."""
        rss = resident_bytes()
        if rss is not None and rss - self._resting_rss < self.idle_growth_bytes:
            return False
        return self.release_now(free_arenas)

    def release_now(self, free_arenas: Callable[[], object] | None = None) -> bool:
        """Release whatever can be, whatever the growth; sets the resting size."""
        if free_arenas is not None:
            free_arenas()
        released = self.trim_heap()
        if released:
            self._resting_rss = resident_bytes() or 0
        return released
