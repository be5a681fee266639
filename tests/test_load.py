"""Load: 32 concurrent streams for about 30 s against one server on loopback.

Zero errors, every result equal to the sequential result for the same input,
and server RSS growth under 10 % between the first and the last third.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import psutil

from conftest import running_server
from lmscore.client import Item, ScoreOptions, ScoreRequest, ScoringClient

STREAMS = 32
# Long prompts exceed the tiny model's 96-token context: truncation is part of the load.
OPTIONS = ScoreOptions(truncate_prompt_left=True)
SECONDS = 30.0


def workload() -> list[list[Item]]:
    words = Path("/usr/share/common-licenses/GPL-3").read_text().split()
    rng = random.Random(7)
    requests = []
    for _ in range(40):
        items = []
        for _ in range(rng.randint(1, 4)):
            start = rng.randrange(len(words) - 60)
            cut = rng.randint(3, 30)
            prompt = " ".join(words[start : start + cut])
            length = rng.randint(1, 8)
            completions = [" " + " ".join(words[start + cut : start + cut + length])]
            if rng.random() < 0.3:  # multiple choice: prefix reuse under load
                completions.append(" " + " ".join(words[start + 40 : start + 44]))
            items.append(Item(prompt, completions))
        requests.append(items)
    return requests


def test_32_streams_for_30_seconds(tiny_export: Path) -> None:
    requests = workload()
    with running_server(tiny_export, "--max-concurrent-requests", "64") as server:
        with ScoringClient(server.address, timeout=60) as client:
            expected = [
                [
                    (r.joint_logprob, r.conditional_logprob, r.greedy)
                    for r in client.score(items, OPTIONS)
                ]
                for items in requests
            ]
        process = psutil.Process(server.process.pid)
        rss: list[tuple[float, int]] = []
        errors: list[BaseException] = []
        mismatches: list[int] = []
        completed = [0] * STREAMS
        began = time.monotonic()

        def stream(number: int) -> None:
            """One ScoreStream; the next request goes out when the previous one's results are in."""
            rng = random.Random(number)
            answered = threading.Semaphore(0)
            sent: list[int] = []

            def requests_until_deadline():
                while time.monotonic() - began < SECONDS:
                    index = rng.randrange(len(requests))
                    sent.append(index)
                    yield ScoreRequest(requests[index], OPTIONS, request_id=str(index))
                    answered.acquire()

            try:
                with ScoringClient(server.address, timeout=SECONDS + 60) as client:
                    pending: list = []
                    for result in client.score_stream(requests_until_deadline()):
                        pending.append(result)
                        index = sent[result.request_index]
                        if len(pending) < len(expected[index]):
                            continue
                        pending.sort(key=lambda r: (r.item_index, r.completion_index))
                        values = [
                            (r.joint_logprob, r.conditional_logprob, r.greedy) for r in pending
                        ]
                        if int(pending[0].request_id) != index or any(
                            abs(a[0] - b[0]) > 1e-4 or abs(a[1] - b[1]) > 1e-4 or a[2] != b[2]
                            for a, b in zip(values, expected[index], strict=True)
                        ):
                            mismatches.append(index)
                        pending = []
                        completed[number] += 1
                        answered.release()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=stream, args=(n,)) for n in range(STREAMS)]
        for thread in threads:
            thread.start()
        while any(t.is_alive() for t in threads):
            rss.append((time.monotonic() - began, process.memory_info().rss))
            time.sleep(0.5)
        for thread in threads:
            thread.join()

    assert errors == []
    assert mismatches == []
    assert all(count > 0 for count in completed)
    print(f"{sum(completed)} requests on {STREAMS} streams in {rss[-1][0]:.1f} s")
    window = [value for t, value in rss if t <= SECONDS]
    third = len(window) // 3
    first, last = window[:third], window[-third:]
    growth = (sum(last) / len(last)) / (sum(first) / len(first)) - 1
    print(f"server RSS growth between the first and last third: {100 * growth:.1f} %")
    assert growth < 0.10, f"RSS grew {100 * growth:.1f} %"
