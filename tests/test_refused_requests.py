"""Requests that never run cost little and leave nothing behind: a request over the token
budget is refused at the text that crosses it, one whose deadline passes while it is
planned stops tokenizing, and the memory either took goes back (issue 23): on the default
model, whose resting RSS is what the issue's "within 20 %" is of."""

from __future__ import annotations

import os
import time
from pathlib import Path

import grpc
import pytest

from conftest import rss_mb, running_server
from lmscore.client import ScoringClient, ScoringError

TEXT_BYTES = 900_000
# Natural text: the licences on every machine, repeated to a text of TEXT_BYTES.
LICENSE = Path("/usr/share/common-licenses/GPL-3").read_text()
BIG_TEXT = (LICENSE * (TEXT_BYTES // len(LICENSE) + 1))[:TEXT_BYTES]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def settled_rss(pid: int) -> float:
    """RSS once the server has been idle past its release after a burst."""
    time.sleep(2.0)
    return rss_mb(pid)


@pytest.mark.e2e
def test_requests_refused_over_the_token_budget_leave_no_memory(exported_default: Path) -> None:
    """Two ScoreRolling requests of 15 texts of 0.9 MB, each text within --max-text-bytes,
    the request far over --max-tokens-per-request: refused after the second text, and RSS
    back within 20 % of what it was."""
    with (
        running_server(exported_default) as server,
        ScoringClient(server.address, timeout=120) as client,
    ):
        client.score_completions("warm", [" up"])
        before = settled_rss(server.process.pid)
        for _ in range(2):
            with pytest.raises(ScoringError) as refused:
                client.score_rolling([BIG_TEXT] * 15)
            assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "reached at texts[1]" in str(refused.value)  # 2 of 15 texts tokenized
        after = settled_rss(server.process.pid)
        assert after < 1.2 * before, (before, after)


@pytest.mark.e2e
def test_a_deadline_stops_tokenizing_and_its_memory_goes_back(exported_default: Path) -> None:
    """Within every limit but a 1 s deadline: the caller gets DEADLINE_EXCEEDED, and the
    server stops at the next text instead of tokenizing the other 14 for nobody."""
    flags = ("--max-tokens-per-request", str(10**9))
    with (
        running_server(exported_default, *flags) as server,
        ScoringClient(server.address) as client,
    ):
        client.score_completions("warm", [" up"])
        pid = server.process.pid
        before = settled_rss(pid)
        began = time.monotonic()
        with pytest.raises(ScoringError) as expired:
            client.score_rolling([BIG_TEXT] * 15, timeout=1.0)
        assert expired.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        # One text's tokenizing may still be under way; after it, the server is idle.
        tokenizing_one = max(3.0, 2 * (time.monotonic() - began))
        time.sleep(tokenizing_one)
        cpu_then = cpu_seconds(pid)
        time.sleep(2.0)
        assert cpu_seconds(pid) - cpu_then < 0.5  # not tokenizing the other texts
        after = settled_rss(pid)
        assert after < 1.2 * before, (before, after)
        assert client.score_completions("still", [" serving"])[0].completion_tokens == 1
