"""Dynamic batching: sequences from concurrent requests share model runs (Triton-style).

Every model run goes through one worker task, so runs never overlap (ONNX
Runtime already spreads one run over the cores). The worker waits for work,
then up to `max_queue_delay` for more (until `max_batch_tokens` are pending),
sorts what is pending by length and packs it into batches of at most
`max_batch_tokens` padded tokens, so padding waste stays low. Work whose
future was cancelled (its client went away) is dropped before it runs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any

from lmscore.server import metrics
from lmscore.server.scoring import PositionScores


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


@dataclasses.dataclass
class _SequenceJob:
    ids: tuple[int, ...]
    top_k: int
    owner: int
    future: asyncio.Future[PositionScores]
    queued_at: float = dataclasses.field(default_factory=time.monotonic)


@dataclasses.dataclass
class _CallJob:
    call: Callable[[], Any]
    owner: int
    future: asyncio.Future[Any]


@dataclasses.dataclass(frozen=True)
class BatchingStats:
    model_runs: int
    sequences: int
    padded_tokens: int
    real_tokens: int
    # Whole calls (prefix-reuse groups: a prompt pass and its completions), counted apart.
    calls: int = 0


RunSequences = Callable[[list[tuple[int, ...]], int], list[PositionScores]]


class DynamicBatcher:
    """Queues sequences (and whole calls) and runs them on `executor`, batched.

    `run_sequences(sequences, top_k)` scores right-padded sequences in one
    model run. With `cross_request=False` a batch only holds one request's
    sequences (the baseline the benchmark compares against).
    """

    def __init__(
        self,
        run_sequences: RunSequences,
        executor: Executor,
        max_batch_tokens: int,
        max_queue_delay: float = 0.002,
        cross_request: bool = True,
    ) -> None:
        self._run_sequences = run_sequences
        self._executor = executor
        self.max_batch_tokens = max_batch_tokens
        self.max_queue_delay = max_queue_delay
        self.cross_request = cross_request
        self._pending: list[_SequenceJob | _CallJob] = []
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self._owners = itertools.count()
        self.model_runs = 0
        self.sequences_run = 0
        self.padded_tokens = 0
        self.real_tokens = 0
        self.calls_run = 0

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

    def submit_call(self, call: Callable[[], Any], owner: int) -> asyncio.Future[Any]:
        """Run `call` on the model thread, in turn with the batches."""
        self._ensure_worker()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append(_CallJob(call, owner, future))
        assert self._wakeup is not None
        self._wakeup.set()
        return future

    def pending_count(self) -> int:
        return sum(1 for job in self._pending if not job.future.done())

    def stats(self) -> BatchingStats:
        return BatchingStats(
            self.model_runs,
            self.sequences_run,
            self.padded_tokens,
            self.real_tokens,
            self.calls_run,
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

    def _take(self) -> list[_SequenceJob | _CallJob]:
        live = [j for j in self._pending if not j.future.cancelled()]
        if self.cross_request or not live:
            self._pending = []
            return live
        owner = live[0].owner
        self._pending = [j for j in live if j.owner != owner]
        return [j for j in live if j.owner == owner]

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wakeup is not None
        while True:
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            if self.max_queue_delay > 0:
                await self._gather()
            jobs = self._take()
            for job in jobs:
                if isinstance(job, _CallJob) and not job.future.cancelled():
                    self.calls_run += 1
                    await self._settle(job.future, loop.run_in_executor(self._executor, job.call))
            sequence_jobs = [j for j in jobs if isinstance(j, _SequenceJob)]
            lengths = [len(j.ids) for j in sequence_jobs]
            for batch in pack_by_length(lengths, self.max_batch_tokens):
                batch_jobs = [
                    sequence_jobs[i] for i in batch if not sequence_jobs[i].future.cancelled()
                ]
                if not batch_jobs:
                    continue
                top_k = max(j.top_k for j in batch_jobs)
                sequences = [j.ids for j in batch_jobs]
                padded = len(sequences) * max(len(s) for s in sequences)
                self.model_runs += 1
                self.sequences_run += len(sequences)
                self.padded_tokens += padded
                self.real_tokens += sum(len(s) for s in sequences)
                started = time.monotonic()
                for job in batch_jobs:
                    metrics.QUEUE_SECONDS.observe(started - job.queued_at)
                metrics.BATCH_SEQUENCES.observe(len(sequences))
                metrics.BATCH_TOKENS.observe(padded)
                run = loop.run_in_executor(self._executor, self._run_sequences, sequences, top_k)
                try:
                    with metrics.COMPUTE_SECONDS.time():
                        results = await run
                except Exception as exc:
                    for job in batch_jobs:
                        if not job.future.done():
                            job.future.set_exception(exc)
                    continue
                for job, scores in zip(batch_jobs, results, strict=True):
                    if not job.future.done():
                        job.future.set_result(scores.with_top_k(job.top_k))

    @staticmethod
    async def _settle(future: asyncio.Future[Any], work: asyncio.Future[Any]) -> None:
        try:
            result = await work
        except Exception as exc:
            if not future.done():
                future.set_exception(exc)
            return
        if not future.done():
            future.set_result(result)
