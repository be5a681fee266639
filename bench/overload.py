"""Goodput under overload (issue 23): clients sending short pairs in a loop, each waiting
for its answer before the next; first as many as the server admits at once (its rate at
capacity), then five times as many, which it must refuse and send back (RESOURCE_EXHAUSTED
with retry pushback; the project's client waits the pushback and retries). The answered
rate under 5x overload over the rate at capacity is the ratio `lmscore bench` checks
(target >= 0.8): refusals must be cheap enough not to eat the server's CPU.

The clients are coroutines of one process (the project's AsyncScoringClient over a few
channels), so their own CPU is alike in both runs.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from lmscore.client import AsyncScoringClient, Item, ScoringError

PAIR = [Item("The capital of France is", [" Paris."])]
CHANNELS = 8
OVERLOAD = 5


async def _clients(address: str, clients: int, seconds: float) -> dict[str, float]:
    answered = failed = 0
    stop_at = time.monotonic() + seconds
    channels = [AsyncScoringClient(address, timeout=60) for _ in range(CHANNELS)]

    async def loop(client: AsyncScoringClient) -> None:
        nonlocal answered, failed
        while time.monotonic() < stop_at:
            try:
                await client.score(PAIR)
                answered += 1
            except ScoringError:
                failed += 1  # refused past its retries

    try:
        began = time.monotonic()
        await asyncio.gather(*(loop(channels[i % CHANNELS]) for i in range(clients)))
        elapsed = time.monotonic() - began
    finally:
        for client in channels:
            await client.close()
    return {
        "clients": clients,
        "answered_per_s": answered / elapsed,
        "failed_per_s": failed / elapsed,
    }


def measure(address: str, capacity_clients: int, seconds: float = 15.0) -> dict[str, Any]:
    """The answered rate with `capacity_clients` (the server's --max-concurrent-requests or
    fewer) and with OVERLOAD times as many, and their ratio."""
    asyncio.run(_clients(address, capacity_clients, 2.0))  # warm up
    at_capacity = asyncio.run(_clients(address, capacity_clients, seconds))
    overloaded = asyncio.run(_clients(address, OVERLOAD * capacity_clients, seconds))
    return {
        "at_capacity": at_capacity,
        "overloaded": overloaded,
        "goodput_ratio": overloaded["answered_per_s"] / at_capacity["answered_per_s"],
    }
