"""Memory policy: when the server hands freed memory back to the system, so RSS falls after a
burst of large requests and stays put between small ones.

Two allocators keep what a run frees: ONNX Runtime's CPU arena (on by default, see
RuntimeOptions.cpu_arena) and glibc's heap, which keeps freed pages mapped. Left alone,
RSS stays at the peak of the largest burst. `MemoryPolicy` decides when to give them back:

- when the model goes idle (`after_burst`, about a second after its last run): once RSS
  has grown by IDLE_TRIM_GROWTH_BYTES since the last release (a short request's buffers
  stay for the next one instead of being paged in again every time), the heap is trimmed,
  which costs the next run nothing. The arena holds the rest: the head's [tokens,
  vocabulary] buffers, 0.8 GB for a batch of 1,000 tokens on the default model, which the
  next run pays ~15 % of its time to fault in again (issue 23). So the arena is kept while
  it is the working set of recent requests: when no more of it was needed than by a
  request within the last `hold_s` seconds. A burst larger than that goes back at once,
  and everything once the model has been idle for `hold_s` (`hold_s` 0: every burst at
  once, the behaviour a tight memory limit wants);
- between the chunks of a long run (`between_chunks`): the heap only, at most once per
  MIN_TRIM_INTERVAL, since a trim walks the whole heap.

`limit_arenas` caps glibc's heaps so freed memory is not spread over heaps that are never
trimmed together. On other C libraries (musl, macOS) all of it is a no-op.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import functools
import logging
import os
import threading
import time
from collections.abc import Callable

from lmscore.server.config import MEMORY_HOLD_S

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

    def __init__(
        self,
        idle_growth_bytes: int = IDLE_TRIM_GROWTH_BYTES,
        hold_s: float = MEMORY_HOLD_S,
        *,
        resident: Callable[[], int | None] = resident_bytes,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.idle_growth_bytes = idle_growth_bytes
        self.hold_s = hold_s
        self._resident = resident
        self._clock = clock
        self._lock = threading.Lock()
        self._last_trim = 0.0
        # RSS just after the last full release: the resting size (weights, caches kept).
        self._resting_rss = 0
        # (time, RSS above the resting size) at each idle point after a request that grew
        # it: what recent requests needed.
        self._needs: collections.deque[tuple[float, int]] = collections.deque()

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

    def after_burst(
        self, free_arenas: Callable[[], object] | None = None, idle_s: float = 0.0
    ) -> bool:
        """What the model thread runs at each idle point, `idle_s` seconds after its last
        run. Once RSS is idle_growth_bytes above its resting size: the heap trimmed and
        `free_arenas` run (what allocators above malloc keep, e.g. ONNX Runtime's arena),
        unless no more was needed than by a request within the last hold_s seconds, when
        only the heap is trimmed; everything once idle for hold_s. True when the arenas
        went back."""
        if self.hold_s and idle_s >= self.hold_s:
            # Idle past the hold: whatever is held goes back, whoever grew it (models share
            # the heap, so the growth seen here may be another model's arena).
            return self.release_now(free_arenas)
        rss = self._resident()
        if rss is None or not self._resting_rss:  # the first idle point sets the resting size
            return self.release_now(free_arenas)
        need = rss - self._resting_rss
        if need < self.idle_growth_bytes:
            return False
        now = self._clock()
        while self._needs and self._needs[0][0] < now - self.hold_s:
            self._needs.popleft()
        recent = max((level for _, level in self._needs), default=None)
        self._needs.append((now, need))
        if recent is not None and need <= recent + self.idle_growth_bytes:
            self.trim_heap()  # the arena stays: the next request needs it again
            return False
        return self.release_now(free_arenas)

    @property
    def idle_points(self) -> tuple[float, ...]:
        """When (seconds idle) the model thread should call after_burst again after the
        first idle point: the hold's end, where there is one."""
        return (self.hold_s,) if self.hold_s else ()

    def release_now(self, free_arenas: Callable[[], object] | None = None) -> bool:
        """Release whatever can be, whatever the growth; sets the resting size."""
        if free_arenas is not None:
            free_arenas()
        released = self.trim_heap()
        if released:
            self._resting_rss = self._resident() or 0
        return released
