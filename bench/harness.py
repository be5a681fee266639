"""What the benchmarks share: timing, the machine's description, a real `lmscore serve`
process to measure, workload items as the client sends them, and PyTorch on the same
weights as the baseline (HFLM's computation). lmscore.bench.runner and the other bench
modules build on this one; it builds on none of them."""

from __future__ import annotations

import dataclasses
import functools
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lmscore.bench.workloads import Workloads
from lmscore.client import Item, ScoringClient
from lmscore.export.cpu import vector_flags
from lmscore.server.batching import IDLE_DELAY_S
from lmscore.server.requests import ItemInput, TokenInput


@dataclasses.dataclass(frozen=True)
class Timing:
    seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def summary(self, units: float = 1.0) -> dict[str, float]:
        """Rates per second (units / seconds): median, and from the fastest and slowest run."""
        return {
            "median_s": self.median,
            "min_s": min(self.seconds),
            "max_s": max(self.seconds),
            "rate_median": units / self.median,
        }


def timed(run: Callable[[], object], repeats: int, warmup: int = 1) -> Timing:
    for _ in range(warmup):
        run()
    seconds = []
    for _ in range(repeats):
        began = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - began)
    return Timing(seconds)


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


class Poller(threading.Thread):
    """Calls `call` every `interval_s` on a thread of its own, timing each call, until
    `stop`: a probe of how a server answers while it does something else."""

    def __init__(self, call: Callable[[], object], interval_s: float) -> None:
        super().__init__(daemon=True)
        self._call = call
        self._interval_s = interval_s
        self._stopping = threading.Event()
        self.seconds: list[float] = []

    def run(self) -> None:
        while not self._stopping.is_set():
            began = time.perf_counter()
            self._call()
            self.seconds.append(time.perf_counter() - began)
            self._stopping.wait(self._interval_s)

    def stop(self) -> None:
        self._stopping.set()
        self.join()

    def summary(self) -> dict[str, float]:
        return {
            "calls": len(self.seconds),
            "median_ms": 1000 * statistics.median(self.seconds),
            "max_ms": 1000 * max(self.seconds),
        }


def token_ids(tokens: TokenInput | None) -> list[int]:
    """The token ids of a workload's prompt or completion: lmscore.bench.workloads cuts
    every one from tokenized text (only a prompt may be None, the empty prompt)."""
    if tokens is None or isinstance(tokens, str):
        raise TypeError(f"a workload holds token ids, got {tokens!r}")
    return list(tokens)


def as_client_item(item: ItemInput) -> Item:
    return Item(item.prompt, [token_ids(completion) for completion in item.completions])


def cpu_description() -> str:
    """The CPU's model and the vector extensions that decide ORT's and PyTorch's kernels."""
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown CPU",
    )
    return f"{model}, {os.cpu_count()} CPUs, {' '.join(vector_flags())}"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerUnderTest:
    """A real `lmscore serve` process on a free loopback port; `http`: with --http-port on
    another one."""

    def __init__(self, model_dir: Path, *flags: str, http: bool = False) -> None:
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.http_port = _free_port() if http else 0
        if http:
            flags = (*flags, "--http-port", str(self.http_port))
        lmscore = str(Path(sys.executable).parent / "lmscore")
        began = time.perf_counter()
        self.process = subprocess.Popen(
            [
                lmscore,
                "serve",
                "--model",
                str(model_dir),
                "--port",
                str(self.port),
                "--log-level",
                "WARNING",
                *flags,
            ]
        )
        with ScoringClient(self.address) as client:
            client.wait_until_ready(timeout=300)
        self.cold_start_s = time.perf_counter() - began

    def __enter__(self) -> ServerUnderTest:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def rss_bytes(self, idle_s: float = IDLE_DELAY_S + 0.5) -> int:
        """The server's RSS after `idle_s` of idleness: by default past its first idle point
        (lmscore.server.batching.IDLE_DELAY_S), what it holds between the requests of
        sporadic traffic; past --memory-hold (MEMORY_HOLD_S + 1.5), what it rests at."""
        import psutil

        time.sleep(idle_s)
        return int(psutil.Process(self.process.pid).memory_info().rss)

    def peak_rss_bytes(self) -> int:
        """The kernel's high-water mark of the server's RSS (Linux's VmHWM), since it started."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        kilobytes = next(
            line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")
        )
        return int(kilobytes) * 1024

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


def pytorch_runs(
    source: str, work: Workloads, bos: int | None
) -> tuple[Callable[[], float], Callable[[], float]]:
    """What lm-eval's HFLM does (one forward pass, log_softmax, gather the targets) on the
    batch and on the short pair."""
    import torch
    from transformers import AutoModelForCausalLM

    from lmscore.export.source import resolve_source

    resolved = resolve_source(source)
    kwargs = {"gguf_file": resolved.gguf_file} if resolved.gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(
        str(resolved.directory), dtype=torch.float32, **kwargs
    ).eval()
    prefix = [] if bos is None else [bos]
    ids = torch.tensor([prefix + token_ids(item.completions[0]) for item in work.batch])

    def run(ids: Any = ids) -> float:
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[:, :-1].float(), dim=-1)
            return float(logprobs.gather(-1, ids[:, 1:, None]).double().sum())

    # The short pair as HFLM scores it: one pass over [BOS] + prompt + completion.
    pair = work.short_pair
    pair_ids = torch.tensor([prefix + token_ids(pair.prompt) + token_ids(pair.completions[0])])
    return run, functools.partial(run, pair_ids)
