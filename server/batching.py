"""Dynamic batching: sequences from concurrent requests share model runs (Triton-style).

Every model run goes through one worker task, so runs never overlap (ONNX
Runtime already spreads one run over the cores). The worker waits for work,
then up to `max_queue_delay` for more (until `max_batch_tokens` are pending;
0 by default, as Triton's: what queued during the previous run is batched anyway),
sorts what is pending by length and packs it into batches of at most
`max_batch_tokens` padded tokens, so padding waste stays low. Work whose
future was cancelled (its client went away) is dropped before it runs.

The batcher drives one model's runs (lmscore.server.model_runs.ModelRunner): a batch
(or a prefix-reuse call) is a generator of model runs (`Steps`): one run, or one per
prefill chunk. The worker
takes the runs in turn, one model run each, so a short request waits for at
most one chunk of a long one, never for all of it; between two runs of a batch
it stops the batch when every caller has left (cancelled, or past its deadline).
At most one run whose key/value cache outgrows a chunk is open at a time, so
interleaving does not stack long caches in memory.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import time
from collections.abc import Callable, Generator
from concurrent.futures import Executor
from typing import Any

from lmscore.server import metrics
from lmscore.server.model_runs import ModelRunner, pack_by_length
from lmscore.server.scoring import PositionScores

# The model's on_idle (memory back after a burst) waits for this long a pause: back-to-back
# requests reuse the last one's freed pages instead of paging them in again (what the
# requests of the last minute needed is kept longer: lmscore.server.memory).
IDLE_DELAY_S = 1.0


@dataclasses.dataclass
class _SequenceJob:
    ids: tuple[int, ...]
    top_k: int
    owner: int
    future: asyncio.Future[PositionScores]
    queued_at: float = dataclasses.field(default_factory=time.monotonic)


@dataclasses.dataclass
class _CallJob:
    call: Callable[[], Generator[None, None, Any]]
    owner: int
    future: asyncio.Future[Any]
    cache_tokens: int


@dataclasses.dataclass
class _OpenWork:
    """A batch or call taking turns: its model runs, and the jobs its result settles."""

    steps: Generator[None, None, Any]
    jobs: list[_SequenceJob] | list[_CallJob]
    # Tokens of key/value cache it holds between its model runs (0: fits one chunk).
    cache_tokens: int
    started: bool = False

    def abandoned(self) -> bool:
        return all(job.future.done() for job in self.jobs)

    def settle(self, value: Any) -> None:
        if isinstance(self.jobs[0], _CallJob):
            results = [value]
        else:
            results = [
                scores.with_top_k(job.top_k) for job, scores in zip(self.jobs, value, strict=True)
            ]
        for job, result in zip(self.jobs, results, strict=True):
            if not job.future.done():
                job.future.set_result(result)

    def fail(self, exc: BaseException) -> None:
        for job in self.jobs:
            if not job.future.done():
                job.future.set_exception(exc)


def _step(steps: Generator[None, None, Any]) -> tuple[bool, Any]:
    """One model run of `steps`: (finished, its result when finished)."""
    try:
        next(steps)
    except StopIteration as stop:
        return True, stop.value
    return False, None


@dataclasses.dataclass(frozen=True)
class BatchingStats:
    # Batches of sequences started (each one model run, or one per chunk).
    batches: int
    sequences: int
    padded_tokens: int
    real_tokens: int
    # Whole calls (prefix-reuse groups: a prompt pass and its completions), counted apart.
    calls: int = 0
    # Batches and calls stopped between two model runs because every caller had left.
    abandoned: int = 0


class DynamicBatcher:
    """Queues sequences (and whole calls) and runs them on the model's thread, batched.

    `runner.run_sequences(sequences, top_k)` scores right-padded sequences: a
    generator that yields between its model runs (one, or one per chunk of
    `chunk_tokens`). With `cross_request=False` a batch only holds one request's
    sequences (the baseline the benchmark compares against). `runner.on_idle` runs on
    the model thread each time the work has run out for `idle_delay` seconds. `name`:
    the model's label in the metrics.
    """

    def __init__(
        self,
        runner: ModelRunner,
        max_batch_tokens: int,
        max_queue_delay: float = 0.0,
        cross_request: bool = True,
        chunk_tokens: int = 0,
        idle_delay: float = IDLE_DELAY_S,
        name: str = "",
    ) -> None:
        self._runner = runner
        self._executor: Executor = runner.thread
        self.max_batch_tokens = max_batch_tokens
        self.max_queue_delay = max_queue_delay
        self.cross_request = cross_request
        self.chunk_tokens = chunk_tokens
        self.idle_delay = idle_delay
        self._runs: collections.deque[_OpenWork] = collections.deque()
        self._pending: list[_SequenceJob | _CallJob] = []
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self._owners = itertools.count()
        self.batches_run = 0
        self.sequences_run = 0
        self.padded_tokens = 0
        self.real_tokens = 0
        self.calls_run = 0
        self.runs_abandoned = 0
        self._queue_seconds = metrics.QUEUE_SECONDS.labels(name)
        self._batch_sequences = metrics.BATCH_SEQUENCES.labels(name)
        self._batch_tokens = metrics.BATCH_TOKENS.labels(name)
        self._compute_seconds = metrics.COMPUTE_SECONDS.labels(name)
        self._runs_abandoned = metrics.RUNS_ABANDONED.labels(name)

    def new_owner(self) -> int:
        """A tag for one request's work (what cross_request=False keeps apart)."""
        return next(self._owners)

    def _ensure_worker(self) -> None:
        if self._worker is None or self._worker.done():
            self._wakeup = asyncio.Event()
            self._worker = asyncio.get_running_loop().create_task(self._work())

    def submit_sequence(
        self, ids: tuple[int, ...], top_k: int, owner: int
    ) -> asyncio.Future[PositionScores]:
        self._ensure_worker()
        future: asyncio.Future[PositionScores] = asyncio.get_running_loop().create_future()
        self._pending.append(_SequenceJob(ids, top_k, owner, future))
        assert self._wakeup is not None
        self._wakeup.set()
        return future

    def submit_call(
        self, call: Callable[[], Generator[None, None, Any]], owner: int, cache_tokens: int
    ) -> asyncio.Future[Any]:
        """Run the steps `call()` makes on the model thread, in turn with the batches;
        `cache_tokens`: the key/value cache it holds between its model runs."""
        self._ensure_worker()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append(_CallJob(call, owner, future, cache_tokens))
        assert self._wakeup is not None
        self._wakeup.set()
        return future

    def pending_count(self) -> int:
        return sum(1 for job in self._pending if not job.future.done())

    def stats(self) -> BatchingStats:
        return BatchingStats(
            self.batches_run,
            self.sequences_run,
            self.padded_tokens,
            self.real_tokens,
            self.calls_run,
            self.runs_abandoned,
        )

    def _pending_tokens(self) -> int:
        return sum(len(j.ids) for j in self._pending if isinstance(j, _SequenceJob))

    async def _gather(self) -> None:
        """Wait up to max_queue_delay for more work, unless a full batch is pending."""
        deadline = time.monotonic() + self.max_queue_delay
        while self._pending_tokens() < self.max_batch_tokens:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            assert self._wakeup is not None
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    async def _idle(self) -> None:
        """Run the runner's on_idle on the model thread once no work came for idle_delay
        seconds, and again at its memory policy's later idle points (the hold's end)."""
        assert self._wakeup is not None
        later = (p for p in self._runner.memory.idle_points if p > self.idle_delay)
        idle_s = 0.0
        for point in (self.idle_delay, *later):
            if self._pending:
                return  # work came while on_idle ran
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), point - idle_s)
                return  # work came first
            except TimeoutError:
                pass
            idle_s = point
            await asyncio.get_running_loop().run_in_executor(
                self._executor, self._runner.on_idle, idle_s
            )

    def _take(self) -> list[_SequenceJob | _CallJob]:
        live = [j for j in self._pending if not j.future.cancelled()]
        if self.cross_request or not live:
            self._pending = []
            return live
        owner = live[0].owner
        self._pending = [j for j in live if j.owner != owner]
        return [j for j in live if j.owner == owner]

    def _new_runs(self, jobs: list[_SequenceJob | _CallJob]) -> None:
        """Batches of the sequence jobs, and one run per call, queued behind the open runs."""
        for job in jobs:
            if isinstance(job, _CallJob):
                self._runs.append(_OpenWork(job.call(), [job], self._held(job.cache_tokens)))
        sequence_jobs = [j for j in jobs if isinstance(j, _SequenceJob)]
        lengths = [len(j.ids) for j in sequence_jobs]
        for batch in pack_by_length(lengths, self.max_batch_tokens):
            batch_jobs = [sequence_jobs[i] for i in batch]
            top_k = max(j.top_k for j in batch_jobs)
            sequences = [j.ids for j in batch_jobs]
            steps = self._runner.run_sequences(sequences, top_k)
            held = self._held(max(map(len, sequences)))
            self._runs.append(_OpenWork(steps, batch_jobs, held))

    def _held(self, tokens: int) -> int:
        return tokens if self.chunk_tokens and tokens > self.chunk_tokens else 0

    def _next_run(self) -> _OpenWork | None:
        """The first queued run that may take a turn: one already started, or one whose
        cache stays within a chunk, or any when no long run is open."""
        long_open = any(r.started and r.cache_tokens for r in self._runs)
        for run in self._runs:
            if run.started or not run.cache_tokens or not long_open:
                return run
        return None

    def _start(self, run: _OpenWork) -> None:
        run.started = True
        started = time.monotonic()
        if isinstance(run.jobs[0], _CallJob):
            self.calls_run += 1
            return
        sequences = [job.ids for job in run.jobs]  # type: ignore[union-attr]
        padded = len(sequences) * max(len(s) for s in sequences)
        self.batches_run += 1
        self.sequences_run += len(sequences)
        self.padded_tokens += padded
        self.real_tokens += sum(len(s) for s in sequences)
        for job in run.jobs:
            self._queue_seconds.observe(started - job.queued_at)  # type: ignore[union-attr]
        self._batch_sequences.observe(len(sequences))
        self._batch_tokens.observe(padded)

    async def _work(self) -> None:
        assert self._wakeup is not None
        while True:
            if not self._runs:
                if not self._pending:
                    await self._idle()
                while not self._pending:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                if self.max_queue_delay > 0:
                    await self._gather()
            if self._pending:
                self._new_runs(self._take())
            await self._take_turn()

    async def _take_turn(self) -> None:
        """The next run's next model run. A call of its own, so that nothing of the run
        (its results are views of ONNX Runtime's output buffers) outlives it in a frame
        that then idles: they would keep the arena from shrinking."""
        run = self._next_run()
        if run is None:
            return
        self._runs.remove(run)
        if run.abandoned():
            if run.started:
                self.runs_abandoned += 1
                self._runs_abandoned.inc()
            run.steps.close()
            return
        if not run.started:
            self._start(run)
        loop = asyncio.get_running_loop()
        try:
            with self._compute_seconds.time():
                finished, value = await loop.run_in_executor(self._executor, _step, run.steps)
        except Exception as exc:
            run.fail(exc)
            return
        if finished:
            run.settle(value)
        else:
            # Its next model run after the others' turns, those that came meanwhile too.
            if self._pending:
                self._new_runs(self._take())
            self._runs.append(run)
