"""Requests after idle (issue 23): the batch and the short pair back to back and after 3 s
and 15 s of idleness, on a server and, as the machine's own baseline, in a PyTorch process
on the same weights idling the same way.

Each call comes with the CPU time the machine's other processes ran during it: on a
2-core machine a few milliseconds of someone else's work (here the VM's own agent, at nice
-10, wakes twice a second for up to 60 ms) slow a 45 ms call as much as anything the server
does. Calls no other process disturbed give the server's own figure; all calls give what a
client saw. Idle gaps alternate (3 s, 15 s, 3 s, ...) so a drift of the machine's state
over the minutes of a run falls on both.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from lmscore.bench.harness import ServerUnderTest, as_client_item, cpu_description, pytorch_runs
from lmscore.bench.workloads import Workloads, build_workloads
from lmscore.client import ScoringClient

# Idle gaps before a request, as sporadic traffic leaves them: the server's first idle point
# (lmscore.server.batching.IDLE_DELAY_S) is at 1 s.
IDLE_GAPS_S = (3.0, 15.0)
# Calls after each gap, and back to back: the short pair's spread (a few ms on 45) needs
# more than the batch's.
REPEATS = {"batch": 3, "short_pair": 7}
BACK_TO_BACK_CALLS = 10
# A call is disturbed when the machine's other processes ran more CPU during it than this
# share of its time: 0.9 ms of a 45 ms short pair (the VM's agent alone runs ~0.4 % of the
# time here, in bursts of up to 60 ms).
DISTURBED_SHARE = 0.02
# The servers `lmscore bench --after-idle` compares: the default hold, and none (which
# changes only what the batch finds after idle: a short pair releases nothing).
AFTER_IDLE_SERVERS = {"default": (), "--memory-hold 0": ("--memory-hold", "0")}


def machine_cpu_s(exclude: Collection[int]) -> float | None:
    """Seconds of CPU every task on the machine has run, but those of the processes
    `exclude` (/proc/PID/task/TID/schedstat, in nanoseconds); None where the kernel keeps
    no schedstat. A read of every task costs a few milliseconds of CPU: Calls takes it
    outside the timed window, and nothing in the server may."""
    total = 0
    found = False
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in exclude:
            continue
        try:
            for task in os.listdir(f"/proc/{entry}/task"):
                with open(f"/proc/{entry}/task/{task}/schedstat", "rb") as stat:
                    total += int(stat.read().split()[0])
                    found = True
        except (OSError, ValueError, IndexError):  # gone meanwhile, or no schedstat
            continue
    return total / 1e9 if found else None


@dataclasses.dataclass
class Calls:
    """Timed calls: each one's seconds, and the CPU seconds other processes ran meanwhile."""

    seconds: list[float] = dataclasses.field(default_factory=list)
    others_cpu_s: list[float | None] = dataclasses.field(default_factory=list)

    def add(self, call: Callable[[], object], own: Collection[int]) -> None:
        before = machine_cpu_s(own)
        began = time.perf_counter()
        call()
        self.seconds.append(time.perf_counter() - began)
        after = machine_cpu_s(own)
        self.others_cpu_s.append(None if before is None or after is None else after - before)

    @property
    def undisturbed(self) -> list[float]:
        return [
            s
            for s, other in zip(self.seconds, self.others_cpu_s, strict=True)
            if other is not None and other <= DISTURBED_SHARE * s
        ]

    def summary(self) -> dict[str, Any]:
        undisturbed = self.undisturbed
        return {
            "median_s": statistics.median(self.seconds),
            "undisturbed_median_s": statistics.median(undisturbed) if undisturbed else None,
            "calls": len(self.seconds),
            "undisturbed_calls": len(undisturbed),
            "seconds": self.seconds,
            "others_cpu_s": self.others_cpu_s,
        }


def _ratio(back_to_back: float | None, after: float | None) -> float | None:
    return None if back_to_back is None or after is None else back_to_back / after


def measure_after_idle(
    calls: dict[str, Callable[[], object]], own: Collection[int]
) -> dict[str, Any]:
    """Each workload's call (`calls`: "batch", "short_pair") back to back and after each
    of IDLE_GAPS_S, the gaps alternating; `own`: the processes whose CPU is the measured
    one's (the server, this one). Per workload: each kind's summary and the back-to-back
    median over each gap's, of all calls and of the undisturbed ones."""
    result: dict[str, Any] = {}
    for name, call in calls.items():
        call()  # warm
        back_to_back = Calls()
        for _ in range(BACK_TO_BACK_CALLS):
            back_to_back.add(call, own)
        after = {gap: Calls() for gap in IDLE_GAPS_S}
        for _ in range(REPEATS[name]):
            for gap, timed in after.items():
                time.sleep(gap)
                timed.add(call, own)
        row: dict[str, Any] = {"back_to_back": back_to_back.summary()}
        b2b = row["back_to_back"]
        for gap, timed in after.items():
            summary = row[f"after_{gap:g}s"] = timed.summary()
            summary["ratio"] = _ratio(b2b["median_s"], summary["median_s"])
            summary["undisturbed_ratio"] = _ratio(
                b2b["undisturbed_median_s"], summary["undisturbed_median_s"]
            )
        result[name] = row
    return result


def server_calls(client: ScoringClient, work: Workloads) -> dict[str, Callable[[], object]]:
    batch = [as_client_item(item) for item in work.batch]
    pair = [as_client_item(work.short_pair)]
    return {"batch": lambda: client.score(batch), "short_pair": lambda: client.score(pair)}


class PyTorchProcess:
    """The machine's baseline: PyTorch on the same weights (lmscore.bench.harness's
    pytorch_runs, HFLM's computation) in a process of its own, idle between calls as a
    server is, driven over a pipe (`python -m lmscore.bench.after_idle`)."""

    def __init__(self, model_dir: Path, source: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lmscore.bench.after_idle", str(model_dir), source],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._answer()  # loaded

    def _answer(self) -> None:
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        if line != "done":
            raise RuntimeError(f"the PyTorch baseline process answered {line!r}")

    def call(self, workload: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(workload + "\n")
        self.process.stdin.flush()
        self._answer()

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(timeout=60)


def measure_after_idle_servers(model_dir: Path, source: str | None) -> dict[str, Any]:
    """measure_after_idle on a default server, on one without the memory hold (the batch
    only), and with `source` (the model's source, see `lmscore bench --source`) on the
    PyTorch baseline; one after another, each server with the RSS it holds 1.5 s after."""
    from lmscore.export.manifest import TOKENIZER_NAME
    from lmscore.server.tokenization import TextTokenizer

    work = build_workloads(TextTokenizer(model_dir / TOKENIZER_NAME))
    result: dict[str, Any] = {"cpu": cpu_description(), "disturbed_share": DISTURBED_SHARE}
    for name, flags in AFTER_IDLE_SERVERS.items():
        print(f"after idle: {name} ...", file=sys.stderr)
        with ServerUnderTest(model_dir, *flags) as server:
            with ScoringClient(server.address, timeout=600) as client:
                calls = server_calls(client, work)
                if flags:
                    calls = {"batch": calls["batch"]}
                rows = measure_after_idle(calls, {server.process.pid, os.getpid()})
            result[name] = {**rows, "rss_held_bytes": server.rss_bytes()}
    if source is not None:
        print("after idle: PyTorch, the machine's baseline ...", file=sys.stderr)
        torch_process = PyTorchProcess(model_dir, source)
        try:
            calls = {name: lambda name=name: torch_process.call(name) for name in REPEATS}
            result["PyTorch"] = measure_after_idle(calls, {torch_process.process.pid, os.getpid()})
        finally:
            torch_process.close()
    return result


def _serve_pytorch(model_dir: Path, source: str) -> None:
    """PyTorchProcess's other end: one line per call ("batch", "short_pair"), "done" after
    each and once loaded."""
    from lmscore.export.manifest import TOKENIZER_NAME, Manifest
    from lmscore.server.tokenization import TextTokenizer

    work = build_workloads(TextTokenizer(model_dir / TOKENIZER_NAME))
    batch, short_pair = pytorch_runs(source, work, Manifest.read(model_dir).bos_token_id)
    runs = {"batch": batch, "short_pair": short_pair}
    print("done", flush=True)
    for line in sys.stdin:
        runs[line.strip()]()
        print("done", flush=True)


if __name__ == "__main__":
    _serve_pytorch(Path(sys.argv[1]), sys.argv[2])
